"""The ``Task`` base class: from the agent's launch to ``run(ctx)`` and a clean exit code.

One run, in order (see DESIGN.md "Data flow"):

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

import _thread
import contextlib
import os
import signal
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
from keeper_task.logging import LogPipeline, configure_logging
from keeper_task.mqtt import MqttClient, build_client_id
from keeper_task.settings import TaskSettings, parse_settings
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

    A signal or ``--deadline`` stops ``setup()``/``run()`` at the next Python instruction or
    inside a blocking call (sleep, socket, lock, subprocess wait), even under an ``except
    Exception``; a C function that holds the GIL throughout (one huge ``sum()``) is only
    stopped when it returns. ``teardown()`` then runs, and logs are flushed.

    Example:
        >>> class Hello(Task):
        ...     def run(self, ctx: TaskContext) -> None:
        ...         ctx.log.info("hello", broker=ctx.agent_settings.broker_host)
    """

    settings_class: ClassVar[type[TaskSettings]] = TaskSettings
    publishes: ClassVar[Sequence[str] | None] = None
    log_schema: ClassVar[KeeperLogSchema | None] = None

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
        sys.exit(cls.execute(argv))

    @classmethod
    def execute(cls, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
        """Run the task in this process and return its exit code (never calls ``sys.exit``).

        Args:
            argv: Arguments without the program name; None means ``sys.argv[1:]``.
            prog: Program name for messages; default the script's name.
        """
        return _Run(cls, argv, prog).execute()


class _Run:
    """One execution of a task class; owns every resource it opens."""

    def __init__(
        self, task_cls: type[Task[Any]], argv: Sequence[str] | None, prog: str | None
    ) -> None:
        self.task_cls = task_cls
        self.argv = argv
        self.prog = prog or _program_name()
        self.started = time.monotonic()
        self.pipeline: LogPipeline | None = None
        self.log: Any = None
        self.plugin_client: PluginSettingsClient | None = None
        self.mqtt: MqttClient | None = None
        self.deadline_timer: threading.Timer | None = None
        self.deadline_hit = False
        self.deadline_s = 0.0
        self.flush_timeout = 5.0
        self.stopping = False
        self.cancelled: _Cancelled | None = None
        self.old_handlers: dict[int, Any] = {}

    # --- the run ------------------------------------------------------------------------

    def execute(self) -> int:
        # Handlers first: a signal while arguments are parsed is a clean 128+N too.
        self._install_signal_handlers()
        try:
            return self._execute()
        except _Cancelled as exc:  # stopped before logging was configured
            self._say(f"error: {self._error_of(exc)}")
            return int(self._error_of(exc).exit_code)
        finally:
            self._restore_signal_handlers()

    def _execute(self) -> int:
        try:
            settings = parse_settings(
                self.task_cls.settings_class,
                self.argv,
                prog=self.prog,
                description=_first_line(self.task_cls.__doc__)
                or f"{self.task_cls.__name__}: a Keeper EPM job task (keeper-task).",
            )
        except SystemExit as exc:  # --help / --version from argparse
            return int(exc.code or 0) if not isinstance(exc.code, str) else 0
        except (UsageError, SettingsError) as exc:
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
            code = self._lifecycle(settings)
        except BaseException as exc:
            self.stopping = True  # the outcome is decided: later signals must not replace it
            code = self._exit_code_for(exc)
        finally:
            code = self._shutdown(code)
        return code

    def _lifecycle(self, settings: TaskSettings) -> int:
        ctx = self._start(settings)
        task = self.task_cls()
        task.setup(ctx)
        try:
            task.run(ctx)
        except BaseException:
            self._teardown_after_error(task, ctx)
            raise
        # After a successful run, a teardown error is the run's outcome (exit 70).
        task.teardown(ctx)
        if self.cancelled is not None:
            # The task caught the cancellation itself (bare except) and returned anyway.
            raise self.cancelled
        self.log.info("task.finished", exit_code=0, duration_s=self._elapsed())
        return ExitCode.SUCCESS

    def _teardown_after_error(self, task: Task[Any], ctx: TaskContext[Any]) -> None:
        """Run teardown after setup/run failed; the run's own outcome wins over its errors."""
        try:
            task.teardown(ctx)
        except Exception as exc:
            self.log.error("task.teardown_failed", error=_one_line(exc), exc_info=exc)

    def _start(self, settings: TaskSettings) -> TaskContext[Any]:
        base = settings.keeper_api_base
        if base is None:
            raise UsageError(
                "missing --keeper-api-base: add `--keeper-api-base={KeeperApiBaseUrl}` to the "
                "job task's arguments (or set KEEPER_API_BASE when running by hand)"
            )
        api_host = _host_of(base)
        ssl_context = client_ssl_context(host=api_host, ca_bundle=settings.ca_bundle)
        if settings.ca_bundle is None:
            self.log.info("tls.unverified_loopback", host=api_host)
        self.plugin_client = PluginSettingsClient(
            base,
            ssl_context=ssl_context,
            timeout=settings.http_timeout,
            retry=RetryPolicy(budget=settings.trust_timeout),
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

    def _exit_code_for(self, exc: BaseException) -> int:
        log = self.log
        if isinstance(exc, TaskFailed):
            log.error("task.failed", reason=exc.message, exit_code=exc.exit_code)
            return int(exc.exit_code)
        if isinstance(exc, _Cancelled):
            return self._exit_code_for(self._error_of(exc))
        if isinstance(exc, (TaskInterrupted, DeadlineExceeded)):
            log.warning("task.stopped", reason=str(exc), exit_code=exc.exit_code)
            return int(exc.exit_code)
        if isinstance(exc, KeyboardInterrupt):
            if self.deadline_hit:
                return self._exit_code_for(self._deadline_error())
            return self._exit_code_for(TaskInterrupted(signal.SIGINT, "SIGINT"))
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):  # sys.exit("why"): Python would print "why"
                log.error("task.exit_requested", exit_code=code, reason=exc.code)
            else:
                log.info("task.exit_requested", exit_code=code)
            return code
        if isinstance(exc, KeeperTaskError):
            log.error(
                "task.error",
                error=type(exc).__name__,
                reason=exc.message,
                exit_code=int(exc.exit_code),
            )
            return int(exc.exit_code)
        # Uncaught: the traceback is logged as its own event, then one line for the operator.
        log.error("task.traceback", traceback="".join(traceback.format_exception(exc)))
        log.error(
            "task.crashed",
            error=type(exc).__name__,
            reason=_one_line(exc),
            exit_code=int(ExitCode.UNCAUGHT_EXCEPTION),
        )
        return ExitCode.UNCAUGHT_EXCEPTION

    def _shutdown(self, code: int) -> int:
        """Flush and close everything; a second signal during this is ignored."""
        self.stopping = True
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
        try:
            if self.pipeline is not None:
                self.pipeline.detach()  # later events go to stderr only
            if self.mqtt is not None:
                lost = self.mqtt.disconnect(timeout=self.flush_timeout)
                if lost:
                    self._say(f"warning: {lost} MQTT message(s) were not acknowledged before exit")
            if self.plugin_client is not None:
                self.plugin_client.close()
        except BaseException as exc:
            self._say(f"warning: shutdown: {_one_line(exc)}")
        return int(code)

    # --- signals and the deadline -------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (in-process test runs)
        names = ["SIGTERM", "SIGINT", "SIGBREAK"]  # SIGBREAK: CTRL_BREAK_EVENT on Windows
        for name in names:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self.old_handlers[signum] = signal.signal(signum, self._on_signal)
            except (OSError, ValueError):
                continue

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self.old_handlers.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(signum, handler)
        self.old_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return  # already stopping: teardown and the flush must finish
        self.stopping = True
        error: KeeperTaskError
        if self.deadline_hit and signum == signal.SIGINT:
            error = self._deadline_error()
        else:
            error = TaskInterrupted(signum, signal.Signals(signum).name)
        self.cancelled = _Cancelled(error)
        raise self.cancelled

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"deadline of {self.deadline_s:g} s exceeded")

    def _error_of(self, exc: _Cancelled) -> KeeperTaskError:
        if isinstance(exc.error, DeadlineExceeded) and self.deadline_hit:
            return self._deadline_error()
        return exc.error

    def _start_deadline(self, seconds: float) -> None:
        self.deadline_s = seconds
        target = threading.current_thread()
        in_main = target is threading.main_thread() and bool(self.old_handlers)

        def fire() -> None:
            if self.stopping:
                return
            self.deadline_hit = True
            if in_main and hasattr(signal, "pthread_kill"):
                # A real signal aimed at the main thread interrupts blocking calls such as
                # time.sleep(); _thread.interrupt_main() would wait for them to return.
                signal.pthread_kill(target.ident or 0, signal.SIGINT)
            elif in_main:
                _thread.interrupt_main(signal.SIGINT)
            else:
                self.stopping = True
                _raise_in_thread(target, _Cancelled)  # stands for the deadline

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        self.deadline_timer = timer

    # --- helpers ------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def _say(self, text: str) -> None:
        print(f"{self.prog}: {text}", file=sys.stderr, flush=True)


class _Cancelled(BaseException):
    """Ends ``setup()``/``run()`` on a signal or the deadline; ``error`` is the outcome.

    A ``BaseException``, like ``KeyboardInterrupt``: an ``except Exception`` in task code, in
    a library it calls, or in the log pipeline must not swallow the request to stop. Created
    without arguments (an asynchronous raise in a thread), it stands for the deadline.
    """

    def __init__(self, error: KeeperTaskError | None = None) -> None:
        self.error: KeeperTaskError = error if error is not None else DeadlineExceeded()
        super().__init__(str(self.error))


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` asynchronously in ``thread`` (in-process runs off the main thread).

    It takes effect at the thread's next Python bytecode, not inside a blocking C call.
    """
    import ctypes

    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
        )


def _first_line(doc: str | None) -> str | None:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else None


def _program_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "task"
    for suffix in (".py", ".exe"):
        name = name.removesuffix(suffix)
    return name or "task"


def _host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
