"""Structured logging: structlog events to stderr and to the agent's ``KeeperLogger`` topic.

:func:`configure_logging` sets structlog's global configuration (the only global in the
framework; calling it again replaces it cleanly) and returns a :class:`LogPipeline`:

* every event goes to stderr: a human-readable line on a terminal, one JSON document per
  line otherwise (``fmt="auto"``); ``"console"`` / ``"json"`` force one;
* after :meth:`LogPipeline.attach`, every event is also serialized with the KeeperLogger
  schema (:mod:`keeper_task.log_schema`) and handed to a publish function. Events logged
  before ``attach`` are kept (the last 1,000) and sent first, in order;
* secrets are replaced by ``"[redacted]"`` before either output sees them (:func:`redact`):
  the value of every key that :func:`looks_secret`, in any mapping, sequence, set, pydantic
  model or settings object, dataclass, object attribute or exception, at any depth;
  pydantic fields declared ``repr=False`` or typed ``SecretStr``/``SecretBytes``/``Secret``;
  the fields a :class:`~keeper_task.settings.TaskSettings` lists in ``secret_fields``;
* a failing publish never fails the task: it is counted, and reported once on stderr;
  every event logged before :meth:`LogPipeline.detach` is either handed to the publish
  function or counted as undelivered (:attr:`LogPipeline.undelivered`), also when threads
  log while it detaches or a stop request lands in the pipeline's bookkeeping
  (:func:`defer_until_safe`).

The hot path is kept short (no per-event logger creation, one processor besides the
output stage, the JSON text built once and reused for stderr and MQTT) so that logging costs
little next to the MQTT publish itself; see ``benchmarks/log_throughput.py``.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import dataclasses
import re
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import (
    Callable,
    Iterable,
    Mapping,
    MappingView,
    MutableMapping,
    Sequence,
    Set,
)
from typing import Any, ClassVar, Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from keeper_task.errors import SettingsError
from keeper_task.log_schema import KeeperJsonSchema, KeeperLogSchema, LogRecord, format_timestamp
from keeper_task.signals import start_shielded

__all__ = [
    "LEVELS",
    "MAX_DEPTH",
    "MAX_NODES",
    "REDACTED",
    "KeeperBoundLogger",
    "LogPipeline",
    "configure_logging",
    "critical_section",
    "defer_until_safe",
    "in_critical_section",
    "looks_secret",
    "redact",
    "redact_secrets",
    "redacted_traceback",
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
#: Stands for a container nested deeper than :data:`MAX_DEPTH` (its content is not shown).
TOO_DEEP = "[too deep]"
#: Stands for a container that contains itself (a reference cycle).
CYCLE = "[cycle]"
#: Stands for what is left of a value once :data:`MAX_NODES` items were walked.
TRUNCATED = "[truncated]"
#: Containers nested deeper than this (counted from the logged value) are not shown.
MAX_DEPTH = 16
#: At most this many items are walked per logged value; the rest is not shown.
MAX_NODES = 10_000

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
    """Return True when a field name looks like it holds a secret (cached).

    The name is split at camelCase humps, lower-cased and ``-`` read as ``_``; it is secret
    when it contains password, passwd, secret, token, api_key/apikey, credential,
    authorization/authorisation, cookie or private, ends with ``_key`` or is ``key``. So
    ``api.token``, ``X-Api-Key``, ``accessKey`` and ``db_password`` are secret; ``keyboard``,
    ``monkey`` and ``user`` are not.
    """
    hit = _secret_cache.get(key)
    if hit is None:
        norm = _CAMEL.sub("_", key).lower().replace("-", "_")
        hit = _SECRET_RE.search(norm) is not None
        if len(_secret_cache) > 10_000:  # unbounded key names must not grow memory
            _secret_cache.clear()
        _secret_cache[key] = hit
    return hit


#: Values passed through untouched (the common case: checked first, by exact type).
_SCALARS = frozenset({str, int, float, bool, type(None), bytes, bytearray, complex})
#: Never walked: subclasses of scalars (enums, IntFlag...), classes, modules, functions.
_PLAIN = (
    str,
    int,
    float,
    bytes,
    bytearray,
    complex,
    memoryview,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
)


def _secret_types() -> tuple[type, ...]:
    """pydantic's secret wrappers, when pydantic is loaded (no value can be one otherwise)."""
    pyd = sys.modules.get("pydantic")
    if pyd is None:
        return ()
    found = (getattr(pyd, name, None) for name in ("SecretStr", "SecretBytes", "Secret"))
    return tuple(t for t in found if isinstance(t, type))


def _pydantic_model(value: Any) -> bool:
    pyd = sys.modules.get("pydantic")
    base = getattr(pyd, "BaseModel", None) if pyd is not None else None
    return isinstance(base, type) and isinstance(value, base)


def _key_text(key: Any) -> str | None:
    if isinstance(key, str):
        return key
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", "replace")
    return None


class _Redactor:
    """One walk over one logged value: copies it into plain containers, secrets replaced.

    * any :class:`~collections.abc.Mapping` becomes a ``dict``; the value of every key that
      :func:`looks_secret` becomes ``"[redacted]"``;
    * lists, tuples, sets, frozensets, deques and other sequences are walked (sets become
      lists, tuples stay tuples, a namedtuple becomes a ``dict`` of its fields);
    * pydantic models and settings become a ``dict`` of their fields; a field declared
      ``repr=False``, holding a ``SecretStr``/``SecretBytes``/``Secret`` or with a
      secret-looking name is redacted; extra fields are walked like a mapping;
    * dataclasses become a ``dict`` of their fields (``repr=False`` fields redacted);
    * an exception whose args or attributes hold a secret becomes its text rebuilt from the
      redacted args;
    * any other object is walked through its ``__dict__``/``__slots__``: if a secret is found
      there, it becomes a ``dict`` of its redacted attributes, otherwise it is left as it is
      (and shown as its ``str()``);
    * a value of one of pydantic's secret types is redacted wherever it appears;
    * cycles become ``"[cycle]"``, containers nested deeper than :data:`MAX_DEPTH` become
      ``"[too deep]"``, and after :data:`MAX_NODES` items everything becomes
      ``"[truncated]"``: content that is not walked is never shown.
    """

    __slots__ = ("budget", "hits", "path", "secret_types")

    def __init__(self) -> None:
        self.hits = 0
        self.budget = MAX_NODES
        self.path: set[int] = set()
        self.secret_types = _secret_types()

    def item(self, key: Any, value: Any, depth: int) -> Any:
        text = _key_text(key)
        if text is not None and looks_secret(text):
            self.hits += 1
            return REDACTED
        return self.value(value, depth)

    def value(self, value: Any, depth: int) -> Any:  # noqa: PLR0911 - one return per kind of value, cheapest first
        if type(value) in _SCALARS:
            return value
        if self.secret_types and isinstance(value, self.secret_types):
            self.hits += 1
            return REDACTED
        if isinstance(value, _PLAIN):
            return value  # subclasses of scalars (enums, IntFlag...), classes, functions
        if self.budget < 0:
            self.hits += 1
            return TRUNCATED
        if depth >= MAX_DEPTH:
            self.hits += 1
            return TOO_DEEP
        key = id(value)
        if key in self.path:
            return CYCLE  # its content is shown (or redacted) where the walk first met it
        self.path.add(key)
        try:
            return self._walk(value, depth + 1)
        finally:
            self.path.discard(key)

    def _walk(self, value: Any, depth: int) -> Any:  # noqa: PLR0911 - a type dispatch, one return per container kind
        if isinstance(value, Mapping):
            return self._mapping(value.items(), depth)
        if isinstance(value, tuple):
            names = getattr(type(value), "_fields", None)  # a namedtuple: its field names
            if isinstance(names, tuple) and len(names) == len(value):
                return self._mapping(zip(names, value, strict=True), depth)
            return tuple(self._sequence(value, depth))
        if isinstance(value, (list, set, frozenset, deque, Set, MappingView, Sequence)):
            return self._sequence(cast("Iterable[Any]", value), depth)
        if _pydantic_model(value):
            return self._model(value, depth)
        if dataclasses.is_dataclass(value):
            return self._mapping(
                ((f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)),
                depth,
                hidden={f.name for f in dataclasses.fields(value) if not f.repr},
            )
        if isinstance(value, BaseException):
            return self._exception(value, depth)
        attrs = _attributes(value)
        if not attrs:
            return value
        before = self.hits
        walked = self._mapping(attrs.items(), depth)
        return walked if self.hits > before else value

    def _mapping(
        self, items: Iterable[tuple[Any, Any]], depth: int, hidden: Set[str] = frozenset()
    ) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key, v in items:
            self.budget -= 1
            if self.budget < 0:
                self.hits += 1
                out[TRUNCATED] = TRUNCATED
                break
            if key in hidden:
                self.hits += 1
                out[key] = REDACTED
            else:
                out[key] = self.item(key, v, depth)
        return out

    def _sequence(self, values: Iterable[Any], depth: int) -> list[Any]:
        out: list[Any] = []
        for v in values:
            self.budget -= 1
            if self.budget < 0:
                self.hits += 1
                out.append(TRUNCATED)
                break
            out.append(self.value(v, depth))
        return out

    def _model(self, model: Any, depth: int) -> dict[Any, Any]:
        cls = type(model)
        fields = cls.model_fields
        declared = getattr(cls, "secret_fields", ())
        hidden = {
            name
            for name, info in fields.items()
            if getattr(info, "repr", True) is False
            or (isinstance(declared, (set, frozenset, list, tuple)) and name in declared)
        }
        out = self._mapping(
            ((name, getattr(model, name, None)) for name in fields), depth, hidden=hidden
        )
        extra = getattr(model, "model_extra", None)
        if isinstance(extra, Mapping):
            out.update(self._mapping(extra.items(), depth))
        return out

    def _exception(self, exc: BaseException, depth: int) -> Any:
        before = self.hits
        args = tuple(self.value(a, depth) for a in exc.args)
        for name, v in (_attributes(exc) or {}).items():
            self.item(name, v, depth)
        if self.hits == before:
            return exc  # nothing secret in it: shown as str(exc), as always
        return _exception_text(args)


def _exception_text(args: tuple[Any, ...]) -> str:
    """BaseException.__str__ of (already redacted) args."""
    if not args:
        return ""
    if len(args) == 1:
        return str(args[0])
    return str(args)


def _attributes(value: Any) -> dict[str, Any] | None:
    """An object's instance attributes (``__dict__`` and ``__slots__``), or None."""
    attrs: dict[str, Any] = {}
    try:
        own = vars(value)
    except TypeError:
        own = None
    if isinstance(own, Mapping):
        attrs.update(own)
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__") or name in attrs:
                continue
            try:
                attrs[name] = object.__getattribute__(value, name)
            except AttributeError:
                continue
    return attrs or None


def redact(value: Any) -> Any:
    """Return ``value`` with every secret it holds replaced by ``"[redacted]"``.

    Containers are copied, never mutated; see :class:`_Redactor` for what is walked.
    Never raises: a value whose walk fails is shown as ``<unloggable TypeName>``.
    """
    if type(value) in _SCALARS:
        return value
    try:
        return _Redactor().value(value, 0)
    except Exception:
        return f"<unloggable {type(value).__name__}>"


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace every secret value by ``[redacted]`` (see :func:`redact`).

    The value of a secret-looking key is replaced whole; other values are walked in any
    container (mappings, sequences, sets, pydantic models, dataclasses, objects). The
    caller's containers are copied, never mutated in place.
    """
    cache = _secret_cache
    for key, value in event_dict.items():
        # Inlined cache lookup: this runs for every field of every event.
        hit = cache.get(key)
        if hit is None:
            hit = looks_secret(key)
        if hit:
            event_dict[key] = REDACTED
        elif type(value) not in _SCALARS and key != "exc_info":
            event_dict[key] = redact(value)
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
    text = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    return _redact_traceback(text, exc_info[1])


def _redact_traceback(text: str, exc: BaseException | None) -> str:
    """Replace the message of every exception in the chain that holds a secret."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    group = getattr(builtins, "BaseExceptionGroup", None)
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
        if group is not None and isinstance(current, group):
            todo.extend(getattr(current, "exceptions", ()))
        safe = redact(current)
        if not isinstance(safe, str):
            continue  # nothing secret in it
        try:
            shown = str(current)
        except Exception:  # noqa: S112 - traceback printed "<exception str() failed>"
            continue
        if shown:
            text = text.replace(shown, safe)
    return text


def redacted_traceback(exc: BaseException) -> str:
    """``traceback.format_exception(exc)`` as one string, secrets in messages redacted.

    The message of every exception of the chain (cause, context, group members) whose args
    or attributes hold a secret (see :func:`redact`) is rebuilt from its redacted args.
    """
    return _format_exc(exc) or ""


class _Guard(threading.local):
    """Per-thread state of the pipeline's critical sections."""

    depth = 0
    deferred: Callable[[], None] | None = None
    publishing = False


_guard = _Guard()


def in_critical_section() -> bool:
    """True while the current thread is inside the log pipeline's bookkeeping.

    An asynchronous raise (a signal handler's) landing there could leave an event queued
    twice or not at all; see :func:`defer_until_safe`.
    """
    return _guard.depth > 0


def defer_until_safe(action: Callable[[], None]) -> bool:
    """Run ``action`` when the current thread leaves the pipeline's critical section.

    For a signal handler that raises (a stop request): call this first; when it returns
    True the handler must return without raising, and ``action`` (which raises) runs as
    soon as the bookkeeping is consistent, from the log call that was interrupted. When
    it returns False the thread is not in a critical section: raise at once. Only the
    first action deferred is kept until it ran; later ones are dropped (return True).
    """
    guard = _guard
    if guard.depth <= 0:
        return False
    if guard.deferred is None:
        guard.deferred = action
    return True


def _run_deferred() -> None:
    guard = _guard
    action, guard.deferred = guard.deferred, None
    if action is not None:
        action()


class critical_section:  # lower case: used like a function, ``with critical_section():``
    """Context manager: the body is one of the pipeline's critical sections (re-entrant)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _guard.depth += 1

    def __exit__(self, *exc: object) -> None:
        guard = _guard
        guard.depth -= 1
        if guard.depth == 0 and guard.deferred is not None:
            _run_deferred()


class _Batcher:
    """Collects items and hands them to ``sink`` together, in order.

    Used for two hot spots of a log burst, both of which release the GIL per call and so
    hand it to paho's network thread once per event: stderr writes to a pipe, and MQTT
    publishes. With ``threaded``, items reach the sink from a flusher thread within
    ``interval`` seconds; :meth:`add` asks the caller to :meth:`flush` at once when the item
    is ``urgent`` (warning and above), when ``limit`` are waiting, when the batcher is
    closed, or always when not ``threaded``. The caller flushes outside its own locks.

    :meth:`close` marks the batcher closed *before* its last flush, and the flusher thread
    flushes once more before it ends: an item added at any moment is handed over (a hard
    kill can still lose the last ``interval`` of items).
    """

    def __init__(
        self,
        sink: Callable[[list[Any]], None],
        *,
        name: str,
        interval: float = 0.05,
        limit: int = 512,
        threaded: bool = True,
        shield_sink: bool = False,
    ) -> None:
        self._sink = sink
        self._shield_sink = shield_sink
        self._name = name
        self._interval = interval
        self._limit = limit
        self._threaded = threaded
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()
        # Re-entrant: a sink may log (and so flush) from inside a flush on the same thread.
        self._sink_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._open = True
        if threaded:
            atexit.register(self.flush)

    @property
    def pending(self) -> int:
        """Items added and not yet handed to the sink."""
        return len(self._pending)

    def add(self, item: Any, *, urgent: bool = False) -> bool:
        """Queue ``item``; return True when the caller must call :meth:`flush` now."""
        with self._pending_lock:
            self._pending.append(item)
            if urgent or not self._open or not self._threaded:
                return True
            size = len(self._pending)
            if size >= self._limit:
                return True
            if size == 1:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    start_shielded(self._thread)
                self._wake.set()
        return False

    def extend(self, items: list[Any]) -> None:
        """Queue ``items`` (the caller flushes)."""
        with self._pending_lock:
            self._pending.extend(items)

    def flush(self) -> None:
        """Hand every pending item to the sink now, in order.

        Taking the items and handing them over is one critical section when
        ``shield_sink`` (a stop request waits until the sink returned); otherwise only
        taking them is, so a stop request can cut a blocking sink (a full stderr pipe)
        short, and the items it was given are lost for that sink only.
        """
        with self._sink_lock:
            guard = _guard
            items: list[Any] = []
            write_later = False
            guard.depth += 1
            try:
                with self._pending_lock:
                    items, self._pending = self._pending, []
                if items and self._shield_sink:
                    self._sink(items)
                else:
                    write_later = bool(items)
            finally:
                guard.depth -= 1
                # With items still to write, a deferred stop waits for the write below:
                # raised here, it would drop them.
                if not write_later and guard.depth == 0 and guard.deferred is not None:
                    _run_deferred()
            if write_later:
                try:
                    self._sink(items)
                finally:
                    if guard.depth == 0 and guard.deferred is not None:
                        _run_deferred()

    def close(self) -> None:
        """Stop the flusher thread and hand every pending item over; later items at once."""
        with self._pending_lock:
            was_open, self._open = self._open, False
        if was_open and self._threaded:
            atexit.unregister(self.flush)
            self._wake.set()
        self.flush()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._open:
                # Let the burst accumulate: a bounded delay, not a synchronisation.
                time.sleep(self._interval)
            self._wake.clear()
            self.flush()
            if not self._open:
                # Checked after the clear: a close() during the sleep ends the thread here
                # instead of leaving it waiting forever; close() flushes too.
                return


class _StderrWriter:
    """Writes log lines to a stream; bursts are coalesced on a pipe or file.

    Under the agent stderr is a pipe, and one write per event costs more than the event
    itself. On a terminal, or an in-memory stream, every line is written at once.
    """

    def __init__(self, stream: TextIO, *, coalesce: bool) -> None:
        self._stream = stream
        self._coalesce = coalesce
        self._lock = threading.Lock()
        self._batch = _Batcher(self._write_lines, name="keeper-task-stderr", threaded=coalesce)

    def add(self, line: str, *, urgent: bool = False) -> bool:
        """Queue one line; return True when the caller must :meth:`flush` now."""
        return self._batch.add(line, urgent=urgent)

    def write(self, line: str, *, urgent: bool = False) -> None:
        """Queue one line and write it when it is due."""
        if self._batch.add(line, urgent=urgent):
            self._batch.flush()

    def flush(self) -> None:
        """Write every pending line now."""
        self._batch.flush()

    def close(self) -> None:
        """Flush and stop the flusher thread."""
        self._batch.close()

    def _write_lines(self, lines: list[str]) -> None:
        self._write_now("\n".join(lines) + "\n", flush=self._coalesce)

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

    Every event logged before :meth:`detach` is, for KeeperLogger, either handed to the
    publish function (``published``) or counted in :attr:`undelivered`; events logged after
    :meth:`detach` go to stderr only and are counted in ``after_detach``. So, once no event
    is pending, ``published + undelivered + after_detach`` is the number of events logged.

    Attributes:
        published: Events handed to the publish function (it returned).
        publish_failures: Events whose publish (or serialization) raised (dropped).
        buffer_dropped: Events dropped because the pre-attach buffer was full.
        after_detach: Events logged after :meth:`detach` (stderr only).
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
        self.after_detach = 0
        self._logged = 0  # events logged while not detached
        self._stream = stream
        self._out = _StderrWriter(stream, coalesce=_is_pipe_or_file(stream))
        self._json = KeeperJsonSchema()
        # With the default schema the stderr JSON line *is* the payload: render once.
        self._reuse = type(schema) is KeeperJsonSchema
        # The event column is padded to 30 characters: structlog's default in every version
        # (the keyword naming it changed in 25.5, so it is not passed). The traceback arrives
        # already formatted (and redacted): the plain formatter prints it as it is, and keeps
        # structlog < 25 from warning about a pre-formatted exception.
        self._console = (
            None
            if json_lines
            else structlog.dev.ConsoleRenderer(
                colors=_isatty(stream), exception_formatter=structlog.dev.plain_traceback
            )
        )
        self._lock = threading.RLock()
        self._state: Literal["pending", "attached", "detached"] = "pending"
        self._ever_attached = False
        self._reported_late = 0
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

    @property
    def undelivered(self) -> int:
        """Events logged before :meth:`detach` that did not reach the publish function.

        Publish failures, events dropped from the full pre-attach buffer, events logged
        from inside the publish function (stderr only, no recursion), and events cut off by
        an asynchronous raise (a stop request) while being handed over. Exact when nothing
        is in flight (after :meth:`detach`).
        """
        batch = self._mqtt_batch
        pending = len(self._buffer) + (batch.pending if batch is not None else 0)
        return max(0, self._logged - self.published - pending)

    def attach(self, publish: Callable[[bytes], None], *, batch: bool = False) -> None:
        """Also send every event to ``publish``; buffered events go first, in order.

        Args:
            publish: Called with each serialized event. It must not block for long: a stop
                request is held back while one call runs (see :func:`defer_until_safe`).
            batch: Hand events over in bursts from a flusher thread (within 50 ms; at once
                for warning and above, on :meth:`flush` and on :meth:`detach`). The task
                runtime sets it: one MQTT publish per event as it is logged costs a thread
                switch to paho's network thread each time. Without it, each event is
                published before the log call returns.
        """
        previous = self._mqtt_batch
        if previous is not None:
            previous.close()  # attached again: what the previous publisher has is sent first
        with critical_section(), self._lock:
            queue = _Batcher(
                self._publish_many,
                name="keeper-task-keeperlogger",
                limit=256,
                threaded=batch,
                shield_sink=True,
            )
            payloads = [self._serialize(record, None) for record in self._buffer]
            self._buffer.clear()
            queue.extend([p for p in payloads if p is not None])
            self._publish = publish
            self._mqtt_batch = queue
            self._state = "attached"
            self._ever_attached = True
        queue.flush()
        if self.buffer_dropped:
            self.get_logger("keeper_task.logging").warning(
                "keeper_logger.buffer_overflow",
                dropped=self.buffer_dropped,
                kept=self._buffer_limit,
            )

    def detach(self) -> None:
        """Stop publishing (and stop buffering); stderr output continues.

        Every event logged before the switch is handed to the publish function first (or
        counted in :attr:`undelivered`); when the pipeline was attached and something was not
        delivered, one ``keeper_logger.summary`` warning says how much. Events logged later
        go to stderr only; if there are any, one ``keeper_logger.after_detach`` warning at
        interpreter exit (or at :meth:`report_late`) counts them.
        """
        with critical_section(), self._lock:
            was_attached = self._state == "attached"
            self._state = "detached"  # from here no event enters the queue
            batch = self._mqtt_batch
        if batch is not None:
            batch.close()  # hands over every queued event, outside the pipeline lock
        with critical_section(), self._lock:
            self._mqtt_batch = None
            self._publish = None
            self._buffer.clear()
            if was_attached:
                undelivered = self.undelivered
                if undelivered or self.publish_failures:
                    self._write_direct(
                        "warning",
                        "keeper_logger.summary",
                        {
                            "published": self.published,
                            "undelivered": undelivered,
                            "failed": self.publish_failures,
                            "buffer_dropped": self.buffer_dropped,
                        },
                    )
                self._reported_late = self.after_detach
                atexit.unregister(self._report_late)
                atexit.register(self._report_late)
        self.flush()

    def report_late(self) -> None:
        """Write the ``keeper_logger.after_detach`` line now (if events were logged after
        :meth:`detach`), instead of at interpreter exit.

        For a runtime whose last stderr line must be its own: it calls this just before
        that line. Events logged after this call are still counted in ``after_detach`` but
        no longer reported.
        """
        atexit.unregister(self._report_late)
        self._report_late()

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

    def _emit(  # noqa: C901, PLR0912 - every log call's hot path: one critical section, kept inline
        self, level: str, ev: MutableMapping[str, Any], name: str
    ) -> None:
        record = self._record(level, ev, name)
        urgent = level in _URGENT
        text: str | None = None
        if self.json_lines:
            line = text = self._json.render(record)
        else:
            line = self._render_console(record)
        batch: _Batcher | None = None
        flush_mqtt = False
        # The bookkeeping below is one critical section: a stop request raised in it would
        # leave the event queued on one output and not the other.
        guard = _guard
        guard.depth += 1
        try:
            with self._lock:
                flush_out = self._out.add(line, urgent=urgent)
                state = self._state
                if state == "detached":
                    self.after_detach += 1
                else:
                    self._logged += 1
                    if guard.publishing:
                        pass  # logged from inside the publish function: stderr only
                    elif state == "attached":
                        batch = self._mqtt_batch
                        payload = self._serialize(record, text)
                        if batch is not None and payload is not None:
                            flush_mqtt = batch.add(payload, urgent=urgent)
                    else:
                        if len(self._buffer) >= self._buffer_limit:
                            if self._buffer:
                                self._buffer.popleft()
                            self.buffer_dropped += 1
                        if self._buffer_limit > 0:
                            self._buffer.append(record)
        finally:
            guard.depth -= 1
            if guard.depth == 0 and guard.deferred is not None:
                _run_deferred()
        # The I/O itself, outside the lock: the queues keep the order.
        if flush_out:
            self._out.flush()
        if flush_mqtt and batch is not None:
            batch.flush()

    def _serialize(self, record: LogRecord, text: str | None) -> bytes | None:
        try:
            if text is not None and self._reuse:
                return text.encode("utf-8")
            return self.schema.serialize(record)
        except Exception as exc:
            self._failed(exc)
            return None

    def _publish_many(self, payloads: list[bytes]) -> None:
        # Runs inside the batcher's critical section: a stop request waits until every
        # payload was handed over and counted, so "handed over" and "counted" agree.
        publish = self._publish
        guard = _guard
        for payload in payloads:
            if publish is None:
                self._failed(RuntimeError("the pipeline was detached before this was sent"))
                continue
            guard.publishing = True
            try:
                publish(payload)
            except Exception as exc:
                self._failed(exc)
            else:
                self.published += 1
            finally:
                guard.publishing = False

    def _failed(self, exc: Exception) -> None:
        self.publish_failures += 1
        if self.publish_failures == 1:
            self._write_direct(
                "warning",
                "keeper_logger.publish_failed",
                {
                    "error": f"{type(exc).__name__}: {redact(exc)}",
                    "hint": "log events are not reaching KeeperLogger; "
                    "further failures are counted, not shown",
                },
            )

    def _report_late(self) -> None:
        late = self.after_detach - self._reported_late
        if late > 0:
            self._reported_late = self.after_detach
            self._write_direct(
                "warning",
                "keeper_logger.after_detach",
                {
                    "count": late,
                    "hint": "events logged after the KeeperLogger connection closed "
                    "are on stderr only",
                },
            )
            self._out.flush()

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
