"""The emulator's error (tooling): part of the one :class:`~keeper_task.KeeperTaskError` tree."""

from __future__ import annotations

from keeper_task.errors import KeeperTaskError
from keeper_task.exit_codes import ExitCode

__all__ = ["EmulatorError"]


class EmulatorError(KeeperTaskError):
    """The local agent emulator (tooling) cannot do what was asked.

    Port in use, broker failed to start, task binary not found, unreadable state directory.
    """

    exit_code = ExitCode.AGENT_UNREACHABLE
