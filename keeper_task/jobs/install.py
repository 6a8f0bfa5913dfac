"""Place a task binary where the agent looks for it: ``<agent root>/Jobs/bin/<Command>/``.

Idempotent: files whose content is already in place are not touched, so deploying the same
build twice changes nothing. A single file (PyInstaller onefile) is installed as
``<Command>`` (``<Command>.exe`` on Windows); a directory (PyInstaller onedir) is copied
file by file and must hold that executable at its top. Files left over from an older build
are not deleted (they may belong to the administrator); they are counted in the result.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from keeper_task.errors import SettingsError, UsageError
from keeper_task.jobs.binary import binary_file_name, host_os, normalize_os

__all__ = ["InstallResult", "install_binary"]


@dataclass
class InstallResult:
    """What :func:`install_binary` did.

    Attributes:
        action: ``installed`` (new), ``updated`` (some files changed) or ``unchanged``.
        executable: The installed executable the agent will start.
        changed: Destination files written (content or permissions).
        stale: Destination files not present in the source (left in place).
    """

    action: str
    executable: Path
    changed: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)


def install_binary(
    source: str | os.PathLike[str],
    agent_root: str | os.PathLike[str],
    command: str,
    *,
    os_name: str | None = None,
) -> InstallResult:
    """Copy ``source`` (a file or a onedir directory) to ``<agent_root>/Jobs/bin/<command>/``.

    Args:
        source: The built binary, or the directory holding it and its libraries.
        agent_root: The agent's install root; it must exist.
        command: The task's ``command`` (bare name); names the folder and the executable.
        os_name: Target OS (default: this host): ``.exe`` suffix and the executable bit.

    Raises:
        UsageError: ``source`` is missing, or a directory without the executable.
        SettingsError: The agent root is missing, or a file cannot be written.
    """
    target_os = normalize_os(os_name) if os_name else host_os()
    src = Path(source)
    root = Path(agent_root)
    exe_name = binary_file_name(command, target_os)
    if not root.is_dir():
        raise SettingsError(
            f"agent root {root} is not a directory; pass --agent-root (or KEEPER_AGENT_ROOT) "
            "with the agent's install directory"
        )
    dest_dir = root / "Jobs" / "bin" / command
    if src.is_file():
        pairs = [(src, dest_dir / exe_name)]
    elif src.is_dir():
        if not (src / exe_name).is_file():
            raise UsageError(
                f"--binary directory {src} has no {exe_name} at its top; pass the folder "
                f"PyInstaller made for the command (dist/{command})"
            )
        pairs = sorted(
            (file, dest_dir / file.relative_to(src)) for file in src.rglob("*") if file.is_file()
        )
    else:
        raise UsageError(f"--binary {src} does not exist; build the task first")
    executable = dest_dir / exe_name
    existed = executable.is_file()
    changed: list[Path] = []
    try:
        for file, dest in pairs:
            if _copy_if_different(file, dest):
                changed.append(dest)
        posix = target_os != "windows" and host_os() != "windows"
        if posix and _make_executable(executable) and executable not in changed:
            changed.append(executable)
        wanted = {dest for _, dest in pairs}
        stale = sorted(p for p in dest_dir.rglob("*") if p.is_file() and p not in wanted)
    except OSError as exc:
        raise SettingsError(
            f"cannot install the binary into {dest_dir}: {exc.strerror or exc}; run with rights "
            "to write there (root/Administrator) or pass --agent-root"
        ) from exc
    action = "installed" if not existed else ("updated" if changed else "unchanged")
    return InstallResult(action=action, executable=executable, changed=changed, stale=stale)


def _copy_if_different(source: Path, dest: Path) -> bool:
    """Atomically replace ``dest`` with ``source`` unless the content is the same."""
    if dest.is_file() and filecmp.cmp(source, dest, shallow=False):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy beside the destination, then rename: the agent never sees a half-written binary.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def _make_executable(path: Path) -> bool:
    """Add read/execute for everyone (the agent's service account); True if it changed."""
    mode = path.stat().st_mode
    wanted = mode | stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
    wanted |= stat.S_IROTH | stat.S_IXOTH
    if wanted == mode:
        return False
    path.chmod(stat.S_IMODE(wanted))
    return True
