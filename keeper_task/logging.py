"""Structured logging: structlog events to stderr and to the agent's ``KeeperLogger`` topic.

:func:`configure_logging` sets structlog's global configuration (the only global in the
framework; calling it again replaces it cleanly) and returns a :class:`LogPipeline`:

* every event goes to stderr: a human-readable line on a terminal, one JSON document per
  line otherwise (``fmt="auto"``); ``"console"`` / ``"json"`` force one;
* after :meth:`LogPipeline.attach`, every event is also serialized with the KeeperLogger
  schema (:mod:`keeper_task.log_schema`) and handed to a publish function. Events logged
  before ``attach`` are kept (the last 1,000) and sent first, in order;
* keys that look secret (password, passwd, secret, token, api_key/apikey, ``*_key``,
  credential, authorization, cookie, private; also inside nested dicts) are replaced by
  ``"[redacted]"`` before either output sees them;
* a failing publish never fails the task: it is counted, and reported once on stderr.

The hot path is kept short (no per-event logger creation, one processor besides the
output stage, the JSON text built once and reused for stderr and MQTT) so that logging costs
little next to the MQTT publish itself; see ``benchmarks/log_throughput.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, ClassVar, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from keeper_task.errors import SettingsError
from keeper_task.log_schema import KeeperJsonSchema, KeeperLogSchema, LogRecord, format_timestamp

__all__ = [
    "LEVELS",
    "REDACTED",
    "KeeperBoundLogger",
    "LogPipeline",
    "configure_logging",
    "looks_secret",
    "redact_secrets",
]

#: Numeric levels; ``trace`` sits below structlog's ``debug``.
LEVELS: Mapping[str, int] = {
    "trace": 5,
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
    "critical": 50,
}
_LEVEL_ALIASES = {
    "information": "info",
    "warn": "warning",
    "fatal": "critical",
    "exception": "error",
}

REDACTED = "[redacted]"

_SECRET_RE = re.compile(
    r"pass(?:word|wd)|secret|token|api_?key|apikey|credential|authori[sz]ation|cookie"
    r"|private|_key$|^key$"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_secret_cache: dict[str, bool] = {}

#: Levels written to stderr at once instead of with the next coalesced burst.
_URGENT = frozenset({"warning", "error", "critical"})

#: Events kept before :meth:`LogPipeline.attach`, by default.
DEFAULT_BUFFER = 1000


def looks_secret(key: str) -> bool:
    """Return True when a field name looks like it holds a secret (cached)."""
    hit = _secret_cache.get(key)
    if hit is None:
        norm = _CAMEL.sub("_", key).lower().replace("-", "_")
        hit = _SECRET_RE.search(norm) is not None
        if len(_secret_cache) > 10_000:  # unbounded key names must not grow memory
            _secret_cache.clear()
        _secret_cache[key] = hit
    return hit


_CONTAINERS = (dict, list, tuple)


def _redact_value(value: Any) -> Any:
    if type(value) is dict:
        return {
            k: REDACTED if isinstance(k, str) and looks_secret(k) else _redact_value(v)
            for k, v in value.items()
        }
    if type(value) in (list, tuple) and any(type(v) is dict for v in value):
        return [_redact_value(v) for v in value]
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace the value of every secret-looking key by ``[redacted]``.

    Nested dicts (and lists of dicts) are copied, never mutated in place.
    """
    cache = _secret_cache
    for key, value in event_dict.items():
        # Inlined cache lookup: this runs for every field of every event.
        hit = cache.get(key)
        if hit is None:
            hit = looks_secret(key)
        if hit:
            event_dict[key] = REDACTED
        elif type(value) in _CONTAINERS:
            event_dict[key] = _redact_value(value)
    return event_dict


def _to_sink(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> Any:
    # Hand the event dict itself to the sink method (no copy, no rendering here).
    return (event_dict,), {}


def _interp(event: Any, args: tuple[Any, ...]) -> Any:
    return event % args if args and isinstance(event, str) else event


class KeeperBoundLogger(structlog.BoundLoggerBase):
    """A structlog bound logger with ``trace`` and level filtering.

    Methods below the configured level return at once without building an event.
    """

    min_level: ClassVar[int] = 0

    def trace(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Trace level (below debug)."""
        if self.min_level > 5:
            return None
        return self._proxy_to_logger("trace", _interp(event, args), **kw)

    def debug(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Debug level."""
        if self.min_level > 10:
            return None
        return self._proxy_to_logger("debug", _interp(event, args), **kw)

    def info(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Information level."""
        if self.min_level > 20:
            return None
        return self._proxy_to_logger("info", _interp(event, args), **kw)

    def warning(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Warning level."""
        if self.min_level > 30:
            return None
        return self._proxy_to_logger("warning", _interp(event, args), **kw)

    warn = warning

    def error(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Error level."""
        if self.min_level > 40:
            return None
        return self._proxy_to_logger("error", _interp(event, args), **kw)

    err = error

    def exception(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Error level with the current exception's traceback."""
        kw.setdefault("exc_info", True)
        return self.error(event, *args, **kw)

    def critical(self, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at Critical level."""
        if self.min_level > 50:
            return None
        return self._proxy_to_logger("critical", _interp(event, args), **kw)

    fatal = critical

    def log(self, level: int | str, event: Any = None, *args: Any, **kw: Any) -> Any:
        """Log at a numeric (``LEVELS``) or named level."""
        name = _level_name(level)
        if LEVELS[name] < self.min_level:
            return None
        return self._proxy_to_logger(name, _interp(event, args), **kw)

    def is_enabled_for(self, level: int | str) -> bool:
        """Return True when events at ``level`` are emitted."""
        return LEVELS[_level_name(level)] >= self.min_level


def _level_name(level: int | str) -> str:
    if isinstance(level, int):
        for name, num in LEVELS.items():
            if num >= level:
                return name
        return "critical"
    name = level.strip().lower()
    name = _LEVEL_ALIASES.get(name, name)
    if name not in LEVELS:
        raise SettingsError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    return name


_Emit = Callable[[str, MutableMapping[str, Any], str], None]


class _Sink:
    """The structlog "logger" at the end of the chain: one method per level."""

    __slots__ = ("_emit", "name")

    def __init__(self, emit: _Emit, name: str = "task") -> None:
        self._emit = emit
        self.name = name

    def trace(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("trace", ev, self.name)

    def debug(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("debug", ev, self.name)

    def info(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("info", ev, self.name)

    def warning(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("warning", ev, self.name)

    def error(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("error", ev, self.name)

    def critical(self, ev: MutableMapping[str, Any]) -> None:
        self._emit("critical", ev, self.name)

    # structlog's stdlib-compatible names, for loggers bound through structlog.get_logger().
    warn = warning
    exception = error
    fatal = critical
    msg = info


def _format_exc(exc_info: Any) -> str | None:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or len(exc_info) != 3 or exc_info[0] is None:
        return None
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


class _Batcher:
    """Collects items and hands them to ``sink`` together, from a flusher thread.

    Used for two hot spots of a log burst, both of which release the GIL per call and so
    hand it to paho's network thread once per event: stderr writes to a pipe, and MQTT
    publishes. Items reach the sink within ``interval`` seconds, at once when ``urgent``
    (warning and above) or when ``limit`` are waiting, and on :meth:`flush` (detach, exit).
    Order is kept. Only a hard kill can lose the last ``interval`` of items.
    """

    def __init__(
        self,
        sink: Callable[[list[Any]], None],
        *,
        name: str,
        interval: float = 0.05,
        limit: int = 512,
    ) -> None:
        self._sink = sink
        self._name = name
        self._interval = interval
        self._limit = limit
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()
        # Re-entrant: a sink may log (and so flush) from inside a flush on the same thread.
        self._sink_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._open = True
        atexit.register(self.flush)

    def add(self, item: Any, *, urgent: bool = False) -> None:
        with self._pending_lock:
            self._pending.append(item)
            size = len(self._pending)
        if urgent or size >= self._limit or not self._open:
            self.flush()
        elif size == 1:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._wake.set()

    def flush(self) -> None:
        """Hand every pending item to the sink now, in order."""
        with self._sink_lock:
            with self._pending_lock:
                items, self._pending = self._pending, []
            if items:
                self._sink(items)

    def close(self) -> None:
        """Flush and stop the flusher thread; later items are handed over at once."""
        self.flush()
        if self._open:
            self._open = False
            atexit.unregister(self.flush)
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._open:
                return
            # Let the burst accumulate: a bounded delay, not a synchronisation.
            time.sleep(self._interval)
            self._wake.clear()
            self.flush()


class _StderrWriter:
    """Writes log lines to a stream; bursts are coalesced on a pipe or file.

    Under the agent stderr is a pipe, and one write per event costs more than the event
    itself. On a terminal, or an in-memory stream, every line is written at once.
    """

    def __init__(self, stream: TextIO, *, coalesce: bool) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._batch = _Batcher(self._write_lines, name="keeper-task-stderr") if coalesce else None

    def write(self, line: str, *, urgent: bool = False) -> None:
        if self._batch is not None:
            self._batch.add(line, urgent=urgent)
        else:
            self._write_now(line + "\n")

    def flush(self) -> None:
        """Write every pending line now."""
        if self._batch is not None:
            self._batch.flush()

    def close(self) -> None:
        """Flush and stop the flusher thread."""
        if self._batch is not None:
            self._batch.close()

    def _write_lines(self, lines: list[str]) -> None:
        self._write_now("\n".join(lines) + "\n", flush=True)

    def _write_now(self, text: str, *, flush: bool = False) -> None:
        # try/except is free on the hot path, contextlib.suppress is not.
        try:
            with self._lock:
                self._stream.write(text)
                if flush:
                    self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or a broken pipe: logging must never end the task.


class LogPipeline:
    """The configured logging outputs; returned by :func:`configure_logging`.

    Attributes:
        published: Events handed to the publish function.
        publish_failures: Events whose publish raised (dropped).
        buffer_dropped: Events dropped because the pre-attach buffer was full.
    """

    def __init__(
        self,
        *,
        level: str,
        json_lines: bool,
        stream: TextIO,
        job_id: str | None,
        job_name: str | None,
        schema: KeeperLogSchema,
        buffer: int,
    ) -> None:
        self.level = level
        self.json_lines = json_lines
        self.job_id = job_id
        self.job_name = job_name
        self.schema = schema
        self.published = 0
        self.publish_failures = 0
        self.buffer_dropped = 0
        self._stream = stream
        self._out = _StderrWriter(stream, coalesce=_is_pipe_or_file(stream))
        self._json = KeeperJsonSchema()
        # With the default schema the stderr JSON line *is* the payload: render once.
        self._reuse = type(schema) is KeeperJsonSchema
        self._console = (
            None
            if json_lines
            else structlog.dev.ConsoleRenderer(colors=_isatty(stream), pad_event_to=30)
        )
        self._lock = threading.RLock()
        self._emitting = False
        self._state: Literal["pending", "attached", "detached"] = "pending"
        self._buffer: deque[LogRecord] = deque()
        self._buffer_limit = buffer
        self._publish: Callable[[bytes], None] | None = None
        self._mqtt_batch: _Batcher | None = None
        self._sink = _Sink(self._emit)
        self._cls = cast(
            "type[KeeperBoundLogger]",
            type("KeeperBoundLogger", (KeeperBoundLogger,), {"min_level": LEVELS[level]}),
        )
        self.processors: list[Processor] = [redact_secrets, _to_sink]

    # -- public API -------------------------------------------------------------------------

    def get_logger(self, name: str = "task", **initial: Any) -> KeeperBoundLogger:
        """Return a bound logger whose events carry ``source=name`` and ``initial`` fields."""
        return self._cls(self._sink, self.processors, {"logger": name, **initial})

    def attach(self, publish: Callable[[bytes], None], *, batch: bool = False) -> None:
        """Also send every event to ``publish``; buffered events go first, in order.

        Args:
            publish: Called with each serialized event.
            batch: Hand events over in bursts from a flusher thread (within 50 ms; at once
                for warning and above, on :meth:`flush` and on :meth:`detach`). The task
                runtime sets it: one MQTT publish per event as it is logged costs a thread
                switch to paho's network thread each time.
        """
        with self._lock:
            self._publish = publish
            if batch and self._mqtt_batch is None:
                self._mqtt_batch = _Batcher(
                    self._publish_many, name="keeper-task-keeperlogger", limit=256
                )
            self._emitting = True
            try:
                while self._buffer:
                    self._send(self._serialize(self._buffer.popleft(), None))
            finally:
                self._emitting = False
            self._state = "attached"
        if self.buffer_dropped:
            self.get_logger("keeper_task.logging").warning(
                "keeper_logger.buffer_overflow",
                dropped=self.buffer_dropped,
                kept=self._buffer_limit,
            )

    def detach(self) -> None:
        """Stop publishing (and stop buffering); stderr output continues."""
        if self._mqtt_batch is not None:
            self._mqtt_batch.close()  # hands over what is pending, then stops its thread
        with self._lock:
            self._mqtt_batch = None
            self._state = "detached"
            self._publish = None
            self._buffer.clear()
            if self.publish_failures:
                self._write_direct(
                    "warning",
                    "keeper_logger.summary",
                    {"published": self.published, "failed": self.publish_failures},
                )
        self.flush()

    def flush(self) -> None:
        """Publish pending events, write pending stderr lines and flush the stream."""
        batch = self._mqtt_batch
        if batch is not None:
            batch.flush()
        self._out.flush()
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def close(self) -> None:
        """Flush and stop the background flushers (the pipeline stays usable)."""
        batch = self._mqtt_batch
        if batch is not None:
            batch.close()
        self._out.close()

    @property
    def attached(self) -> bool:
        """True between :meth:`attach` and :meth:`detach`."""
        return self._state == "attached"

    # -- the output stage -------------------------------------------------------------------

    def _record(self, level: str, ev: MutableMapping[str, Any], name: str) -> LogRecord:
        exc_info = ev.pop("exc_info", None)
        event = ev.pop("event", None)
        return {
            "timestamp": time.time(),
            "level": level,
            "event": "" if event is None else str(event),
            "logger": str(ev.pop("logger", name)),
            "job_id": self.job_id,
            "job_name": self.job_name,
            "exception": _format_exc(exc_info) if exc_info else None,
            "fields": cast("dict[str, Any]", ev),
        }

    def _emit(self, level: str, ev: MutableMapping[str, Any], name: str) -> None:
        record = self._record(level, ev, name)
        with self._lock:
            text: str | None = None
            urgent = level in _URGENT
            if self.json_lines:
                text = self._json.render(record)
                self._out.write(text, urgent=urgent)
            else:
                self._out.write(self._render_console(record), urgent=urgent)
            if self._emitting:
                # An event logged from inside the publish path: stderr only, no recursion.
                return
            state = self._state
            if state == "attached":
                self._emitting = True
                try:
                    self._send(self._serialize(record, text), urgent=urgent)
                finally:
                    self._emitting = False
            elif state == "pending":
                if len(self._buffer) >= self._buffer_limit:
                    self._buffer.popleft()
                    self.buffer_dropped += 1
                self._buffer.append(record)

    def _serialize(self, record: LogRecord, text: str | None) -> bytes | None:
        try:
            if text is not None and self._reuse:
                return text.encode("utf-8")
            return self.schema.serialize(record)
        except Exception as exc:
            self._failed(exc)
            return None

    def _send(self, payload: bytes | None, *, urgent: bool = False) -> None:
        if payload is None or self._publish is None:
            return
        batch = self._mqtt_batch
        if batch is not None:
            batch.add(payload, urgent=urgent)
            return
        try:
            self._publish(payload)
        except Exception as exc:
            self._failed(exc)
        else:
            self.published += 1

    def _publish_many(self, payloads: list[bytes]) -> None:
        publish = self._publish
        for payload in payloads:
            if publish is None:
                self._failed(RuntimeError("the pipeline was detached before this was sent"))
                continue
            try:
                publish(payload)
            except Exception as exc:
                self._failed(exc)
            else:
                self.published += 1

    def _failed(self, exc: Exception) -> None:
        self.publish_failures += 1
        if self.publish_failures == 1:
            self._write_direct(
                "warning",
                "keeper_logger.publish_failed",
                {
                    "error": f"{type(exc).__name__}: {exc}",
                    "hint": "log events are not reaching KeeperLogger; "
                    "further failures are counted, not shown",
                },
            )

    def _write_direct(self, level: str, event: str, fields: dict[str, Any]) -> None:
        record: LogRecord = {
            "timestamp": time.time(),
            "level": level,
            "event": event,
            "logger": "keeper_task.logging",
            "job_id": self.job_id,
            "job_name": self.job_name,
            "exception": None,
            "fields": fields,
        }
        line = self._json.render(record) if self.json_lines else self._render_console(record)
        self._out.write(line, urgent=True)

    def _render_console(self, record: LogRecord) -> str:
        ev: dict[str, Any] = {
            "timestamp": format_timestamp(record["timestamp"]),
            "level": record["level"],
            "event": record["event"],
            "logger": record["logger"],
        }
        ev.update(record["fields"])
        if record["exception"]:
            ev["exception"] = record["exception"]
        assert self._console is not None
        return self._console(None, record["level"], ev)


def _is_pipe_or_file(stream: TextIO) -> bool:
    """True for a stream on a real descriptor that is not a terminal (where writes cost)."""
    try:
        stream.fileno()
    except (AttributeError, ValueError, OSError):
        return False  # in-memory streams (tests) are written at once
    return not _isatty(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


_current: LogPipeline | None = None


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["auto", "console", "json"] = "auto",
    stream: TextIO | None = None,
    job_id: str | None = None,
    job_name: str | None = None,
    schema: KeeperLogSchema | None = None,
    buffer: int = DEFAULT_BUFFER,
) -> LogPipeline:
    """Configure structlog and return the pipeline that owns the outputs.

    Args:
        level: Lowest level emitted: trace, debug, info, warning, error, critical (the .NET
            names such as ``Information`` are accepted too).
        fmt: stderr format; ``auto`` is console on a terminal and JSON lines otherwise.
        stream: Where the human/JSON lines go (default ``sys.stderr``).
        job_id: ``KEEPER_JOB_ID`` for the KeeperLogger payload.
        job_name: ``KEEPER_JOB_NAME`` for the KeeperLogger payload.
        schema: KeeperLogger serializer (default :class:`~keeper_task.log_schema.KeeperJsonSchema`).
        buffer: Events kept before :meth:`LogPipeline.attach` (oldest dropped first).

    Raises:
        SettingsError: Unknown level or format.
    """
    name = _level_name(level)
    if fmt not in ("auto", "console", "json"):
        raise SettingsError(f"unknown log format {fmt!r}; use auto, console or json")
    out = stream if stream is not None else sys.stderr
    json_lines = fmt == "json" or (fmt == "auto" and not _isatty(out))
    pipeline = LogPipeline(
        level=name,
        json_lines=json_lines,
        stream=out,
        job_id=job_id,
        job_name=job_name,
        schema=schema if schema is not None else KeeperJsonSchema(),
        buffer=max(0, buffer),
    )
    emit = pipeline._emit

    def factory(*args: Any) -> _Sink:
        # structlog.get_logger("name") passes the name here: it becomes the event's source.
        return _Sink(emit, str(args[0])) if args and args[0] else pipeline._sink

    global _current  # noqa: PLW0603 - part of the one global: the logging configuration
    if _current is not None:
        _current.close()  # its pending lines are written; its flusher thread ends
    _current = pipeline
    structlog.reset_defaults()
    structlog.configure(
        processors=pipeline.processors,
        wrapper_class=pipeline._cls,
        logger_factory=factory,
        context_class=dict,
        # Not cached: module-level structlog.get_logger() proxies must follow a
        # reconfiguration (tests); LogPipeline.get_logger() loggers are direct and fast.
        cache_logger_on_first_use=False,
    )
    return pipeline
