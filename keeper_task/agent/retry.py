"""Retrying a call with jittered exponential backoff inside a time budget.

Used for the agent's startup window: a task the agent just launched can get 403 from the
Plugin-tier API until its PID lands in the launched-process registry, and the agent may still
be starting (5xx). The agent documents no numbers, so the defaults are our choice: 0.25 s
doubling up to 5 s, for at most 30 s in total; a refused connection only for 3 s (assumed,
not documented by the agent: its API is up before it launches a task, so "refused" means a
wrong port or no agent).

The budget is one monotonic deadline that includes the last attempt: a retryable error is
retried as long as any budget is left, and the last wait is shortened to end at the
deadline, so the call gives up only once the budget is spent and finishes at most one
attempt (one request timeout) after it.

Tests switch sleeping off with :func:`set_testing` (modelled on ``stamina.set_testing``): no
call sleeps, yet each delay still counts against the budget (on a virtual clock), so the number
of attempts is the one production would make, and the retries still reach ``on_retry``::

    with set_testing(True):
        client.get_all("KeeperPrivilegeManager")  # 403 forever: raises at once, not in 30 s
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from keeper_task.errors import SettingsError

__all__ = [
    "RetryPolicy",
    "call_with_retry",
    "is_testing",
    "set_testing",
]

T = TypeVar("T")

#: ``on_retry(attempt, delay, exc)``: called before each retry's sleep; ``attempt`` is the
#: 1-based number of the attempt that just failed.
OnRetry = Callable[[int, float, Exception], None]

#: ``on_give_up(attempts, elapsed, exc)``: called when a retryable error meets a spent budget;
#: may return an error to raise instead of ``exc`` (it is raised ``from exc``).
OnGiveUp = Callable[[int, float, Exception], "BaseException | None"]


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry.

    Each delay is drawn uniformly from ``[0, step]`` ("full jitter"), where ``step`` starts
    at ``initial_delay`` and grows by ``multiplier`` per failed attempt up to ``max_delay``:
    concurrent tasks that the agent refused together do not come back together.

    Attributes:
        budget: Total seconds a call may keep retrying, delays included; the attempt started
            last may end up to one request timeout later. 0 disables retrying.
        refused_budget: Seconds (from the start of the call, at most ``budget``) during
            which a refused connection is retried.
        initial_delay: The first backoff step (seconds).
        multiplier: Growth of the backoff step per attempt.
        max_delay: Cap of one step (seconds).
    """

    budget: float = 30.0
    refused_budget: float = 3.0
    initial_delay: float = 0.25
    multiplier: float = 2.0
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        for name in ("budget", "refused_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingsError(f"retry {name} must be a finite number >= 0, not {value}")
        if not (math.isfinite(self.initial_delay) and self.initial_delay > 0):
            raise SettingsError(f"retry initial_delay must be > 0, not {self.initial_delay}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise SettingsError(f"retry multiplier must be >= 1, not {self.multiplier}")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.initial_delay):
            raise SettingsError(
                f"retry max_delay ({self.max_delay}) must be >= initial_delay "
                f"({self.initial_delay})"
            )

    def step(self, attempt: int) -> float:
        """Return the un-jittered backoff step after failed attempt ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, not {attempt}")
        # Stop multiplying once past the cap: multiplier ** attempt overflows for long loops.
        value = self.initial_delay
        for _ in range(attempt - 1):
            value *= self.multiplier
            if value >= self.max_delay:
                return self.max_delay
        return min(value, self.max_delay)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the delay before the retry that follows failed attempt ``attempt``.

        Args:
            attempt: 1-based number of the attempt that failed.
            rng: Source of randomness; the module's shared generator by default.
        """
        return (rng or random).uniform(0.0, self.step(attempt))


# --- testing switch -------------------------------------------------------------------------


@dataclass
class _Testing:
    enabled: bool = False
    attempts: int | None = None


_TESTING = _Testing()


class _TestingScope:
    """What :func:`set_testing` returns: usable as a context manager that restores."""

    def __init__(self, previous: _Testing) -> None:
        self._previous = previous

    def __enter__(self) -> _TestingScope:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _TESTING.enabled = self._previous.enabled
        _TESTING.attempts = self._previous.attempts


def set_testing(enabled: bool, *, attempts: int | None = None) -> _TestingScope:
    """Make retry delays instant (for tests); takes effect at once.

    While enabled, :func:`call_with_retry` never sleeps. Each delay is still charged to the
    budget on a virtual clock, so a call makes as many attempts as it would in production
    and then gives up, without waiting.

    Args:
        enabled: Switch testing mode on or off.
        attempts: Optionally cap the total number of attempts per call while enabled.

    Returns:
        A context manager; leaving it restores the previous mode::

            with set_testing(True):
                ...
    """
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    previous = dataclasses.replace(_TESTING)
    _TESTING.enabled = enabled
    _TESTING.attempts = attempts if enabled else None
    return _TestingScope(previous)


def is_testing() -> bool:
    """Return whether :func:`set_testing` switched sleeping off."""
    return _TESTING.enabled


# --- the loop -----------------------------------------------------------------------------------

#: Budget left below this counts as spent: a shorter wait could not move a clock forward.
_RESOLUTION = 1e-6


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    retry_on: Callable[[Exception], bool],
    budget_for: Callable[[Exception], float] | None = None,
    on_retry: OnRetry | None = None,
    on_give_up: OnGiveUp | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying errors ``retry_on`` accepts inside the budget.

    Args:
        fn: The call to make; takes no arguments.
        policy: Delays and budget.
        retry_on: True for an error worth retrying; other errors propagate at once.
        budget_for: The budget (seconds from the start) for this error, if it is shorter
            than ``policy.budget`` (the refused-connection budget, for example).
        on_retry: Called as ``on_retry(attempt, delay, exc)`` before each retry.
        on_give_up: Called as ``on_give_up(attempts, elapsed, exc)`` when a retryable error
            meets a spent budget; an error it returns is raised ``from exc``.
        clock: Monotonic clock in seconds (inject a fake one in tests).
        sleep: Sleeps the given seconds (inject a fake one in tests).
        rng: Random source for the jitter.

    Returns:
        What ``fn`` returned.

    Raises:
        Exception: The last error of ``fn`` (or what ``on_give_up`` returned).
    """
    start = clock()
    skipped = 0.0  # delays not slept in testing mode, still charged to the budget
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not retry_on(exc):
                raise
            elapsed = clock() - start + skipped
            budget = policy.budget if budget_for is None else min(policy.budget, budget_for(exc))
            left = budget - elapsed
            if left < _RESOLUTION or _out_of_attempts(attempt):
                _give_up(on_give_up, attempt, elapsed, exc)
                raise
            # Never give up while budget is left: the last wait ends at the deadline.
            delay = min(policy.delay(attempt, rng), left)
            if on_retry is not None:
                on_retry(attempt, delay, exc)
            if _TESTING.enabled:
                skipped += delay
            else:
                sleep(delay)


def _out_of_attempts(attempt: int) -> bool:
    cap = _TESTING.attempts if _TESTING.enabled else None
    return cap is not None and attempt >= cap


def _give_up(on_give_up: OnGiveUp | None, attempts: int, elapsed: float, exc: Exception) -> None:
    """Raise what ``on_give_up`` offers instead of ``exc``, chained to it; else return."""
    if on_give_up is None:
        return
    replacement = on_give_up(attempts, elapsed, exc)
    if replacement is not None:
        raise replacement from exc
