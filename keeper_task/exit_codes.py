"""The one table of exit codes a task process ends with.

The agent only documents "0 is success, anything else is failure"; the finer codes let an
operator tell *the task failed* (1) apart from each reason the task *could not start*
(64-78, chosen from BSD ``sysexits.h`` where one fits) and from the process being stopped
(124 deadline, 128+N signal N).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of a task process (documented in the README)."""

    #: ``run()`` returned normally.
    SUCCESS = 0
    #: The task ran and failed: ``ctx.fail()`` or :class:`~keeper_task.TaskFailed`.
    TASK_FAILED = 1
    #: Bad command-line arguments (unknown option, missing value, missing
    #: ``--keeper-api-base``); one plain ``PROG: error: ...`` line, never a log record.
    USAGE = 64
    #: The agent answered 404: unknown plugin name (or, for tooling, unknown job id).
    PLUGIN_NOT_FOUND = 68
    #: The agent's HTTPS API could not be reached or gave an unusable answer (refused, TLS
    #: failure, timeout, 5xx past the budget, a malformed body, an unexpected status).
    AGENT_UNREACHABLE = 69
    #: An exception escaped ``setup()``/``run()``/``teardown()``; its traceback is logged.
    UNCAUGHT_EXCEPTION = 70
    #: The MQTT broker could not be reached or refused the connection.
    BROKER_UNAVAILABLE = 75
    #: The agent kept answering 403 past the retry budget: the process is not trusted.
    NOT_TRUSTED = 77
    #: Settings are invalid: environment, task settings, CA bundle (one plain line, found
    #: before the run starts), or the agent's settings map (a ``task.error`` event).
    BAD_SETTINGS = 78
    #: The task's own deadline (``--deadline``) ended the run.
    DEADLINE = 124
    #: Base for "stopped by signal N": the process exits with ``128 + N`` (also when a
    #: third signal or ``Task.stop_grace`` ends it at once; see ``Task``).
    SIGNAL_BASE = 128


def signal_exit_code(signum: int) -> int:
    """Return the exit code for a run stopped by signal ``signum`` (``128 + signum``)."""
    return int(ExitCode.SIGNAL_BASE) + int(signum)
