"""The KeeperLogger payload: the one place that decides what a log message looks like on MQTT.

The agent's KeeperLogger JSON schema is not documented (agent-facts.md, section 6), so the
framework keeps one internal record per event and a swappable serializer for it.

The record handed to a schema (:class:`LogRecord`, a plain dict)::

    timestamp   float       seconds since the epoch (time.time())
    level       str         trace | debug | info | warning | error | critical
    event       str         the event name, e.g. "item.processed"
    logger      str         the logger name (ctx.log is "task")
    job_id      str | None  KEEPER_JOB_ID
    job_name    str | None  KEEPER_JOB_NAME
    exception   str | None  formatted traceback, for log.exception() / exc_info= (messages
                            holding a secret rebuilt from their redacted args)
    fields      dict        the event's other key/values, secrets already redacted
                            (keeper_task.logging.redact: mappings arrive as dicts,
                            sets as lists, models and dataclasses as dicts)

The default schema, :class:`KeeperJsonSchema`, sends one compact UTF-8 JSON document per
event; stderr JSON lines (non-terminal stderr) use the very same document::

    {"timestamp": "2025-01-31T12:00:00.123Z",    ISO-8601, UTC, milliseconds
     "level": "Information",                     Trace|Debug|Information|Warning|Error|Critical
     "message": "item.processed",                the event name
     "jobId": "nightly-inventory",               null when the agent set no KEEPER_JOB_ID
     "jobName": "Nightly inventory",             null when unset
     "source": "task",                           the logger name
     "properties": {"i": 7, "token": "[redacted]"},
     "exception": "Traceback (most recent ...)"} only when there is one

Level names follow the agent's .NET vocabulary (``system.logging.level``). Values that JSON
cannot represent are sent as their ``str()``. To match a different agent schema, pass any
object with ``serialize(record) -> bytes`` as ``configure_logging(schema=...)``.
"""

from __future__ import annotations

import json
import json.encoder
import time
from collections.abc import Mapping
from typing import Any, Protocol, TypedDict, runtime_checkable

__all__ = [
    "LEVEL_NAMES",
    "KeeperJsonSchema",
    "KeeperLogSchema",
    "LogRecord",
    "format_timestamp",
]

#: structlog level name -> the agent's (.NET ``Microsoft.Extensions.Logging``) level name.
LEVEL_NAMES: Mapping[str, str] = {
    "trace": "Trace",
    "debug": "Debug",
    "info": "Information",
    "warning": "Warning",
    "error": "Error",
    "critical": "Critical",
}


class LogRecord(TypedDict):
    """The framework's internal log record, the input of every schema."""

    timestamp: float
    level: str
    event: str
    logger: str
    job_id: str | None
    job_name: str | None
    exception: str | None
    fields: dict[str, Any]


@runtime_checkable
class KeeperLogSchema(Protocol):
    """Turns one :class:`LogRecord` into the bytes published on ``KeeperLogger``."""

    def serialize(self, event: Mapping[str, Any]) -> bytes:
        """Return the MQTT payload for one record."""
        ...


_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encode_str: Any = getattr(json.encoder, "encode_basestring", None)

_second_cache: list[Any] = [-1, ""]


def format_timestamp(ts: float) -> str:
    """Format epoch seconds as ISO-8601 UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    sec = int(ts)
    ms = int((ts - sec) * 1000)
    cache = _second_cache
    if cache[0] != sec:
        # strftime is the costly part; log bursts share the same second.
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        cache[0] = sec
    return f"{cache[1]}.{ms:03d}Z"


def _fallback(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _jsonable(value: Any) -> Any:
    """Deep-convert ``value`` into something json can encode (slow path only)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _fallback(value)


class KeeperJsonSchema:
    """The default KeeperLogger schema: one JSON document per event (see module docstring)."""

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), default=_fallback
        )
        # The C encoder built once (json.dumps builds one per call). Without the circular
        # check a cycle raises RecursionError, which render() handles on its slow path.
        self._fast: Any = None
        if _c_make_encoder is not None and _encode_str is not None:
            self._fast = _c_make_encoder(
                None, _fallback, _encode_str, None, ":", ",", False, False, True
            )

    def document(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Return the JSON document for one record, as a dict."""
        doc: dict[str, Any] = {
            "timestamp": format_timestamp(event["timestamp"]),
            "level": LEVEL_NAMES.get(event["level"], event["level"]),
            "message": event["event"],
            "jobId": event["job_id"],
            "jobName": event["job_name"],
            "source": event["logger"],
            "properties": event["fields"],
        }
        exc = event.get("exception")
        if exc:
            doc["exception"] = exc
        return doc

    def render(self, event: Mapping[str, Any]) -> str:
        """Return the document as one line of compact JSON text."""
        doc = self.document(event)
        try:
            if self._fast is not None:
                return "".join(self._fast(doc, 0))
            return self._encoder.encode(doc)
        except (TypeError, ValueError, RecursionError):
            # Non-string keys or circular values: never let a log call fail.
            try:
                return self._encoder.encode(_jsonable(doc))
            except RecursionError:
                doc["properties"] = {"repr": repr(doc["properties"])}
                return self._encoder.encode(_jsonable(doc))

    def serialize(self, event: Mapping[str, Any]) -> bytes:
        """Return the UTF-8 JSON payload for one record."""
        return self.render(event).encode("utf-8")
