"""The ``Task`` base class: from the agent's launch to ``run(ctx)`` and a clean exit code.

One run, in order (docs/architecture.md, "The data flow of one run"):

1. argv + environment -> the task's :class:`~keeper_task.TaskSettings` (bad input: exit 64/78);
2. logging to stderr (structlog), signal handlers, the optional deadline timer;
3. the TLS policy -> Plugin Settings ``GET /api/PluginSettings/KeeperPrivilegeManager`` with
   the startup-403 retry -> :class:`~keeper_task.AgentSettings`;
4. MQTT to ``broker.host:broker.port`` with a client id built from ``KEEPER_JOB_ID``; from
   then on every log event also goes to ``KeeperLogger``;
5. ``setup(ctx)`` -> ``run(ctx)`` -> ``teardown(ctx)``;
6. on every path: queued QoS 1 messages flushed within ``--mqtt-flush-timeout``, clean
   MQTT disconnect, exit code from :class:`~keeper_task.ExitCode`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import sys
import threading
import time
import traceback
import typing
from collections.abc import Sequence
from types import FrameType
from typing import Any, ClassVar, Generic, NoReturn
from urllib.parse import urlsplit

from typing_extensions import TypeVar

from keeper_task.agent.plugin_settings import PluginSettingsClient
from keeper_task.agent.retry import RetryPolicy
from keeper_task.agent_settings import AgentSettings
from keeper_task.context import TaskContext
from keeper_task.errors import (
    DeadlineExceeded,
    KeeperTaskError,
    SettingsError,
    TaskFailed,
    TaskInterrupted,
    UsageError,
)
from keeper_task.exit_codes import ExitCode
from keeper_task.log_schema import KeeperLogSchema
from keeper_task.logging import (
    LogPipeline,
    configure_logging,
    defer_until_safe,
    redact,
    redacted_traceback,
)
from keeper_task.mqtt import MqttClient, build_client_id
from keeper_task.settings import TaskSettings, parse_settings, program_name
from keeper_task.signals import Canceller, SignalHandlers, defer_stop, start_shielded, stop_boundary
from keeper_task.tls import client_ssl_context, is_loopback_host

__all__ = ["Task"]

S = TypeVar("S", bound=TaskSettings, default=TaskSettings)

#: The agent's log topic; always allowed for a task's own publishes.
KEEPER_LOGGER_TOPIC = "KeeperLogger"


class Task(Generic[S]):
    """Base class of a job task: subclass it, write :meth:`run`, call :meth:`main`.

    Class attributes:
        settings_class: The settings class; inferred from ``Task[MySettings]`` when given.
        publishes: Topics the task publishes besides ``KeeperLogger`` (``{job_id}`` is
            replaced). When set, publishing elsewhere raises at once, because the agent's
            broker would drop it silently. ``None`` (default) checks nothing.
        log_schema: Serializer of ``KeeperLogger`` payloads (default: the documented schema).
        stop_grace: Seconds ``setup()``/``run()``/``teardown()`` may go on after the first
            stop request before the process exits without them (default 10; see below).

    Stopping (SIGTERM, SIGINT, Ctrl-Break on Windows, and ``--deadline``):

    1. The first signal, or the deadline, stops ``setup()``/``run()``: a ``BaseException``
       (like ``KeyboardInterrupt``, so ``except Exception`` does not catch it) is raised at
       the next safe point: normally at once, also inside a blocking call (sleep, socket,
       lock, subprocess wait); never inside a ``__del__`` method, a weakref callback or a
       generator being finalised, where Python would drop it (it is raised in their caller
       when they return), nor inside the framework's own bookkeeping. Until they have
       ended it is raised again every 0.25 s, so code that swallows it (``except
       BaseException: pass``) does not keep them running. ``teardown()`` then runs
       undisturbed, queued messages are flushed within ``--mqtt-flush-timeout``, and the
       exit code is 128+N (124 for the deadline). A C function that holds the GIL
       throughout (one huge ``sum()``) is stopped only when it returns. A first signal
       after ``run()`` has ended only writes a note: teardown and the flush go on and the
       exit code stays.
    2. A second signal raises the stop again if ``setup()``/``run()`` are still running;
       teardown and the flush go on. A note on stderr says what a third one does.
    3. A third signal ends the process at once with the first request's exit code: the
       rest of teardown and of the flush is skipped; the last stderr line counts the MQTT
       messages not acknowledged.

    When ``setup()``/``run()``/``teardown()`` have not ended ``stop_grace`` seconds after the
    first signal or the deadline, the process exits the same way, but after flushing within
    ``--mqtt-flush-timeout``. Notes, step 3 and the grace apply under :meth:`main` only;
    :meth:`execute` (in-process runs) never ends the process.

    Example:
        >>> class Hello(Task):
        ...     def run(self, ctx: TaskContext) -> None:
        ...         ctx.log.info("hello", broker=ctx.agent_settings.broker_host)
    """

    settings_class: ClassVar[type[TaskSettings]] = TaskSettings
    publishes: ClassVar[Sequence[str] | None] = None
    log_schema: ClassVar[KeeperLogSchema | None] = None
    stop_grace: ClassVar[float] = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "settings_class" in cls.__dict__:
            return
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Task:
                (arg,) = typing.get_args(base)
                if isinstance(arg, type) and issubclass(arg, TaskSettings):
                    cls.settings_class = arg

    def setup(self, ctx: TaskContext[S]) -> None:
        """Called before :meth:`run`; when it returns, :meth:`teardown` is guaranteed."""

    def run(self, ctx: TaskContext[S]) -> None:
        """The task's work. Return normally for success; ``ctx.fail()`` for a failure."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(ctx)")

    def teardown(self, ctx: TaskContext[S]) -> None:
        """Called after :meth:`run` on every path (success, failure, signal, deadline)."""

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> NoReturn:
        """Run the task as the process's main program and exit with its exit code."""
        sys.exit(_Run(cls, argv, None, process=True).execute())

    @classmethod
    def execute(cls, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
        """Run the task in this process and return its exit code (never ends the process).

        Args:
            argv: Arguments without the program name; None means ``sys.argv[1:]``.
            prog: Program name for messages; default the script's name.
        """
        return _Run(cls, argv, prog).execute()


#: Seconds between two raises of a stop request that setup()/run() swallowed.
REDELIVER_INTERVAL = 0.25


class _Run:
    """One execution of a task class; owns every resource it opens."""

    def __init__(
        self,
        task_cls: type[Task[Any]],
        argv: Sequence[str] | None,
        prog: str | None,
        *,
        process: bool = False,
    ) -> None:
        self.task_cls = task_cls
        self.argv = argv
        self.prog = prog or _program_name()
        #: Run by main(): a third signal or the stop grace may end the process.
        self.process = process
        self.started = time.monotonic()
        self.pipeline: LogPipeline | None = None
        self.log: Any = None
        self.plugin_client: PluginSettingsClient | None = None
        self.mqtt: MqttClient | None = None
        self.handlers = SignalHandlers(self._on_signal)
        self.canceller: Canceller | None = None
        self.request_lock = threading.RLock()
        #: The first stop request (signal or deadline), if any.
        self.request: KeeperTaskError | None = None
        self.signals = 0
        self.deadline_timer: threading.Timer | None = None
        self.grace_timer: threading.Timer | None = None
        self.deadline_s = 0.0
        self.flush_timeout = 5.0
        self.shutting_down = False
        self.forcing = False
        self.noted = False  # a note was written straight to stderr
        #: The one-line reason of the outcome (the last stderr line of a non-zero exit).
        self.reason = ""

    # --- the run ------------------------------------------------------------------------

    def execute(self) -> int:
        # Only the main thread receives signals; elsewhere re-raises are asynchronous
        # exceptions (in-process runs in a worker thread).
        in_main = threading.current_thread() is threading.main_thread()
        self.canceller = Canceller(
            self._cancelled,
            _Cancelled,
            interval=REDELIVER_INTERVAL,
            kick_signal=signal.SIGINT if in_main else None,
            defer=defer_until_safe,
        )
        try:
            # Handlers before parsing: a signal while arguments are parsed is a clean 128+N.
            self.handlers.install()
            return self._execute()
        except _Cancelled:  # stopped before logging was configured
            error = self._request_error()
            self._say(f"error: {error}")
            return int(error.exit_code)
        finally:
            self.canceller.close()
            self._cancel_timers()
            self.handlers.restore()

    @stop_boundary
    def _execute(self) -> int:
        # A stop is raised only inside the calls below, never between them: the outcome
        # and the shutdown bookkeeping of this frame cannot be cut in half.
        assert self.canceller is not None
        try:
            settings = parse_settings(
                self.task_cls.settings_class,
                self.argv,
                prog=self.prog,
                description=_first_line(self.task_cls.__doc__)
                or f"{self.task_cls.__name__}: a Keeper EPM job task (keeper-task).",
            )
            ssl_context = self._check_before_start(settings)
        except SystemExit as exc:  # --help / --version from argparse
            return int(exc.code or 0) if not isinstance(exc.code, str) else 0
        except (UsageError, SettingsError) as exc:
            # Found before the run starts: one plain line, whatever stderr is.
            self._say(f"error: {exc}")
            return int(exc.exit_code)
        self.pipeline = configure_logging(
            level=settings.log_level,
            fmt=settings.log_format,
            job_id=settings.keeper_job_id,
            job_name=settings.keeper_job_name,
            schema=self.task_cls.log_schema,
        )
        self.log = self.pipeline.get_logger("task", task=self.task_cls.__name__)
        self.flush_timeout = settings.mqtt_flush_timeout
        code: int = ExitCode.UNCAUGHT_EXCEPTION
        try:
            if settings.deadline is not None:
                self._start_deadline(settings.deadline)
            code = self._lifecycle(settings, ssl_context)
        except BaseException as exc:
            self.canceller.close()
            code = self._outcome(exc)
        finally:
            code = self._shutdown(code)
        return code

    @stop_boundary
    def _lifecycle(self, settings: TaskSettings, ssl_context: ssl.SSLContext) -> int:
        # The stop is raised inside _start/setup/run only; close() ends that, first thing
        # on every path out of them, so teardown() and the flush are never interrupted.
        canceller = self.canceller
        assert canceller is not None
        try:
            ctx = self._start(settings, ssl_context)
            task = self.task_cls()
            task.setup(ctx)
        except BaseException:
            canceller.close()
            raise
        try:
            task.run(ctx)
        except BaseException:
            canceller.close()
            self._teardown_after_error(task, ctx)
            raise
        canceller.close()
        # After a successful run, a teardown error is the run's outcome (exit 70).
        task.teardown(ctx)
        if canceller.pending:
            # A stop arrived while run() ran, and run() swallowed it and returned anyway.
            raise _Cancelled()
        self.reason = ""
        self.log.info("task.finished", exit_code=0, duration_s=self._elapsed())
        return ExitCode.SUCCESS

    def _teardown_after_error(self, task: Task[Any], ctx: TaskContext[Any]) -> None:
        """Run teardown after setup/run failed; the run's own outcome wins over its errors."""
        try:
            task.teardown(ctx)
        except Exception as exc:
            self.log.error("task.teardown_failed", error=_one_line(exc), exc_info=exc)

    def _check_before_start(self, settings: TaskSettings) -> ssl.SSLContext:
        """Everything checkable before the run starts; raises UsageError/SettingsError."""
        base = settings.keeper_api_base
        if base is None:
            raise UsageError(
                "missing --keeper-api-base: add `--keeper-api-base={KeeperApiBaseUrl}` to the "
                "job task's arguments (or set KEEPER_API_BASE when running by hand)"
            )
        return client_ssl_context(host=_host_of(base), ca_bundle=settings.ca_bundle)

    def _start(self, settings: TaskSettings, ssl_context: ssl.SSLContext) -> TaskContext[Any]:
        base = settings.keeper_api_base
        assert base is not None
        api_host = _host_of(base)
        if settings.ca_bundle is None:
            self.log.info("tls.unverified_loopback", host=api_host)
        self.plugin_client = PluginSettingsClient(
            base,
            ssl_context=ssl_context,
            timeout=settings.http_timeout,
            retry=RetryPolicy(
                budget=settings.trust_timeout, refused_budget=settings.connect_retry_timeout
            ),
            logger=self.log,
        )
        merged = self.plugin_client.get_all(settings.settings_plugin)
        agent_settings = AgentSettings.from_map(merged)
        self.log.debug("agent.settings_loaded", keys=len(merged))

        mqtt, reason = self._connect_mqtt(settings, agent_settings, ssl_context, api_host)
        return TaskContext(
            settings=settings,
            agent_settings=agent_settings,
            log=self.log,
            plugin_settings=self.plugin_client,
            mqtt=mqtt,
            mqtt_unavailable_reason=reason,
            deadline=(self.started + settings.deadline if settings.deadline is not None else None),
        )

    def _connect_mqtt(
        self,
        settings: TaskSettings,
        agent_settings: AgentSettings,
        api_ssl_context: Any,
        api_host: str,
    ) -> tuple[MqttClient | None, str | None]:
        if not settings.mqtt:
            reason = "MQTT is switched off (--no-mqtt)"
        elif settings.keeper_job_id is None:
            reason = (
                "KEEPER_JOB_ID is not set: the agent sets it only when the job declares "
                "mqttTopics; declare them to use MQTT and KeeperLogger"
            )
        else:
            reason = None
        if reason is not None:
            assert self.pipeline is not None
            self.pipeline.detach()  # stop buffering events for a KeeperLogger that never comes
            self.log.warning("mqtt.disabled", reason=reason)
            return None, reason
        assert settings.keeper_job_id is not None
        client_id = build_client_id(
            settings.mqtt_client_id_template,
            job_id=settings.keeper_job_id,
            job_name=settings.keeper_job_name,
            pid=os.getpid(),
        )
        host, port = agent_settings.broker_host, agent_settings.broker_port
        use_tls = settings.mqtt_tls if settings.mqtt_tls is not None else agent_settings.broker_tls
        ssl_context = None
        if use_tls:
            # One context for HTTPS and MQTT when the policy is the same for both hosts.
            same_policy = settings.ca_bundle is not None or (
                is_loopback_host(host) and is_loopback_host(api_host)
            )
            ssl_context = (
                api_ssl_context
                if same_policy
                else client_ssl_context(host=host, ca_bundle=settings.ca_bundle)
            )
        allowed = self._allowed_publications(settings.keeper_job_id)
        self.mqtt = MqttClient(
            host=host,
            port=port,
            client_id=client_id,
            ssl_context=ssl_context,
            keepalive=settings.mqtt_keepalive,
            connect_timeout=settings.mqtt_connect_timeout,
            allowed_publications=allowed,
            logger=self.log,
        )
        self.mqtt.connect()
        mqtt = self.mqtt
        assert self.pipeline is not None
        self.pipeline.attach(
            lambda data: mqtt.publish(KEEPER_LOGGER_TOPIC, data, qos=1), batch=True
        )
        return mqtt, None

    def _allowed_publications(self, job_id: str) -> list[str] | None:
        declared = self.task_cls.publishes
        if declared is None:
            return None
        return [KEEPER_LOGGER_TOPIC, *(t.replace("{job_id}", job_id) for t in declared)]

    # --- outcomes -----------------------------------------------------------------------

    @defer_stop
    def _outcome(self, exc: BaseException) -> int:
        """The exit code for how the run ended; a stop requested while it ran wins."""
        assert self.canceller is not None
        if self.canceller.pending and not isinstance(exc, _Cancelled):
            # Raised while stopping (a cleanup in a `finally` failed, or the stop was
            # wrapped in another exception): the stop is still what ended the run.
            self.log.warning("task.error_while_stopping", error=_one_line(exc))
            exc = _Cancelled()
        return self._exit_code_for(exc)

    @defer_stop
    def _exit_code_for(self, exc: BaseException) -> int:  # noqa: PLR0911 - one return per row of the exit-code table
        log = self.log
        if isinstance(exc, TaskFailed):
            self.reason = exc.message
            log.error("task.failed", reason=exc.message, exit_code=exc.exit_code)
            return int(exc.exit_code)
        if isinstance(exc, _Cancelled):
            return self._exit_code_for(self._request_error())
        if isinstance(exc, (TaskInterrupted, DeadlineExceeded)):
            self.reason = str(exc)
            log.warning("task.stopped", reason=str(exc), exit_code=exc.exit_code)
            return int(exc.exit_code)
        if isinstance(exc, KeyboardInterrupt):  # raised by hand, or no handler installed
            return self._exit_code_for(TaskInterrupted(signal.SIGINT, "SIGINT"))
        if isinstance(exc, SystemExit):
            code, reason = _system_exit(exc)
            self.reason = reason
            if code == 0:
                log.info("task.exit_requested", exit_code=0)
            else:
                log.error("task.exit_requested", reason=reason, exit_code=code)
            return code
        if isinstance(exc, KeeperTaskError):
            self.reason = exc.message
            log.error(
                "task.error",
                error=type(exc).__name__,
                reason=exc.message,
                exit_code=int(exc.exit_code),
            )
            return int(exc.exit_code)
        # Uncaught: the traceback is logged as its own event, then one line for the operator.
        self.reason = _one_line(exc)
        log.error("task.traceback", traceback=redacted_traceback(exc))
        log.error(
            "task.crashed",
            error=type(exc).__name__,
            reason=self.reason,
            exit_code=int(ExitCode.UNCAUGHT_EXCEPTION),
        )
        return ExitCode.UNCAUGHT_EXCEPTION

    @defer_stop
    def _shutdown(self, code: int) -> int:
        """Flush and close everything; never interrupted by a stop (see Task's docstring)."""
        self.shutting_down = True
        self._cancel_timers()
        said_more = False  # lines written after the outcome's reason
        try:
            lost = 0
            attached = self.pipeline is not None and self.pipeline.attached
            if self.pipeline is not None:
                self.pipeline.detach()  # later events go to stderr only
                said_more = bool(self.pipeline.publish_failures)
            if self.mqtt is not None:
                lost = self.mqtt.disconnect(timeout=self.flush_timeout)
            if self.plugin_client is not None:
                self.plugin_client.close()
            if self.pipeline is not None and attached:
                # Lines the pipeline would write at interpreter exit come now: the last
                # stderr lines stay ours.
                said_more = said_more or self.pipeline.after_detach > 0
                self.pipeline.report_late()
            if lost:
                said_more = True
                self._say(f"warning: {lost} MQTT message(s) were not acknowledged before exit")
        except BaseException as exc:
            said_more = True
            self._say(f"warning: shutdown: {_one_line(exc)}")
        if code != 0 and (said_more or self.noted) and self.reason:
            # Every non-zero exit ends with its one-line reason.
            self._say(f"error: {self.reason}")
        return int(code)

    # --- signals and the deadline -------------------------------------------------------

    def _cancelled(self) -> BaseException:
        return _Cancelled()

    @defer_stop
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        canceller = self.canceller
        if canceller is None:  # not reached: the canceller exists before the handlers
            return
        if canceller.take_kick(signum):  # our own re-delivery, not a new signal
            canceller.deliver(frame)
            return
        name = signal.Signals(signum).name
        with self.request_lock:
            self.signals += 1
            count = self.signals
            if self.request is None:
                self.request = TaskInterrupted(signum, name)
        if count == 1:
            self._start_grace()
            if canceller.closed and self.process:
                self._note(
                    f"note: {name} after run() ended: teardown and the flush go on and the "
                    "exit code stays; a third signal exits at once"
                )
        elif count == 2 and self.process:
            self._note(
                f"note: {name} again: stopping is under way (teardown, then the flush within "
                f"{self.flush_timeout:g} s); a third signal exits at once"
            )
        elif count >= 3:
            self._force_exit(f"a third stop signal ({name}) ended the process at once", flush=False)
        if canceller.request():
            canceller.deliver(frame)

    def _request_error(self) -> KeeperTaskError:
        return self.request if self.request is not None else self._deadline_error()

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"deadline of {self.deadline_s:g} s exceeded")

    def _start_deadline(self, seconds: float) -> None:
        self.deadline_s = seconds

        def fire() -> None:
            with self.request_lock:
                first = self.request is None
                if first:
                    self.request = self._deadline_error()
            if first:
                self._start_grace()
            canceller = self.canceller
            if canceller is not None and canceller.request():
                canceller.kick()  # raised in the task's thread, at its next safe point

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        start_shielded(timer)
        self.deadline_timer = timer

    def _start_grace(self) -> None:
        if self.grace_timer is not None or self.shutting_down:
            return
        grace = float(self.task_cls.stop_grace)
        timer = threading.Timer(grace, self._grace_over, args=(grace,))
        timer.daemon = True
        start_shielded(timer)
        self.grace_timer = timer

    def _grace_over(self, grace: float) -> None:
        if self.shutting_down:
            return
        why = f"setup()/run()/teardown() did not end within {grace:g} s (stop_grace)"
        if not self.process:
            if self.log is not None:
                self.log.error("task.stop_overdue", reason=why)
            return
        self._force_exit(why, flush=True)

    def _cancel_timers(self) -> None:
        for timer in (self.deadline_timer, self.grace_timer):
            if timer is not None:
                timer.cancel()

    def _force_exit(self, why: str, *, flush: bool) -> None:
        """End the process now with the stop's exit code (only when run by main()).

        The work happens in a helper thread, bounded: this may be called from a signal
        handler that interrupted the main thread while it held one of the locks used here.
        """
        if not self.process or self.forcing:
            return
        self.forcing = True
        error = self._request_error()
        code = int(error.exit_code)
        mqtt, pipeline, log = self.mqtt, self.pipeline, self.log
        lost: list[int] = []

        def finish() -> None:
            if log is not None:
                log.error("task.stop_forced", reason=why, exit_code=code)
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()  # os._exit() skips it: the task's own output comes out
            if pipeline is not None:
                pipeline.flush()  # hand pending events to MQTT (and to stderr)
            if mqtt is not None:
                lost.append(mqtt.disconnect(timeout=self.flush_timeout) if flush else mqtt.unacked)

        helper = threading.Thread(target=finish, name="keeper-task-exit", daemon=True)
        start_shielded(helper)
        helper.join(self.flush_timeout + 1.0 if flush else 1.0)
        unacked = lost[0] if lost else (mqtt.unacked if mqtt is not None else 0)
        skipped = "teardown and the flush skipped" if not flush else "teardown skipped"
        self._note(f"error: {error}: {why}; {skipped}; {unacked} MQTT message(s) not acknowledged")
        os._exit(code)

    # --- helpers ------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def _say(self, text: str) -> None:
        if self.pipeline is not None:
            self.pipeline.flush()  # log lines waiting in the pipeline come first
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    def _note(self, text: str) -> None:
        """One line straight to fd 2: safe in a signal handler (no lock of ours or io's)."""
        self.noted = True
        with contextlib.suppress(OSError):
            os.write(2, f"{self.prog}: {text}\n".encode(errors="replace"))


class _Cancelled(BaseException):
    """Ends ``setup()``/``run()`` on a signal or the deadline; the outcome is the run's request.

    A ``BaseException``, like ``KeyboardInterrupt``: an ``except Exception`` in task code, in
    a library it calls, or in the log pipeline must not swallow the request to stop.
    """

    def __init__(self) -> None:
        super().__init__("stop requested (signal or deadline)")


def _system_exit(exc: SystemExit) -> tuple[int, str]:
    """The exit code and one-line reason for ``sys.exit(...)`` called by task code."""
    arg = exc.code
    where = ""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if frames:
        last = frames[-1]
        where = f" at {os.path.basename(last.filename)}:{last.lineno} in {last.name}()"
    if arg is None:
        return 0, ""
    if isinstance(arg, int):
        if 0 <= arg <= 255:
            return arg, f"sys.exit({arg}) called{where}"
        return ExitCode.TASK_FAILED, (
            f"sys.exit({arg}) called{where}: exit codes are 0-255 (the OS would keep "
            f"{arg & 0xFF}), so the task exits 1"
        )
    text = " ".join(str(arg).split()) or repr(arg)
    return ExitCode.TASK_FAILED, f"{text} (sys.exit called{where})"


def _first_line(doc: str | None) -> str | None:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else None


def _program_name() -> str:
    return program_name()  # as invoked: the frozen binary, `python -m pkg`, `python task.py`


def _host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, secrets in the exception's args redacted."""
    shown = redact(exc)  # the redacted message when the args hold a secret, else exc itself
    text = (shown if isinstance(shown, str) else str(exc)).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
