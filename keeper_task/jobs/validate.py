"""Offline validation of a job definition: the agent's rules, checked before deployment.

:func:`validate_job` returns the same shape as the agent's ``POST /api/Jobs/validate``
(``valid``, ``errors``, ``warnings``, ``jobId``) and never raises on any input.

Which rules come from where (agent-facts.md sections 2, 3 and 6):

* [doc] id present, no underscore, equal to the file name; required ``id``, ``name``,
  ``enabled``, ``tasks`` and at least one of ``events``/``schedule``; one schedule mode;
  priority 1-10; ``command`` a bare name; ``executablePath`` absolute; the binary exists
  unless ``osFilter`` excludes this OS; ``eventTopic`` listed in ``allowedPublications``;
  ``KEEPER_JOB_ID`` only set when ``mqttTopics`` lists a topic; 5-field cron.
* [inferred] — the agent's exact behaviour is unknown, ours is stated:
  keys match case-insensitively, and two spellings of one key are an error; ``null`` in an
  optional field counts as absent; an empty ``events`` list is no trigger; ``timeoutSeconds``
  and ``intervalMinutes`` must be positive integers; ``name`` must be non-empty; an unknown
  ``executionType`` value is an error (the agent binds it to an enum); a missing ``osFilter``
  key means "allowed"; ``{approot}`` at the start of ``executablePath`` counts as absolute;
  the id must not contain ``/`` or ``\\`` (it is a file name).
* Warnings only (our advice, not agent rules): disabled job, missing ``timeoutSeconds``,
  ``arguments`` without ``{KeeperApiBaseUrl}``, ``KeeperLogger`` not publishable,
  wildcards in publications, unknown ``osFilter`` keys, near-miss key spellings
  (``timeout_seconds``), a ``runAt`` that is not ISO 8601 (the format is [UNKNOWN]),
  ``calendar`` is not checked at all (format [UNKNOWN]).
"""

from __future__ import annotations

import json
import ntpath
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keeper_task.jobs.binary import (
    binary_candidates,
    host_os,
    is_absolute_path,
    is_builtin_command,
    normalize_os,
)
from keeper_task.jobs.model import (
    EXECUTION_TYPES,
    Job,
    JobTask,
    format_validation_errors,
    json_type_name,
)

__all__ = [
    "API_BASE_TOKEN",
    "LOGGER_TOPIC",
    "MAX_JOB_ID_BYTES",
    "ValidationReport",
    "job_id_problems",
    "suggest_job_id",
    "validate_job",
]

#: The argument token the agent replaces with its HTTPS API base URL.
API_BASE_TOKEN = "{KeeperApiBaseUrl}"  # noqa: S105 - a token name, not a secret
#: The topic the agent's log pipeline subscribes to.
LOGGER_TOPIC = "KeeperLogger"

# Extensions that show a path or script was put into `command` instead of a bare name.
_EXTENSIONS = frozenset(
    {
        ".exe",
        ".com",
        ".bat",
        ".cmd",
        ".ps1",
        ".psm1",
        ".vbs",
        ".js",
        ".msi",
        ".dll",
        ".sh",
        ".bash",
        ".zsh",
        ".ksh",
        ".py",
        ".pyw",
        ".pyz",
        ".pyc",
        ".pl",
        ".rb",
        ".jar",
        ".bin",
        ".out",
        ".app",
        ".run",
        ".appimage",
    }
)
_CRON_FIELD = re.compile(r"^[\w*/,?#-]+$")


@dataclass
class ValidationReport:
    """The result of validating one job, shaped like the agent's ``/validate`` answer.

    Attributes:
        valid: True when there are no errors (warnings do not count).
        errors: One line per problem that makes the agent refuse the job.
        warnings: One line per problem the agent accepts but that will likely bite.
        job_id: The job's id, when it has a string one.
        raw: The agent's original answer, when the report came from the agent.
    """

    valid: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    job_id: str | None = None
    raw: Any = field(default=None, compare=False, repr=False)

    def to_agent_json(self) -> dict[str, Any]:
        """Return ``{"valid", "errors", "warnings", "jobId"}`` as the agent answers."""
        return {
            "valid": self.valid,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "jobId": self.job_id,
        }

    @classmethod
    def from_agent_json(cls, body: Any) -> ValidationReport:
        """Read the agent's ``/validate`` answer (keys in any casing).

        The element type of ``errors``/``warnings`` is [UNKNOWN]: strings are kept, objects
        contribute their ``message`` (or their JSON text).

        Raises:
            ValueError: ``body`` is not a JSON object.
        """
        if not isinstance(body, Mapping):
            raise ValueError(f"expected a JSON object, got {json_type_name(body)}")
        lowered = {str(k).lower(): v for k, v in body.items()}
        errors = _messages(lowered.get("errors"))
        warnings = _messages(lowered.get("warnings"))
        valid = lowered.get("valid")
        job_id = lowered.get("jobid")
        return cls(
            valid=valid if isinstance(valid, bool) else not errors,
            errors=errors,
            warnings=warnings,
            job_id=job_id if isinstance(job_id, str) else None,
            raw=body,
        )


def _messages(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            lowered = {str(k).lower(): v for k, v in item.items()}
            message = lowered.get("message") or lowered.get("error")
            out.append(message if isinstance(message, str) else json.dumps(item, default=str))
        else:
            out.append(json.dumps(item, default=str))
    return out


class _Collector:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, message: str) -> None:
        if message not in self.errors:
            self.errors.append(message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


class _Obj:
    """Case-insensitive read access to one JSON object, reporting keys spelled twice."""

    def __init__(
        self, data: Mapping[Any, Any], where: str, out: _Collector, known: tuple[str, ...]
    ) -> None:
        self.where = where
        self.out = out
        self.by_lower: dict[str, list[Any]] = {}
        for key in data:
            if not isinstance(key, str):
                out.error(f"{self._at()}keys must be strings, got {key!r}")
                continue
            self.by_lower.setdefault(key.lower(), []).append(key)
        self.data = data
        canonical = {k.lower(): k for k in known}
        for lower, spellings in self.by_lower.items():
            if len(spellings) > 1 and lower in canonical:
                listed = " and ".join(repr(s) for s in spellings)
                out.error(f"{self._at()}{listed} are the same key spelled twice; keep one")
            elif len(spellings) == 1 and lower not in canonical:
                squashed = lower.replace("_", "").replace("-", "")
                if squashed in canonical and squashed != lower:
                    out.warn(
                        f"{self._at()}unknown key {spellings[0]!r} is ignored by the agent; "
                        f"did you mean {canonical[squashed]!r}?"
                    )

    def _at(self) -> str:
        return f"{self.where}: " if self.where else ""

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str) -> Any:
        """Return the value of ``key`` (any casing), None when absent or null."""
        spellings = self.by_lower.get(key.lower())
        if not spellings:
            return None
        return self.data[spellings[0]]

    def has(self, key: str) -> bool:
        return self.get(key) is not None


def _keys_of(model: type[Any]) -> tuple[str, ...]:
    return tuple(info.alias or name for name, info in model.model_fields.items())


_JOB_KEYS = _keys_of(Job)
_TASK_KEYS = _keys_of(JobTask)
_SCHEDULE_KEYS = ("intervalMinutes", "cronExpression", "runAt", "calendar")
_OS_FILTER_KEYS = ("windows", "linux", "macOS")
_MQTT_KEYS = ("allowedPublications", "allowedSubscriptions")


def validate_job(
    job: Job | Mapping[str, Any] | Any,
    *,
    file_name: str | os.PathLike[str] | None = None,
    agent_root: str | os.PathLike[str] | None = None,
    current_os: str | None = None,
    logs_via_mqtt: bool = True,
) -> ValidationReport:
    """Check a job against the agent's rules, offline.

    Args:
        job: A :class:`Job`, or the parsed JSON value (any value: a non-object is an error).
        file_name: The job file's name or path; its stem must equal the id.
        agent_root: The agent's install root; when given, the task binaries must exist.
        current_os: The OS the agent runs on (default: this host), for ``osFilter`` and the
            binary's ``.exe`` suffix.
        logs_via_mqtt: The task logs through ``KeeperLogger``: warn when it may not publish.

    Returns:
        The report; ``valid`` is False when there is at least one error.

    Raises:
        ValueError: ``current_os`` is not ``windows``, ``linux`` or ``macos``. (The job
            itself never makes this function raise.)
    """
    os_name = normalize_os(current_os) if current_os else host_os()
    out = _Collector()
    data: Any = job.to_json_dict() if isinstance(job, Job) else job
    job_id: str | None = None
    if not isinstance(data, Mapping):
        out.error(f"a job must be a JSON object, got {json_type_name(data)}")
    else:
        try:
            job_id = _check_job(
                data,
                out,
                file_name=file_name,
                agent_root=agent_root,
                os_name=os_name,
                logs_via_mqtt=logs_via_mqtt,
            )
        except Exception as exc:  # a validator bug must still give a report, never raise
            out.error(f"internal validator error ({type(exc).__name__}: {exc}); please report it")
    return ValidationReport(
        valid=not out.errors, errors=out.errors, warnings=out.warnings, job_id=job_id
    )


def _check_job(
    data: Mapping[Any, Any],
    out: _Collector,
    *,
    file_name: str | os.PathLike[str] | None,
    agent_root: str | os.PathLike[str] | None,
    os_name: str,
    logs_via_mqtt: bool,
) -> str | None:
    obj = _Obj(data, "", out, _JOB_KEYS)
    job_id = _check_id(obj, out, file_name)
    _require_string(obj, "name", out, required=True)
    _require_string(obj, "description", out, required=False, allow_empty=True)

    _check_enabled(obj.get("enabled"), out)
    _check_priority(obj.get("priority"), out)

    has_schedule = _check_schedule(obj.get("schedule"), out)
    has_events = _check_events(obj.get("events"), out)
    if not has_schedule and not has_events:
        out.error(
            'the job has no trigger: give a schedule, or events such as [{"eventType": "Startup"}]'
        )

    parameters = obj.get("parameters")
    if parameters is not None and not isinstance(parameters, list):
        out.error(f"parameters must be an array, got {json_type_name(parameters)}")

    _check_alternate(obj.get("alternateJobId"), out, job_id)

    os_allowed = _check_os_filter(obj.get("osFilter"), out, os_name)
    publications = _check_mqtt(obj.get("mqttTopics"), out, logs_via_mqtt)
    _check_event_topic(obj.get("eventTopic"), out, publications)

    _check_tasks(obj.get("tasks"), out, agent_root, os_name, os_allowed)

    if not out.errors:
        # The model must accept whatever the rules accept; report it if not.
        try:
            Job.model_validate(data)
        except ValidationError as exc:
            for line in format_validation_errors(exc):
                out.error(line)
    return job_id


def _check_enabled(enabled: Any, out: _Collector) -> None:
    """Check enabled: required; false is legal but the job then never runs."""
    if enabled is None:
        out.error("enabled is missing (true or false)")
    elif not isinstance(enabled, bool):
        out.error(f"enabled must be true or false, got {json_type_name(enabled)}")
    elif not enabled:
        out.warn("enabled is false: the job never runs, and run/trigger answer 400")


def _check_priority(priority: Any, out: _Collector) -> None:
    """Check priority: optional, an integer from 1 to 10."""
    if priority is None:
        return
    if not _is_int(priority):
        out.error(f"priority must be an integer from 1 to 10, got {json_type_name(priority)}")
    elif not 1 <= priority <= 10:
        out.error(f"priority must be from 1 to 10, got {priority}")


def _check_alternate(alternate: Any, out: _Collector, job_id: str | None) -> None:
    """Check alternateJobId: optional, a string naming another job."""
    if alternate is None:
        return
    if not isinstance(alternate, str):
        out.error(f"alternateJobId must be a string, got {json_type_name(alternate)}")
    elif alternate == job_id:
        out.warn("alternateJobId names the job itself")


def _check_event_topic(event_topic: Any, out: _Collector, publications: list[str] | None) -> None:
    """Check eventTopic: the broker drops a job's publishes to topics it may not publish."""
    if event_topic is None:
        return
    if not isinstance(event_topic, str) or not event_topic.strip():
        out.error(f"eventTopic must be a non-empty string, got {_show(event_topic)}")
    elif publications is not None and event_topic not in publications:
        out.error(
            f"eventTopic {event_topic!r} is not in mqttTopics.allowedPublications; "
            "the broker would drop the job's events silently"
        )
    elif publications is None:
        out.error(
            f"eventTopic {event_topic!r} needs mqttTopics.allowedPublications listing it; "
            "the broker would drop the job's events silently"
        )


def _check_id(obj: _Obj, out: _Collector, file_name: str | os.PathLike[str] | None) -> str | None:
    job_id = obj.get("id")
    if job_id is None:
        out.error("id is missing")
        job_id = None
    elif not isinstance(job_id, str):
        out.error(f"id must be a string, got {json_type_name(job_id)}")
        job_id = None
    else:
        for problem in job_id_problems(job_id):
            out.error(problem)
    if file_name is not None:
        name = ntpath.basename(posixpath.basename(os.fspath(file_name)))
        if not name.lower().endswith(".json"):
            out.warn(f"file {name!r} does not end in .json; the agent only loads Jobs/*.json")
            stem = name
        else:
            stem = name[: -len(".json")]
        if isinstance(job_id, str) and job_id != stem:
            out.error(
                f"id {job_id!r} does not match the file name {name!r}; "
                f"the agent requires Jobs/<id>.json (rename the file to {job_id}.json)"
            )
    return job_id if isinstance(job_id, str) else None


#: Longest id in UTF-8 bytes: ``<id>.json`` must fit the 255-byte file-name limit of Linux
#: (Windows and macOS count 255 UTF-16 units, which UTF-8 bytes never undercount).
MAX_JOB_ID_BYTES = 255 - len(".json")
# Characters Windows forbids in file names (with the controls U+0000-U+001F).
_WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
# Device names Windows reserves, whatever the extension (CON.json is the console).
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in (*"0123456789", "\u00b9", "\u00b2", "\u00b3")}
)


def job_id_problems(job_id: str) -> list[str]:
    """Every reason ``job_id`` cannot be a job id; empty when it can.

    An id names the file ``Jobs/<id>.json`` and must be one on Linux, macOS and Windows alike
    (a fleet shares ids across OSes), and it must not contain ``_`` (the broker splits MQTT
    client ids on it). Case-only duplicates need the other ids, so the emulator checks them.
    """
    if not job_id.strip():
        return ["id is empty"]
    if not _id_problems(job_id, ""):
        return []
    fix = suggest_job_id(job_id)
    # A suggestion too long to read is no help (the over-long id case).
    shown = fix is not None and len(fix) <= 64
    return _id_problems(job_id, f"; for example {fix!r}" if shown else "")


def _id_problems(job_id: str, hint: str) -> list[str]:
    problems: list[str] = []
    if "_" in job_id:
        problems.append(
            f"id {_show(job_id)} contains an underscore; the agent's MQTT broker splits client "
            f"ids on '_', use hyphens{hint}"
        )
    bad = sorted({c for c in job_id if c in _WINDOWS_FORBIDDEN or ord(c) < 32 or c == "\x7f"})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        problems.append(
            f"id {_show(job_id)} contains {shown}, which cannot be in a file name "
            f"(it names Jobs/<id>.json on Windows, Linux and macOS){hint}"
        )
    if any(0xD800 <= ord(c) <= 0xDFFF for c in job_id):
        problems.append(f"id {_show(job_id)} contains an unpaired UTF-16 surrogate{hint}")
    elif len(job_id.encode("utf-8")) > MAX_JOB_ID_BYTES:
        problems.append(
            f"id is {len(job_id.encode('utf-8'))} bytes long in UTF-8; at most "
            f"{MAX_JOB_ID_BYTES} fit a file name with .json{hint}"
        )
    if job_id in (".", ".."):
        problems.append(f"id {job_id!r} is not a file name{hint}")
    elif job_id != job_id.strip():
        problems.append(f"id {_show(job_id)} has leading or trailing spaces{hint}")
    elif job_id.endswith("."):
        problems.append(
            f"id {_show(job_id)} ends with a dot, which Windows strips from file names{hint}"
        )
    device = job_id.split(".", 1)[0].rstrip(" ").upper()
    if device in _WINDOWS_RESERVED:
        problems.append(
            f"id {_show(job_id)} is the reserved Windows device name {device}; "
            f"Jobs/{job_id}.json cannot exist there{hint}"
        )
    return problems


def suggest_job_id(job_id: str) -> str | None:
    """A valid id close to ``job_id`` (bad characters become ``-``), or None if none is."""
    chars = []
    for c in job_id:
        bad = c == "_" or c in _WINDOWS_FORBIDDEN or ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF
        chars.append("-" if bad or c.isspace() else c)
    text = re.sub(r"-{2,}", "-", "".join(chars)).strip("-. ")
    while len(text.encode("utf-8")) > MAX_JOB_ID_BYTES:
        text = text[:-1].rstrip("-. ")
    if not text:
        return None
    device, dot, rest = text.partition(".")
    if device.upper() in _WINDOWS_RESERVED:
        text = f"{device}-job{dot}{rest}"
    return text if not _id_problems(text, "") else None


def _require_string(
    obj: _Obj, key: str, out: _Collector, *, required: bool, allow_empty: bool = False
) -> str | None:
    value = obj.get(key)
    path = obj.path(key)
    if value is None:
        if required:
            out.error(f"{path} is missing")
        return None
    if not isinstance(value, str):
        out.error(f"{path} must be a string, got {json_type_name(value)}")
        return None
    if not allow_empty and not value.strip():
        out.error(f"{path} is empty")
        return None
    return value


def _check_schedule(schedule: Any, out: _Collector) -> bool:
    if schedule is None:
        return False
    if not isinstance(schedule, Mapping):
        out.error(f"schedule must be an object, got {json_type_name(schedule)}")
        return True
    obj = _Obj(schedule, "schedule", out, _SCHEDULE_KEYS)
    _check_schedule_modes([key for key in _SCHEDULE_KEYS if obj.has(key)], out)
    interval = obj.get("intervalMinutes")
    if interval is not None and (not _is_int(interval) or interval <= 0):
        out.error(f"schedule.intervalMinutes must be a positive integer, got {_show(interval)}")
    _check_cron(obj.get("cronExpression"), out)
    _check_run_at(obj.get("runAt"), out)
    return True


def _check_schedule_modes(modes: list[str], out: _Collector) -> None:
    """Exactly one schedule mode: the agent allows one."""
    if not modes:
        out.error(
            "schedule names no mode; give exactly one of intervalMinutes, cronExpression, "
            "runAt, calendar (or omit schedule for an event-only job)"
        )
    elif len(modes) > 1:
        out.error(f"schedule has {len(modes)} modes ({', '.join(modes)}); the agent allows one")


def _check_cron(cron: Any, out: _Collector) -> None:
    """Check schedule.cronExpression: standard 5-field cron, as the agent expects."""
    if cron is None:
        return
    if not isinstance(cron, str):
        out.error(f"schedule.cronExpression must be a string, got {json_type_name(cron)}")
        return
    fields = cron.split()
    if len(fields) != 5:
        out.error(
            f"schedule.cronExpression {cron!r} has {len(fields)} fields; the agent "
            "expects standard 5-field cron (minute hour day month weekday)"
        )
    elif not all(_CRON_FIELD.match(f) for f in fields):
        out.error(f"schedule.cronExpression {cron!r} contains invalid characters")


def _check_run_at(run_at: Any, out: _Collector) -> None:
    """Check schedule.runAt: a non-empty string; its format is only warned about."""
    if run_at is None:
        return
    if not isinstance(run_at, str) or not run_at.strip():
        out.error(f"schedule.runAt must be a non-empty string, got {_show(run_at)}")
    elif not _is_iso8601(run_at):
        out.warn(
            f"schedule.runAt {run_at!r} is not ISO 8601; the agent's format is "
            "undocumented, check it against a live agent"
        )


def _check_events(events: Any, out: _Collector) -> bool:
    if events is None:
        return False
    if not isinstance(events, list):
        out.error(f"events must be an array, got {json_type_name(events)}")
        return True
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if isinstance(event, str):
            if not event.strip():
                out.error(f"{where} is an empty event name")
        elif isinstance(event, Mapping):
            obj = _Obj(event, where, out, ("eventType",))
            event_type = obj.get("eventType")
            if event_type is None:
                out.error(f'{where} has no eventType (write {{"eventType": "Startup"}})')
            elif not isinstance(event_type, str) or not event_type.strip():
                out.error(f"{where}.eventType must be a non-empty string, got {_show(event_type)}")
        else:
            out.error(
                f"{where} must be an event name or an object with eventType, "
                f"got {json_type_name(event)}"
            )
    return bool(events)


def _check_os_filter(value: Any, out: _Collector, os_name: str) -> bool:
    """Check osFilter; return whether ``os_name`` runs the job."""
    if value is None:
        return True
    if not isinstance(value, Mapping):
        out.error(f"osFilter must be an object, got {json_type_name(value)}")
        return True
    obj = _Obj(value, "osFilter", out, _OS_FILTER_KEYS)
    known = {k.lower() for k in _OS_FILTER_KEYS}
    for lower, spellings in obj.by_lower.items():
        if lower not in known:
            out.warn(f"osFilter key {spellings[0]!r} is unknown (known: windows, linux, macOS)")
    flags: dict[str, Any] = {}
    for key, name in zip(_OS_FILTER_KEYS, ("windows", "linux", "macos"), strict=True):
        flag = obj.get(key)
        if flag is not None and not isinstance(flag, bool):
            out.error(f"osFilter.{key} must be true or false, got {json_type_name(flag)}")
        flags[name] = flag
    if all(flags[name] is False for name in flags):
        out.warn("osFilter excludes every OS: the job never runs")
    return flags.get(os_name) is not False


def _check_mqtt(value: Any, out: _Collector, logs_via_mqtt: bool) -> list[str] | None:
    """Check mqttTopics; return the publications (None when none are declared)."""
    no_mqtt = (
        "no topic in mqttTopics: the agent does not set KEEPER_JOB_ID/KEEPER_JOB_NAME, so the "
        "task cannot use MQTT or log to KeeperLogger"
    )
    if value is None:
        out.warn(no_mqtt)
        return None
    if not isinstance(value, Mapping):
        out.error(f"mqttTopics must be an object, got {json_type_name(value)}")
        return None
    obj = _Obj(value, "mqttTopics", out, _MQTT_KEYS)
    lists = {key: _topic_list(obj.get(key), key, out) for key in _MQTT_KEYS}
    publications = lists["allowedPublications"]
    for topic in publications:
        if "+" in topic or "#" in topic:
            out.warn(
                f"mqttTopics.allowedPublications entry {topic!r} has a wildcard; MQTT "
                "publishes name one topic, and wildcard matching for jobs is undocumented"
            )
    if not publications and not lists["allowedSubscriptions"]:
        out.warn(no_mqtt)
        return publications if obj.has("allowedPublications") else None
    if logs_via_mqtt and LOGGER_TOPIC not in publications:
        out.warn(
            f"{LOGGER_TOPIC} is not in mqttTopics.allowedPublications: the task's logs "
            "would be dropped silently"
        )
    return publications


def _topic_list(topics: Any, key: str, out: _Collector) -> list[str]:
    """The valid topics of ``mqttTopics.<key>``; each invalid entry is an error."""
    if topics is None:
        return []
    if not isinstance(topics, list):
        out.error(f"mqttTopics.{key} must be an array of topics, got {json_type_name(topics)}")
        return []
    valid: list[str] = []
    for index, topic in enumerate(topics):
        if not isinstance(topic, str) or not topic.strip():
            out.error(f"mqttTopics.{key}[{index}] must be a non-empty topic, got {_show(topic)}")
        else:
            valid.append(topic)
    return valid


def _check_tasks(
    tasks: Any,
    out: _Collector,
    agent_root: str | os.PathLike[str] | None,
    os_name: str,
    os_allowed: bool,
) -> None:
    if tasks is None:
        out.error("tasks is missing (an array with at least one task)")
        return
    if not isinstance(tasks, list):
        out.error(f"tasks must be an array, got {json_type_name(tasks)}")
        return
    if not tasks:
        out.error("tasks is empty; a job needs at least one task")
        return
    seen_ids: set[str] = set()
    for index, task in enumerate(tasks):
        where = f"tasks[{index}]"
        if not isinstance(task, Mapping):
            out.error(f"{where} must be an object, got {json_type_name(task)}")
            continue
        _check_task(
            task,
            where,
            out,
            seen_ids,
            agent_root=agent_root if os_allowed else None,
            os_name=os_name,
        )


def _check_task(
    task: Mapping[Any, Any],
    where: str,
    out: _Collector,
    seen_ids: set[str],
    *,
    agent_root: str | os.PathLike[str] | None,
    os_name: str,
) -> None:
    """Check one task; ``agent_root`` (None: skip) is where its binary must be found."""
    obj = _Obj(task, where, out, (*_TASK_KEYS, "ExecutionType"))
    task_id = _require_string(obj, "id", out, required=False)
    if task_id is not None:
        if task_id in seen_ids:
            out.warn(f"{where}.id {task_id!r} is used by an earlier task too")
        seen_ids.add(task_id)
    _require_string(obj, "name", out, required=False, allow_empty=True)
    _require_string(obj, "scriptType", out, required=False)
    _check_execution_type(obj.get("executionType"), out, where)
    timeout = obj.get("timeoutSeconds")
    if timeout is None:
        out.warn(f"{where} has no timeoutSeconds; the agent's default is undocumented")
    elif not _is_int(timeout) or timeout <= 0:
        out.error(f"{where}.timeoutSeconds must be a positive integer, got {_show(timeout)}")
    cof = obj.get("continueOnFailure")
    if cof is not None and not isinstance(cof, bool):
        out.error(f"{where}.continueOnFailure must be true or false, got {_show(cof)}")
    command = _check_command(obj, out, where)
    _check_executable_path(obj, out, where, command)
    builtin = command is not None and is_builtin_command(command)
    _check_arguments(obj, out, where, builtin)
    if agent_root is not None and command is not None and not builtin:
        _check_binary(task, out, where, agent_root=agent_root, os_name=os_name, command=command)


def _check_execution_type(execution_type: Any, out: _Collector, where: str) -> None:
    """Check a task's executionType: optional, one of EXECUTION_TYPES (any case)."""
    if execution_type is None:
        return
    if not isinstance(execution_type, str):
        out.error(f"{where}.executionType must be a string, got {_show(execution_type)}")
    elif execution_type.lower() not in {t.lower() for t in EXECUTION_TYPES}:
        out.error(
            f"{where}.executionType {execution_type!r} is not one of {', '.join(EXECUTION_TYPES)}"
        )


def _check_command(obj: _Obj, out: _Collector, where: str) -> str | None:
    command = obj.get("command")
    if command is None:
        out.error(f"{where}.command is missing (the binary's bare name, e.g. 'MyTool')")
        return None
    if not isinstance(command, str) or not command.strip():
        out.error(f"{where}.command must be a non-empty name, got {_show(command)}")
        return None
    bare = ntpath.basename(posixpath.basename(command))
    stem, ext = os.path.splitext(bare)
    if re.search(r"[\\/:]", command):
        out.error(
            f"{where}.command {command!r} must be a bare name without a path; put "
            f"{stem or bare!r} in command and the full path in executablePath"
        )
        return None
    if command != command.strip():
        out.error(f"{where}.command {command!r} has leading or trailing spaces")
        return None
    if ext.lower() in _EXTENSIONS:
        out.error(f"{where}.command {command!r} must be the bare name without extension: {stem!r}")
        return None
    if ext:
        out.warn(
            f"{where}.command {command!r} contains a dot; the agent expects the bare "
            "binary name without extension"
        )
    return command


def _check_executable_path(
    obj: _Obj, out: _Collector, where: str, command: str | None
) -> str | None:
    path = obj.get("executablePath")
    if path is None:
        return None
    if not isinstance(path, str) or not path.strip():
        out.error(f"{where}.executablePath must be a non-empty string, got {_show(path)}")
        return None
    if not is_absolute_path(path):
        out.error(
            f"{where}.executablePath {path!r} must be absolute (C:\\... or /...); "
            "or leave it out and use Jobs/bin/<command>/"
        )
        return None
    if command is not None:
        stem = os.path.splitext(ntpath.basename(posixpath.basename(path)))[0]
        if stem.lower() != command.lower():
            out.warn(
                f"{where}.executablePath {path!r} names a different file than command {command!r}"
            )
    return path


def _check_arguments(obj: _Obj, out: _Collector, where: str, builtin: bool) -> None:
    arguments = obj.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        out.error(f"{where}.arguments must be one string, got {json_type_name(arguments)}")
        return
    if builtin:
        return
    text = arguments or ""
    if API_BASE_TOKEN in text:
        return
    if API_BASE_TOKEN.lower() in text.lower():
        out.warn(
            f"{where}.arguments spells {API_BASE_TOKEN} with different casing; the agent "
            "may not substitute it"
        )
    else:
        out.warn(
            f"{where}.arguments never passes {API_BASE_TOKEN}; the task cannot find the "
            f"agent's API (add --keeper-api-base={API_BASE_TOKEN})"
        )


def _check_binary(
    task: Mapping[str, Any],
    out: _Collector,
    where: str,
    *,
    agent_root: str | os.PathLike[str],
    os_name: str,
    command: str,
) -> None:
    candidates = binary_candidates(task, agent_root, os_name)
    lowered = {str(k).lower(): v for k, v in task.items()}
    if isinstance(lowered.get("executablepath"), str) and len(candidates) > 1:
        # The reference: the binary must exist "at the path specified in the job JSON";
        # Jobs/bin/<command>/ does not stand in for a missing executablePath.
        candidates = candidates[-1:]
    found = next((c for c in candidates if _is_file(c)), None)
    if found is None:
        tried = " or ".join(str(p) for p in candidates)
        out.error(
            f"{where}: binary for command {command!r} not found at {tried}; "
            "deploy the binary first (keeper-task job deploy --binary)"
        )
        return
    if os_name == host_os() != "windows" and not os.access(found, os.X_OK):
        out.error(f"{where}: binary {found} is not executable; run chmod +x on it")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, or with NUL: not there
        return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_iso8601(text: str) -> bool:
    candidate = text.strip()
    if candidate.endswith(("Z", "z")):  # Python 3.10's fromisoformat rejects "Z"
        candidate = candidate[:-1] + "+00:00"
    try:
        datetime.fromisoformat(candidate)
    except ValueError:
        return False
    return True


def _show(value: Any) -> str:
    """Show a bad value briefly: strings quoted, other types named."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40] + "...")
    if _is_int(value) or isinstance(value, float):
        return repr(value)
    return json_type_name(value)
