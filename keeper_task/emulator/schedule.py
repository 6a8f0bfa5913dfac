"""The emulator's job scheduler: the ``Startup`` event, ``intervalMinutes`` and ``cronExpression``.

What the agent documents, and the emulator does:

* the scheduler ticks once a minute; an interval counts from when the scheduler starts and is
  not aligned to the clock; a schedule-only job first runs one interval after the start;
* ``Startup`` fires once, when the agent loads the job; the interval timer starts at the same
  moment and does not wait for the Startup run;
* a disabled job never runs; ``osFilter`` decides which OSes run it.

What it does not document, and the emulator chooses (README, "What the agent does not
document"): ``Startup`` fires for the jobs loaded when the emulator starts, not for jobs
created or reloaded later; a scheduled run is skipped (with a notice) while the previous run
of the same job is still going; a 5-field cron expression is matched against the emulated
local clock at each tick (``*``, numbers, ``a-b``, ``/step``, lists, ``JAN``-``DEC``,
``SUN``-``SAT``; day-of-month and day-of-week restricted together match either, as in
Vixie cron); ``runAt`` and ``calendar`` (formats undocumented) never fire, with a notice.
"""

from __future__ import annotations

import re
from datetime import datetime

__all__ = ["STARTUP_EVENT", "CronError", "CronExpression"]

#: The event name the agent fires once when it loads a job.
STARTUP_EVENT = "Startup"

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_NAMES = {3: {m: i for i, m in enumerate(_MONTHS, 1)}, 4: {d: i for i, d in enumerate(_DAYS)}}
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


class CronError(ValueError):
    """A cron expression the scheduler cannot evaluate."""


class CronExpression:
    """A standard 5-field cron expression (minute hour day-of-month month day-of-week).

    Raises:
        CronError: Not 5 fields, or a field it cannot read.
    """

    def __init__(self, text: str) -> None:
        fields = text.split()
        if len(fields) != 5:
            raise CronError(f"cron expression {text!r} has {len(fields)} fields, not 5")
        self.text = text
        self._sets = [_field(f, i) for i, f in enumerate(fields)]
        dow = self._sets[4]
        if 7 in dow:
            dow.add(0)  # 0 and 7 are both Sunday
        self._dom_star = fields[2].startswith("*")
        self._dow_star = fields[4].startswith("*")

    def matches(self, when: datetime) -> bool:
        """Whether the expression fires in the minute of ``when``."""
        minute, hour, dom, month, dow = self._sets
        if when.minute not in minute or when.hour not in hour or when.month not in month:
            return False
        weekday = (when.weekday() + 1) % 7  # cron: Sunday is 0
        day_ok, week_ok = when.day in dom, weekday in dow
        if self._dom_star or self._dow_star:
            return day_ok and week_ok
        return day_ok or week_ok


def _field(text: str, index: int) -> set[int]:
    low, high = _RANGES[index]
    names = _NAMES.get(index, {})
    values: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"(\*|[\w]+(?:-[\w]+)?)(?:/(\d+))?", part)
        if match is None:
            raise CronError(f"cron field {text!r} is not supported")
        span, step_text = match.groups()
        step = int(step_text) if step_text else 1
        if step <= 0:
            raise CronError(f"cron step in {text!r} must be positive")
        if span == "*":
            start, end = low, high
        else:
            first, _, last = span.partition("-")
            start = _value(first, names, low, high, text)
            end = _value(last, names, low, high, text) if last else start
            if step_text and not last:
                end = high  # "5/15" means from 5 to the end, every 15
        if start > end:
            raise CronError(f"cron range {span!r} in {text!r} runs backwards")
        values.update(range(start, end + 1, step))
    return values


def _value(token: str, names: dict[str, int], low: int, high: int, text: str) -> int:
    upper = token.upper()
    if upper in names:
        return names[upper]
    if not token.isdigit() or len(token) > 4:
        raise CronError(f"cron field {text!r}: {token!r} is not a number")
    value = int(token)
    if not low <= value <= high:
        raise CronError(f"cron field {text!r}: {value} is outside {low}-{high}")
    return value
