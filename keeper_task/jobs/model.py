"""The job JSON model: a typed view of ``Jobs/{id}.json`` that never loses what the author wrote.

The agent's job format evolves and its documentation is inconsistent about key casing
(``ExecutionType`` in the examples, ``executionType`` on the setup page), so the model:

* matches known keys **case-insensitively** (the agent is .NET; ASP.NET's JSON binding is
  case-insensitive — an [inferred] rule, see agent-facts.md section 3) and remembers the
  author's spelling, so :meth:`Job.to_json_dict` writes ``ExecutionType`` back as
  ``ExecutionType``;
* keeps every unknown key (``extra="allow"``) with its value untouched, in the author's order;
* keeps both event forms, ``"Startup"`` and ``{"eventType": "Startup"}``;
* uses strict scalar types (no ``"900"`` -> ``900`` coercion) so a round trip is exact.

Every field is optional in the model so that an incomplete job can still be represented and
:func:`keeper_task.jobs.validate_job` can report every problem at once; the agent's required
fields are a validation rule, not a parsing rule.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from keeper_task.errors import JobDefinitionError

__all__ = [
    "EXECUTION_TYPES",
    "Job",
    "JobEvent",
    "JobSchedule",
    "JobTask",
    "MqttTopics",
    "OsFilter",
    "load_job",
    "parse_job",
    "parse_job_json",
    "read_job_json",
]

#: Values of a task's ``executionType`` documented by the agent (``Service`` is the default).
EXECUTION_TYPES = ("Service", "User", "UserDesktop", "UserElevated")


class _JobObject(BaseModel):
    """Base of every job JSON object: case-insensitive known keys, unknown keys preserved."""

    model_config = ConfigDict(extra="allow", populate_by_name=False)

    # field name -> the key as the author spelled it; and the author's key order.
    _keys: dict[str, str] = PrivateAttr(default_factory=dict)
    _order: list[str] = PrivateAttr(default_factory=list)

    _lookup_cache: ClassVar[dict[type[Any], dict[str, str]]] = {}

    def __init__(self, /, **data: Any) -> None:
        # Python callers use field names (timeout_seconds=...); JSON uses aliases. Field names
        # are translated here only, so a JSON key "timeout_seconds" stays an unknown key.
        fields = type(self).model_fields
        translated: dict[str, Any] = {}
        for key, value in data.items():
            info = fields.get(key)
            translated[info.alias if info is not None and info.alias else key] = value
        super().__init__(**translated)

    @classmethod
    def _alias_lookup(cls) -> dict[str, str]:
        """Return ``{alias.lower(): field name}`` for this class."""
        lookup = _JobObject._lookup_cache.get(cls)
        if lookup is None:
            lookup = {(info.alias or name).lower(): name for name, info in cls.model_fields.items()}
            _JobObject._lookup_cache[cls] = lookup
        return lookup

    @model_validator(mode="wrap")
    @classmethod
    def _match_keys(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(data, Mapping):
            return handler(data)
        lookup = cls._alias_lookup()
        fields = cls.model_fields
        known: dict[str, Any] = {}
        keys: dict[str, str] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            name = lookup.get(key.lower()) if isinstance(key, str) else None
            if name is not None and name not in keys:
                keys[name] = key
                known[fields[name].alias or name] = value
            else:
                # Unknown, or a second spelling of a known key ("ExecutionType" and
                # "executionType"): kept verbatim; validate_job reports the duplicate.
                extra[str(key)] = value
        model = handler(known)
        if extra:
            if model.__pydantic_extra__ is None:  # pragma: no cover - extra="allow" sets it
                model.__pydantic_extra__ = {}
            model.__pydantic_extra__.update(extra)
        model._keys = keys
        model._order = [str(k) for k in data]
        return model

    @property
    def extra_keys(self) -> dict[str, Any]:
        """Keys the model does not know, as the author wrote them."""
        return dict(self.__pydantic_extra__ or {})

    def to_json_dict(self) -> dict[str, Any]:
        """Return the JSON object to write back: the author's keys, casing and order.

        Known fields set by the author (or assigned later) are written under the author's
        spelling, or the canonical camelCase key for fields set from Python; unknown keys are
        written unchanged. Fields never set are left out, so nothing is added either.
        """
        out: dict[str, Any] = {}
        fields = type(self).model_fields
        for name, info in fields.items():
            if name in self.model_fields_set:
                key = self._keys.get(name) or info.alias or name
                out[key] = _to_json(getattr(self, name))
        for key, value in (self.__pydantic_extra__ or {}).items():
            out[key] = _to_json(value)
        if self._order:
            rank = {key: index for index, key in enumerate(self._order)}
            out = dict(sorted(out.items(), key=lambda item: rank.get(item[0], len(rank))))
        return out


def _to_json(value: Any) -> Any:
    """Deep-copy ``value`` into plain JSON types."""
    if isinstance(value, _JobObject):
        return value.to_json_dict()
    if isinstance(value, BaseModel):  # pragma: no cover - every job model is a _JobObject
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


class JobEvent(_JobObject):
    """The object form of an ``events`` entry: ``{"eventType": "Startup"}``."""

    event_type: StrictStr | None = Field(default=None, alias="eventType")


class JobSchedule(_JobObject):
    """A timer trigger; exactly one mode may be set.

    ``runAt`` and ``calendar`` exist in the agent but their formats are undocumented
    ([UNKNOWN]): ``runAt`` is kept as a string, ``calendar`` as any JSON value.
    """

    MODE_KEYS: ClassVar[tuple[str, ...]] = (
        "intervalMinutes",
        "cronExpression",
        "runAt",
        "calendar",
    )

    interval_minutes: StrictInt | None = Field(default=None, alias="intervalMinutes")
    cron_expression: StrictStr | None = Field(default=None, alias="cronExpression")
    run_at: StrictStr | None = Field(default=None, alias="runAt")
    calendar: Any = Field(default=None, alias="calendar")

    @property
    def modes(self) -> list[str]:
        """The schedule modes set to a non-null value (canonical key names)."""
        values = (self.interval_minutes, self.cron_expression, self.run_at, self.calendar)
        return [key for key, value in zip(self.MODE_KEYS, values, strict=True) if value is not None]


class OsFilter(_JobObject):
    """Which operating systems run the job (``windows``, ``linux``, ``macOS``).

    The agent's meaning of a missing key is [UNKNOWN]; :meth:`allows` treats a missing key as
    "allowed" and only an explicit ``false`` as excluded.
    """

    windows: StrictBool | None = Field(default=None, alias="windows")
    linux: StrictBool | None = Field(default=None, alias="linux")
    mac_os: StrictBool | None = Field(default=None, alias="macOS")

    def allows(self, os_name: str) -> bool:
        """Return False only when the filter explicitly excludes ``os_name``.

        Args:
            os_name: ``windows``, ``linux`` or ``macos`` (see ``keeper_task.jobs.normalize_os``).
        """
        value = {"windows": self.windows, "linux": self.linux, "macos": self.mac_os}.get(os_name)
        return value is not False


class MqttTopics(_JobObject):
    """The job's MQTT permissions, declared on the job root (not in a task)."""

    allowed_publications: list[StrictStr] = Field(default_factory=list, alias="allowedPublications")
    allowed_subscriptions: list[StrictStr] = Field(
        default_factory=list, alias="allowedSubscriptions"
    )

    @property
    def declared(self) -> bool:
        """True when at least one topic is listed: only then does the agent set KEEPER_JOB_ID."""
        return bool(self.allowed_publications or self.allowed_subscriptions)


class JobTask(_JobObject):
    """One step of a job: which executable runs, how, and for how long.

    ``ExecutionType`` and ``executionType`` (any casing) both fill :attr:`execution_type`;
    the author's spelling is written back.
    """

    id: StrictStr | None = Field(default=None, alias="id")
    name: StrictStr | None = Field(default=None, alias="name")
    execution_type: StrictStr | None = Field(default=None, alias="executionType")
    command: StrictStr | None = Field(default=None, alias="command")
    executable_path: StrictStr | None = Field(default=None, alias="executablePath")
    arguments: StrictStr | None = Field(default=None, alias="arguments")
    timeout_seconds: StrictInt | None = Field(default=None, alias="timeoutSeconds")
    continue_on_failure: StrictBool | None = Field(default=None, alias="continueOnFailure")
    script_type: StrictStr | None = Field(default=None, alias="scriptType")


class Job(_JobObject):
    """A job definition, the content of ``Jobs/{id}.json``.

    Example:
        >>> job = parse_job('{"id": "disk-report", "name": "Disk", "enabled": true, '
        ...                 '"events": ["Startup"], "tasks": [{"command": "DiskReport"}]}')
        >>> job.tasks[0].command
        'DiskReport'
        >>> job.effective_event_topic
        'Jobs/disk-report/events'
    """

    id: StrictStr | None = Field(default=None, alias="id")
    name: StrictStr | None = Field(default=None, alias="name")
    description: StrictStr | None = Field(default=None, alias="description")
    enabled: StrictBool | None = Field(default=None, alias="enabled")
    priority: StrictInt | None = Field(default=None, alias="priority")
    schedule: JobSchedule | None = Field(default=None, alias="schedule")
    events: list[StrictStr | JobEvent] | None = Field(default=None, alias="events")
    parameters: list[Any] | None = Field(default=None, alias="parameters")
    tasks: list[JobTask] = Field(default_factory=list, alias="tasks")
    condition: Any = Field(default=None, alias="condition")
    alternate_job_id: StrictStr | None = Field(default=None, alias="alternateJobId")
    os_filter: OsFilter | None = Field(default=None, alias="osFilter")
    mqtt_topics: MqttTopics | None = Field(default=None, alias="mqttTopics")
    event_topic: StrictStr | None = Field(default=None, alias="eventTopic")

    @property
    def effective_event_topic(self) -> str:
        """``eventTopic``, or the agent's default ``Jobs/{id}/events``."""
        return self.event_topic or f"Jobs/{self.id}/events"

    @property
    def event_names(self) -> list[str]:
        """The event names of ``events``, whichever form each entry uses."""
        names: list[str] = []
        for event in self.events or []:
            if isinstance(event, str):
                names.append(event)
            elif event.event_type is not None:
                names.append(event.event_type)
        return names

    def to_json(self, *, indent: int | None = 2) -> str:
        """Return the job as JSON text (see :meth:`to_json_dict`)."""
        return json.dumps(self.to_json_dict(), indent=indent, ensure_ascii=False)


def parse_job_json(text: str | bytes, *, source: str = "<job>") -> Any:
    """Parse job JSON text into plain Python values, strictly.

    Rejects what the agent's JSON parser would reject or silently mangle: malformed JSON
    (named by line and column), ``NaN``/``Infinity``, and duplicate keys in one object.
    A UTF-8 byte-order mark is accepted (Windows editors write one).

    Raises:
        JobDefinitionError: The text is not valid JSON.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JobDefinitionError(
                f"{source}: not UTF-8 text (byte {exc.start}); save the job file as UTF-8"
            ) from exc
    text = text.removeprefix("\ufeff")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
        _no_lone_surrogates(value)
        return value
    except json.JSONDecodeError as exc:
        raise JobDefinitionError(
            f"{source}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}"
        ) from exc
    except _StrictJsonError as exc:
        raise JobDefinitionError(f"{source}: {exc}") from exc
    except RecursionError as exc:
        raise JobDefinitionError(f"{source}: JSON nested too deeply") from exc


class _StrictJsonError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _StrictJsonError(
                f"duplicate key {key!r} in one JSON object; keep one (which one the agent "
                "uses is not defined)"
            )
        result[key] = value
    return result


def _no_lone_surrogates(value: Any) -> None:
    # JSON can spell "\ud800" alone; no UTF-8 file (or .NET string on disk) can hold it.
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item)
            todo.extend(item.values())
            texts = [t for t in texts if isinstance(t, str)]
        elif isinstance(item, list):
            todo.extend(item)
            continue
        else:
            continue
        for text in texts:
            bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
            if bad is not None:
                raise _StrictJsonError(
                    f"a string holds the unpaired UTF-16 surrogate \\u{ord(bad):04x}, which "
                    "cannot be stored as UTF-8; remove it or pair it"
                )


def _bounded_int(text: str) -> int:
    # Python refuses to convert more digits than this (CVE-2020-10735 guard) with a bare
    # ValueError; say what is wrong instead.
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise _StrictJsonError(
            f"an integer has {digits} digits; at most {limit} are accepted (no job field "
            "needs more than a few)"
        )
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _StrictJsonError(f"the number {text[:40]} is out of range for a double")
    return value


def _no_constants(name: str) -> Any:
    raise _StrictJsonError(f"{name} is not valid JSON; use a number or null")


def read_job_json(path: str | os.PathLike[str]) -> Any:
    """Read a job file into plain Python values (see :func:`parse_job_json`).

    Raises:
        JobDefinitionError: The file is missing, unreadable or not valid JSON.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError as exc:
        raise JobDefinitionError(f"job file {file} does not exist") from exc
    except IsADirectoryError as exc:
        raise JobDefinitionError(f"job file {file} is a directory, not a JSON file") from exc
    except OSError as exc:
        raise JobDefinitionError(f"cannot read job file {file}: {exc.strerror or exc}") from exc
    return parse_job_json(data, source=str(file))


def parse_job(text: str | bytes, *, source: str = "<job>") -> Job:
    """Parse job JSON text into a :class:`Job`.

    This checks JSON syntax and value types only; run
    :func:`keeper_task.jobs.validate_job` for the agent's rules.

    Raises:
        JobDefinitionError: Malformed JSON (with line and column), not an object, or a value
            of the wrong type.
    """
    return job_from_data(parse_job_json(text, source=source), source=source)


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and parse a job file (see :func:`parse_job`).

    Raises:
        JobDefinitionError: The file is missing, unreadable, malformed or mistyped.
    """
    return job_from_data(read_job_json(path), source=str(Path(path)))


def job_from_data(data: Any, *, source: str = "<job>") -> Job:
    """Build a :class:`Job` from already-parsed JSON values.

    Raises:
        JobDefinitionError: ``data`` is not an object, or a value has the wrong type.
    """
    if not isinstance(data, Mapping):
        raise JobDefinitionError(
            f"{source}: a job must be a JSON object, got {json_type_name(data)}"
        )
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_errors(exc)
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise JobDefinitionError(
            f"{source}: {'; '.join(problems[:3])}{more}; "
            "run `keeper-task job validate` for the full report"
        ) from exc


# Loc entries pydantic adds for union members; they are not keys the author wrote.
_UNION_TAGS = frozenset({"str", "JobEvent"})
_TYPE_WORDS: dict[str, str] = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


def format_validation_errors(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into one readable line per JSON location."""
    expected: dict[str, list[str]] = {}
    other: list[str] = []
    for error in exc.errors():
        loc = format_location(part for part in error["loc"] if not _is_union_tag(part)) or "job"
        word = _TYPE_WORDS.get(error["type"])
        if word is None:
            other.append(f"{loc}: {error['msg']}")
            continue
        words = expected.setdefault(loc, [])
        if word not in words:
            words.append(word)
    lines = [f"{loc} must be {' or '.join(words)}" for loc, words in expected.items()]
    return lines + other


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith("function-"))


def format_location(parts: Iterable[str | int]) -> str:
    """Format JSON location parts as ``tasks[0].timeoutSeconds``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_JSON_TYPE_NAMES: tuple[tuple[type[Any] | tuple[type[Any], ...], str], ...] = (
    (bool, "a boolean"),
    ((int, float), "a number"),
    (str, "a string"),
    ((list, tuple), "an array"),
    (Mapping, "an object"),
)


def json_type_name(value: Any) -> str:
    """Name the JSON type of ``value`` for messages ("a string", "an array", "null")."""
    if value is None:
        return "null"
    for types, name in _JSON_TYPE_NAMES:
        if isinstance(value, types):
            return name
    return type(value).__name__
