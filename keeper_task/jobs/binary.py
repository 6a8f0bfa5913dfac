"""Where the agent finds a task's binary, per operating system.

The documented layout is ``{AgentRoot}/Jobs/bin/{Command}/{Command}`` (``.exe`` on Windows);
``executablePath`` is the documented alternative when that layout cannot be used. The agent
also searches ``PATH`` at run time; whether its validator accepts a ``PATH``-only binary is
[UNKNOWN], so :func:`resolve_binary` looks there only when asked.
"""

from __future__ import annotations

import ntpath
import os
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keeper_task.jobs.model import JobTask

__all__ = [
    "BUILTIN_COMMANDS",
    "OS_NAMES",
    "binary_candidates",
    "binary_file_name",
    "default_agent_root",
    "expand_path_variables",
    "host_os",
    "is_absolute_path",
    "is_builtin_command",
    "normalize_os",
    "resolve_binary",
]

#: Canonical operating-system names used throughout keeper-task.
OS_NAMES = ("windows", "linux", "macos")

#: Task commands the agent implements itself (no binary on disk). The docs also mention HTTP
#: tasks, whose command name is [UNKNOWN] and therefore not listed.
BUILTIN_COMMANDS = frozenset({"publish-mqtt", "log-message", "echo", "show-toast"})

#: Default agent install roots [doc-example]; confirm with the administrator.
_DEFAULT_ROOTS = {
    "windows": r"C:\Program Files\KeeperPrivilegeManager",
    "linux": "/opt/KeeperPrivilegeManager",
    "macos": "/usr/local/KeeperPrivilegeManager",
}

_OS_ALIASES = {
    "windows": "windows",
    "win": "windows",
    "win32": "windows",
    "nt": "windows",
    "cygwin": "windows",
    "linux": "linux",
    "macos": "macos",
    "mac": "macos",
    "darwin": "macos",
    "osx": "macos",
}

# {approot} is a documented path variable; its exact expansion rules are [inferred].
_APPROOT = re.compile(r"\{approot\}", re.IGNORECASE)


def normalize_os(name: str) -> str:
    """Return ``windows``, ``linux`` or ``macos`` for a loose OS name (``win32``, ``macOS``…).

    Raises:
        ValueError: The name is not one of the agent's three platforms.
    """
    canonical = _OS_ALIASES.get(name.strip().lower())
    if canonical is None:
        raise ValueError(f"unknown OS {name!r}; use one of {', '.join(OS_NAMES)}")
    return canonical


def host_os() -> str:
    """The OS this process runs on, as ``windows``, ``linux`` or ``macos``."""
    if sys.platform.startswith(("win", "cygwin")):
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return "linux"


def default_agent_root(os_name: str | None = None) -> Path:
    """The agent's default install root on ``os_name`` (default: this host).

    ``KEEPER_AGENT_ROOT`` is not read here; the command line applies it.
    """
    return Path(_DEFAULT_ROOTS[normalize_os(os_name) if os_name else host_os()])


def is_builtin_command(command: str) -> bool:
    """True for the agent's built-in task commands, which need no binary."""
    return command.strip().lower() in BUILTIN_COMMANDS


def is_absolute_path(path: str) -> bool:
    """True for an absolute POSIX or Windows path, or one starting with ``{approot}``.

    Both forms are accepted on every host: a Windows job may be validated on Linux.
    """
    if _APPROOT.match(path):
        return True
    if path.startswith("/"):
        return True
    drive, rest = ntpath.splitdrive(path)
    # "C:\x" and "\\server\share\x" are absolute; "C:x" (drive-relative) is not.
    return bool(drive) and (drive.startswith(("\\\\", "//")) or rest.startswith(("\\", "/")))


def expand_path_variables(path: str, agent_root: str | os.PathLike[str] | None) -> str:
    """Replace ``{approot}`` with ``agent_root`` (left as is without a root)."""
    if agent_root is None:
        return path
    root = os.fspath(agent_root).rstrip("/\\")
    # A function replacement is inserted literally (no backslash escapes processed).
    return _APPROOT.sub(lambda _m: root, path)


def binary_file_name(command: str, os_name: str) -> str:
    """The file name of ``command``'s binary on ``os_name`` (``.exe`` on Windows)."""
    return f"{command}.exe" if normalize_os(os_name) == "windows" else command


def _task_fields(task: JobTask | Mapping[str, Any]) -> tuple[str | None, str | None]:
    if isinstance(task, JobTask):
        return task.command, task.executable_path
    lowered = {str(k).lower(): v for k, v in task.items()}
    command = lowered.get("command")
    path = lowered.get("executablepath")
    return (
        command if isinstance(command, str) else None,
        path if isinstance(path, str) else None,
    )


def binary_candidates(
    task: JobTask | Mapping[str, Any],
    agent_root: str | os.PathLike[str] | None,
    current_os: str | None = None,
) -> list[Path]:
    """The paths the agent tries for ``task``'s binary, in its order.

    1. ``<agent_root>/Jobs/bin/<command>/<command>`` (``.exe`` on Windows), when a root is
       given and ``command`` is a bare name;
    2. ``executablePath`` with ``{approot}`` expanded, when it is absolute.
    """
    os_name = normalize_os(current_os) if current_os else host_os()
    command, executable_path = _task_fields(task)
    candidates: list[Path] = []
    if agent_root is not None and command and not re.search(r"[\\/:]", command):
        name = command.strip()
        if name and name not in (".", ".."):
            file_name = binary_file_name(name, os_name)
            candidates.append(Path(agent_root) / "Jobs" / "bin" / name / file_name)
    if executable_path and is_absolute_path(executable_path):
        candidates.append(Path(expand_path_variables(executable_path, agent_root)))
    return candidates


def resolve_binary(
    task: JobTask | Mapping[str, Any],
    agent_root: str | os.PathLike[str] | None,
    current_os: str | None = None,
    *,
    search_path: bool = False,
) -> Path | None:
    """Return the binary the agent would start for ``task``, or None when there is none.

    Args:
        task: The task (a :class:`JobTask` or its JSON object).
        agent_root: The agent's install root; without it only ``executablePath`` is tried.
        current_os: The OS to resolve for (default: this host); decides the ``.exe`` suffix.
        search_path: Also search ``PATH`` for the command, as the agent does at run time.
    """
    for candidate in binary_candidates(task, agent_root, current_os):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # e.g. a name too long for the file system: not there
            continue
    if search_path:
        command, _ = _task_fields(task)
        if command and not re.search(r"[\\/]", command):
            found = shutil.which(command)
            if found is not None:
                return Path(found)
    return None
