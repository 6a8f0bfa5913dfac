"""The exception tree of keeper-task.

Every error the framework raises derives from :class:`KeeperTaskError`. Third-party errors
(httpx, paho-mqtt, pydantic) are mapped once, at the module that talks to that library, and
re-raised ``from`` the original so the cause stays in the traceback::

    KeeperTaskError                                                          exit 70
    ├── UsageError                   bad command-line arguments              exit 64
    ├── SettingsError                invalid settings / environment / TLS    exit 78
    ├── AgentError                   the agent's HTTPS API                   exit 69
    │   ├── AgentUnreachableError    connection, TLS, timeout, 5xx           exit 69
    │   │   ├── AgentNotListeningError  connection refused                   exit 69
    │   │   └── AgentTimeoutError    the whole request took too long         exit 69
    │   ├── NotTrustedError          403: the caller is on the wrong tier    exit 77
    │   ├── NotFoundError            404                                     exit 68
    │   │   ├── PluginNotFoundError  unknown plugin name                     exit 68
    │   │   └── JobNotFoundError     unknown job id                          exit 68
    │   ├── RequestRejectedError     4xx other than 403/404                  exit 70
    │   │   └── ValidationFailedError  400 with the agent's ``errors`` array  exit 70
    │   └── AgentResponseError       any other status, or a malformed body   exit 69
    ├── MqttError                    the agent's MQTT broker                 exit 75
    │   ├── BrokerUnavailableError   cannot connect / connection refused     exit 75
    │   ├── MqttNotAvailableError    no MQTT for this run (no KEEPER_JOB_ID) exit 70
    │   ├── TopicNotDeclaredError    publish to a topic the task did not declare  exit 70
    │   └── PublishError             a publish was not acknowledged in time  exit 70
    ├── JobDefinitionError           a job JSON file cannot be read or parsed  exit 78
    ├── EmulatorError                the local agent emulator cannot do it  exit 69
    │                                (tooling: defined in keeper_task.emulator.errors)
    ├── BuildError                   packaging a task failed (pip, PyInstaller) exit 70
    │                                (tooling: defined in keeper_task.build)
    ├── TaskFailed                   ``ctx.fail()``: an expected task failure  exit 1
    ├── DeadlineExceeded             the task's own deadline passed          exit 124
    └── TaskInterrupted              SIGTERM / SIGINT / CTRL_BREAK           exit 128+N

Task code sees only the runtime's errors (exported from :mod:`keeper_task`); deployment's
(``JobDefinitionError``, ``JobNotFoundError``, ``ValidationFailedError``) are exported from
:mod:`keeper_task.jobs`. The tooling errors live next to their tooling, so that this module
stays runtime-only; ``keeper_task.errors.EmulatorError``/``BuildError`` still resolve, with a
``DeprecationWarning``, until 0.3.

``exit_code`` on each class is what :meth:`keeper_task.Task.main` exits with when that
error ends a run; any other exception ends a run with 70 (uncaught).

``DeadlineExceeded`` and ``TaskInterrupted`` name how a run was *stopped* (logged as
``task.stopped``). Inside ``setup()``/``run()`` the stop arrives as a ``BaseException``, like
``KeyboardInterrupt``, so that an ``except Exception`` in task code cannot swallow it: clean
up in ``teardown()`` or in a ``finally`` block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from keeper_task.exit_codes import ExitCode, signal_exit_code

#: Tooling errors that 0.1 defined here: where they live now (the old names go away in 0.3).
_MOVED = {
    "EmulatorError": "keeper_task.emulator.errors",
    "BuildError": "keeper_task.build",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'keeper_task.errors' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"keeper_task.errors.{name} moved to {module}.{name} (the old name goes away in 0.3)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AgentError",
    "AgentNotListeningError",
    "AgentResponseError",
    "AgentTimeoutError",
    "AgentUnreachableError",
    "BrokerUnavailableError",
    "DeadlineExceeded",
    "JobDefinitionError",
    "JobNotFoundError",
    "KeeperTaskError",
    "MqttError",
    "MqttNotAvailableError",
    "NotFoundError",
    "NotTrustedError",
    "PluginNotFoundError",
    "PublishError",
    "RequestRejectedError",
    "SettingsError",
    "TaskFailed",
    "TaskInterrupted",
    "TopicNotDeclaredError",
    "UsageError",
    "ValidationFailedError",
]


class KeeperTaskError(Exception):
    """Base class of every error raised by keeper-task.

    ``str(error)`` is one line an operator can act on: what is wrong and how to fix it.
    """

    exit_code: ClassVar[int] = ExitCode.UNCAUGHT_EXCEPTION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(KeeperTaskError):
    """The command line is wrong (unknown option, missing value, missing base URL)."""

    exit_code = ExitCode.USAGE


class SettingsError(KeeperTaskError):
    """A setting is invalid: a task setting, an environment variable or an agent setting."""

    exit_code = ExitCode.BAD_SETTINGS


class AgentError(KeeperTaskError):
    """A call to the agent's local HTTPS API failed.

    Attributes:
        status_code: The HTTP status, when the agent answered at all.
        url: The URL that was requested.
    """

    exit_code = ExitCode.AGENT_UNREACHABLE

    def __init__(self, message: str, *, status_code: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.url = url


class AgentUnreachableError(AgentError):
    """The agent could not be reached: refused, TLS failure, timeout, or 5xx past retries."""

    exit_code = ExitCode.AGENT_UNREACHABLE


class AgentNotListeningError(AgentUnreachableError):
    """Connection refused: nothing listens on the agent's port (wrong port, or no agent)."""


class AgentTimeoutError(AgentUnreachableError):
    """A request did not finish (connect, TLS, headers and whole body) within its timeout."""


class NotTrustedError(AgentError):
    """The agent answered 403: TLS worked, the caller is not on the endpoint's tier."""

    exit_code = ExitCode.NOT_TRUSTED


class NotFoundError(AgentError):
    """The agent answered 404."""

    exit_code = ExitCode.PLUGIN_NOT_FOUND


class PluginNotFoundError(NotFoundError):
    """``/api/PluginSettings/{name}`` answered 404: no plugin of that name is registered."""

    exit_code = ExitCode.PLUGIN_NOT_FOUND


class JobNotFoundError(NotFoundError):
    """``/api/Jobs/{id}`` answered 404: the agent knows no job with that id."""


class RequestRejectedError(AgentError):
    """The agent answered 4xx (not 403/404): it refused the request as sent.

    The request, not the agent's availability, is at fault (a value the agent rejects, a
    method or content type it does not take), so a task ends with 70 like any other error
    escaping ``run()``, not with 69 ("agent unreachable").
    """

    exit_code = ExitCode.UNCAUGHT_EXCEPTION


class ValidationFailedError(RequestRejectedError):
    """The agent answered 400; ``errors`` holds the agent's error list, if it sent one."""

    def __init__(
        self,
        message: str,
        *,
        errors: Sequence[Any] = (),
        status_code: int | None = 400,
        url: str = "",
    ) -> None:
        super().__init__(message, status_code=status_code, url=url)
        self.errors = list(errors)


class AgentResponseError(AgentError):
    """The agent answered with an unexpected status or a body we could not read."""


class MqttError(KeeperTaskError):
    """Talking to the agent's MQTT broker failed.

    Attributes:
        rc: The paho-mqtt reason code, when there is one.
    """

    exit_code = ExitCode.BROKER_UNAVAILABLE

    def __init__(self, message: str, *, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


class BrokerUnavailableError(MqttError):
    """The broker could not be reached, timed out, or refused the connection."""


class MqttNotAvailableError(MqttError):
    """MQTT is off for this run, typically because the agent set no ``KEEPER_JOB_ID``."""

    exit_code = ExitCode.UNCAUGHT_EXCEPTION


class TopicNotDeclaredError(MqttError):
    """A publish named a topic the task did not declare; the real broker would drop it."""

    exit_code = ExitCode.UNCAUGHT_EXCEPTION


class PublishError(MqttError):
    """A publish was refused or not acknowledged within its timeout."""

    exit_code = ExitCode.UNCAUGHT_EXCEPTION


class JobDefinitionError(KeeperTaskError):
    """A job definition could not be read: missing file, malformed JSON, wrong shape."""

    exit_code = ExitCode.BAD_SETTINGS


class TaskFailed(KeeperTaskError):
    """An expected failure of the task itself; raised by ``ctx.fail()``.

    Attributes:
        exit_code: Chosen by the task author (default 1).
    """

    def __init__(self, message: str, *, exit_code: int = ExitCode.TASK_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # per-instance override of the default


class DeadlineExceeded(KeeperTaskError):
    """The task's own deadline passed before ``run()`` returned (the logged outcome).

    Task code does not see this class raised: see the module docstring.
    """

    exit_code = ExitCode.DEADLINE

    def __init__(self, message: str = "the task's deadline passed before run() returned") -> None:
        super().__init__(message)


class TaskInterrupted(KeeperTaskError):
    """A signal (SIGTERM, SIGINT, CTRL_BREAK) asked the task to stop (the logged outcome).

    Task code does not see this class raised: see the module docstring.

    Attributes:
        signum: The signal number; the process exits with ``128 + signum``.
    """

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"interrupted by {name}")
        self.signum = signum
        self.exit_code = signal_exit_code(signum)  # type: ignore[misc]
