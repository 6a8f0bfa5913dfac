"""``keeper-task build``: package a task into the binary the agent launches (tooling).

Steps, each shown as one progress line:

1. A build environment: a venv in ``<project>/build/keeper-task/venv`` (reused while its Python
   stays the same) holding only the project, its runtime dependencies and PyInstaller -- never
   the developer's tools: every module a binary carries costs start-up time and size, and
   httpx loads its command-line interface when click and rich are importable. A keeper-task
   installed from a checkout or a local file goes in from that same source
   (:func:`local_keeper_task`): the index may not have it, and the binary carries what was tested.
2. A check that no tooling package got into that environment.
3. PyInstaller, for the OS it runs on (it cannot cross-build), onedir by default, writing
   ``dist/Jobs/bin/<Command>/<Command>[.exe]`` exactly as the agent resolves it.
4. The signing hook (``--sign-command`` or ``KEEPER_TASK_SIGN_COMMAND``), or one line saying the
   binary is unsigned and what that means.
5. A deploy bundle ``dist/<job id>-<os>.tar.gz`` (``.zip`` on Windows): the binary directory,
   the job file for this OS and the deploy scripts.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from keeper_task import scaffold
from keeper_task.errors import KeeperTaskError, SettingsError, UsageError
from keeper_task.exit_codes import ExitCode
from keeper_task.scaffold import check_command, check_job_id, current_os

__all__ = [
    "TOOLING_PACKAGES",
    "BuildError",
    "BuildProject",
    "BuildResult",
    "build_project",
    "load_project",
    "local_keeper_task",
    "make_bundle",
    "unsigned_notice",
]


class BuildError(KeeperTaskError):
    """Packaging a task failed (tooling): build environment, pip, PyInstaller, signing."""

    exit_code = ExitCode.UNCAUGHT_EXCEPTION


#: Distributions that must never be frozen into a task binary unless the project itself
#: depends on them: keeper-task's tooling extras, test tools, and CLI libraries httpx would load.
TOOLING_PACKAGES: frozenset[str] = frozenset(
    {
        "aiohttp",
        "amqtt",
        "click",
        "hypothesis",
        "mypy",
        "psutil",
        "pytest",
        "pytest-timeout",
        "rich",
        "ruff",
        "trustme",
        "typer",
    }
)

# Never imported by a task at run time: excluded so that a stray import cannot drag them in.
_EXCLUDED_MODULES = (
    "keeper_task.build",
    "keeper_task.cli",
    "keeper_task.emulator",
    "keeper_task.scaffold",
    "keeper_task.testing",
    "PyInstaller",
    "_pytest",
    "pytest",
    "tkinter",
)
_DEFAULT_PYINSTALLER_SPEC = "pyinstaller>=6.0"
_HEARTBEAT_SECONDS = 10.0
_TASK_REF_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")

Echo = Callable[[str], None]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _load_toml(path: Path) -> dict[str, Any]:
    # tomllib is 3.11+; on 3.10 the [build] extra brings tomli, the same parser.
    name = "tomllib" if sys.version_info >= (3, 11) else "tomli"
    try:
        parser = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise BuildError(
            f"reading pyproject.toml needs {name}: pip install 'keeper-task[build]'"
        ) from exc
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = parser.load(fh)
    except (OSError, parser.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from exc
    return data


@dataclass(frozen=True)
class BuildProject:
    """A task project as ``keeper-task build`` sees it (from ``[tool.keeper-task]``).

    Attributes:
        root: The project directory.
        job_id: The job id.
        command: The agent's command name.
        task: ``module:Class`` of the Task subclass.
        jobs_dir: Directory holding ``<os>/<job id>.json``.
        dependencies: The project's runtime requirement names (normalised).
        requirements: The project's runtime requirement lines, as written.
    """

    root: Path
    job_id: str
    command: str
    task: str
    jobs_dir: Path
    dependencies: frozenset[str]
    requirements: tuple[str, ...] = ()

    def job_file(self, os_name: str) -> Path:
        """The job file for ``os_name``."""
        return self.jobs_dir / os_name / f"{self.job_id}.json"


def load_project(root: Path) -> BuildProject:
    """Read a project's build settings and check it can be built for this OS.

    Raises:
        UsageError: Not a project directory (no pyproject.toml).
        SettingsError: ``[tool.keeper-task]`` missing or wrong, or no job file for this OS.
    """
    if not root.is_dir():
        raise UsageError(f"project directory {root} does not exist")
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise UsageError(
            f"{root} has no pyproject.toml: run keeper-task build in a project created by "
            "keeper-task new"
        )
    data = _load_toml(pyproject)
    table = data.get("tool", {}).get("keeper-task")
    if not isinstance(table, dict):
        raise SettingsError(
            f"{pyproject} has no [tool.keeper-task] table (job-id, command, task); see "
            "keeper-task new"
        )
    try:
        job_id = check_job_id(str(table["job-id"]))
        command = check_command(str(table["command"]))
        task = str(table["task"])
    except KeyError as exc:
        raise SettingsError(f"[tool.keeper-task] in {pyproject} lacks {exc.args[0]!r}") from exc
    except UsageError as exc:
        raise SettingsError(f"[tool.keeper-task] in {pyproject}: {exc}") from exc
    if not _TASK_REF_RE.match(task):
        raise SettingsError(
            f"[tool.keeper-task] task = {task!r} in {pyproject}: expected 'package.module:Class'"
        )
    jobs_dir = (root / str(table.get("jobs-dir", "jobs"))).resolve()
    if root.resolve() not in jobs_dir.parents:
        raise SettingsError(f"[tool.keeper-task] jobs-dir must lie inside {root}")
    deps = data.get("project", {}).get("dependencies", [])
    names = frozenset(
        _normalize(m.group(0))
        for dep in deps
        if isinstance(dep, str) and (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dep.strip()))
    )
    lines = tuple(dep.strip() for dep in deps if isinstance(dep, str))
    project = BuildProject(root.resolve(), job_id, command, task, jobs_dir, names, lines)
    os_name = current_os()
    job_file = project.job_file(os_name)
    if not job_file.is_file():
        raise SettingsError(
            f"no job file for {os_name} ({job_file}): PyInstaller builds for the OS it runs on; "
            f"add one with keeper-task new --os {os_name} (or copy another OS's file)"
        )
    _check_job(project, job_file)
    return project


def _check_job(project: BuildProject, job_file: Path) -> None:
    try:
        job = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read job file {job_file}: {exc}") from exc
    if not isinstance(job, dict) or job.get("id") != project.job_id:
        raise SettingsError(f"{job_file}: its id must be {project.job_id!r}")
    commands = [t.get("command") for t in job.get("tasks", []) if isinstance(t, dict)]
    if project.command not in commands:
        raise SettingsError(
            f"{job_file}: no task runs command {project.command!r} (found {commands})"
        )


@dataclass(frozen=True)
class BuildResult:
    """What a build produced.

    Attributes:
        os_name: The OS the binary is for (this machine's).
        binary: The executable the agent launches.
        binary_dir: ``dist/Jobs/bin/<Command>``: what is copied under the agent root.
        bundle: The deploy bundle.
        onefile: Whether the binary is one self-extracting file.
        signed: Whether a signing command ran.
        seconds: Wall time of the build.
    """

    os_name: str
    binary: Path
    binary_dir: Path
    bundle: Path
    onefile: bool
    signed: bool
    seconds: float

    @property
    def binary_size(self) -> int:
        """Size of the executable in bytes."""
        return self.binary.stat().st_size

    @property
    def total_size(self) -> int:
        """Size of everything under ``binary_dir`` in bytes."""
        return _tree_size(self.binary_dir)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _pyinstaller_spec() -> str:
    """The PyInstaller requirement: the locally installed version, else our ``[build]`` pin."""
    try:
        return f"pyinstaller=={metadata.version('pyinstaller')}"
    except metadata.PackageNotFoundError:
        pass
    try:
        for req in metadata.requires("keeper-task") or []:
            if req.lower().startswith("pyinstaller") and "extra" in req and "build" in req:
                return req.split(";", 1)[0].strip()
    except metadata.PackageNotFoundError:
        pass
    return _DEFAULT_PYINSTALLER_SPEC


def local_keeper_task(project: BuildProject) -> str | None:
    """The requirement that installs *this* keeper-task into the build environment, if needed.

    When the keeper-task running the build comes from a local checkout or file (an editable
    install, ``pip install /path``: PEP 610 ``direct_url.json`` with a ``file:`` URL), an
    index may not hold that version at all, and the binary should carry the code the task was
    tested with: return ``keeper-task @ <that URL>``. Return ``None`` when keeper-task came
    from an index (the project's own requirement resolves there) or when the project already
    points keeper-task at a direct reference of its own (``keeper-task @ ...``).
    """
    for req in project.requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        if match and _normalize(match.group(0)) == "keeper-task" and "@" in req:
            return None
    try:
        raw = metadata.distribution("keeper-task").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not raw:
        return None
    try:
        url = json.loads(raw).get("url")
    except (ValueError, AttributeError):
        return None
    if not isinstance(url, str) or not url.startswith("file:"):
        return None
    return f"keeper-task @ {url}"


_ERROR_LINE_RE = re.compile(r"^(ERROR|error|[A-Za-z_.]*(Error|Exception))\b")
_FRAME_CHARS = "\u00d7\u2570\u2502"
_NOISE_PREFIXES = ("[notice]", "notice:", "hint:", "note:", "error: subprocess-exited")


def _last_line(log: Path) -> str:
    """The most telling line of a log: the last error line, else the last non-noise line."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    texts = [line.strip() for line in lines if line.strip()]
    # pip frames its sub-process output with box-drawing characters: not a message.
    useful = [t for t in texts if not t.startswith(_NOISE_PREFIXES) and t[0] not in _FRAME_CHARS]
    errors = [t for t in useful if _ERROR_LINE_RE.match(t) and "metadata-generation" not in t]
    pick = errors or useful
    return pick[-1][:300] if pick else ""


def _run_step(
    cmd: list[str],
    *,
    log: Path,
    label: str,
    echo: Echo,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run one long build step with its output in ``log`` and a heartbeat line on ``echo``.

    Raises:
        BuildError: The step could not start or exited non-zero (message names the log).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("ab") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env) if env is not None else None,
            )
        except OSError as exc:
            raise BuildError(f"{label}: cannot start {cmd[0]}: {exc}") from exc
        try:
            while True:
                try:
                    code = proc.wait(timeout=_HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    echo(f"      ... {label}: {elapsed:.0f} s ({_last_line(log)[:90]})")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        raise BuildError(f"{label} failed (exit {code}): {_last_line(log)}; full log: {log}")


def _build_env(py: Path, venv: Path, *, python: str, echo: Echo, log: Path, fresh: bool) -> None:
    marker = venv / "keeper-task-venv.json"
    want = {"python": python, "version": _python_version(python)}
    if venv.exists() and not fresh:
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == want and py.exists():
                echo(f"[1/5] reusing build environment {venv}")
                return
        except (OSError, ValueError):
            pass
    if venv.exists():
        shutil.rmtree(venv)
    echo(f"[1/5] creating build environment {venv}")
    _run_step([python, "-m", "venv", str(venv)], log=log, label="creating the venv", echo=echo)
    marker.write_text(json.dumps(want), encoding="utf-8")


def _python_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version)"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the build Python {python!r}: {exc}") from exc
    return out.stdout.strip()


def _installed(py: Path) -> set[str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps(sorted({d.metadata['Name'] for d in m.distributions()})))"
    )
    out = subprocess.run(
        [str(py), "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise BuildError(f"cannot list the build environment's packages: {out.stderr.strip()}")
    return {_normalize(n) for n in json.loads(out.stdout) if n}


def tooling_found(installed: Iterable[str], allowed: Iterable[str] = ()) -> list[str]:
    """Return the tooling packages in ``installed`` that the project does not depend on."""
    allow = {_normalize(a) for a in allowed}
    return sorted(n for n in {_normalize(i) for i in installed} if n in TOOLING_PACKAGES - allow)


def unsigned_notice(os_name: str) -> str:
    """One line saying the binary is unsigned and what that means on ``os_name``."""
    if os_name == "windows":
        return (
            "note: the binary is unsigned: the agent trusts it when it launches it as a job; "
            "to use MQTT or Plugin Settings outside a job launch, sign it (Authenticode, "
            "--sign-command) and add the thumbprint to Settings:AlternativeSignatures"
        )
    if os_name == "macos":
        return (
            "note: the binary is unsigned: Gatekeeper will block it; sign it with an Apple "
            "Developer ID and notarize it (--sign-command, see the project README)"
        )
    return (
        "note: the binary is unsigned (the agent documents no signing rule on Linux; jobs are "
        "trusted by the PID the agent launches); pass --sign-command to sign anyway"
    )


def _sign(command: str, binary: Path, binary_dir: Path, *, log: Path, echo: Echo) -> None:
    quote = subprocess.list2cmdline if os.name == "nt" else None

    def q(path: Path) -> str:
        return quote([str(path)]) if quote else shlex.quote(str(path))

    line = command.replace("{binary}", q(binary)).replace("{dir}", q(binary_dir))
    echo("[4/5] signing: running --sign-command")
    start = time.monotonic()
    with log.open("ab") as fh:
        fh.write(f"$ {line}\n".encode())
        fh.flush()
        # The command is the user's own, often a pipeline (codesign && notarytool): a shell.
        proc = subprocess.run(line, shell=True, stdout=fh, stderr=subprocess.STDOUT, check=False)  # noqa: S602
    if proc.returncode != 0:
        raise BuildError(
            f"signing failed (exit {proc.returncode}): {_last_line(log)}; full log: {log}"
        )
    echo(f"      signed in {time.monotonic() - start:.1f} s")


def _deploy_scripts(project: BuildProject) -> dict[str, bytes]:
    """The project's deploy scripts, or freshly rendered ones when it has none."""
    scripts: dict[str, bytes] = {}
    for name in ("deploy.sh", "deploy.ps1"):
        path = project.root / "scripts" / name
        if path.is_file():
            scripts[name] = path.read_bytes()
    if len(scripts) == 2:
        return scripts
    module, _, class_name = project.task.partition(":")
    spec = scaffold.ProjectSpec(
        job_id=project.job_id,
        module=module.split(".")[0],
        command=project.command,
        class_name=class_name,
        title=project.job_id,
    )
    rendered = scaffold.project_files(spec)
    for name in ("deploy.sh", "deploy.ps1"):
        if name not in scripts:
            scripts[name] = rendered[PurePosixPath("scripts", name)].encode()
    return scripts


def _bundle_readme(project: BuildProject, os_name: str) -> bytes:
    exe = f"{project.command}.exe" if os_name == "windows" else project.command
    run = (
        ".\\deploy.ps1 -CertificateThumbprint <thumbprint>"
        if os_name == "windows"
        else "sudo ./deploy.sh --cert admin.pem --key admin.key"
    )
    text = (
        f"{project.job_id} for {os_name}\n\n"
        f"Jobs/bin/{project.command}/{exe}  the task binary (copied under the agent root)\n"
        f"{project.job_id}.json  the job definition for {os_name}\n"
        "deploy.sh / deploy.ps1  place the binary, validate, create or update, trigger\n\n"
        f"Deploy on the target machine with the Admin client certificate:\n  {run}\n"
    )
    return text.encode()


def make_bundle(project: BuildProject, os_name: str, binary_dir: Path, out: Path) -> Path:
    """Write the deploy bundle for ``os_name`` into ``out`` and return its path.

    Layout (under one top directory ``<job id>-<os>/``): ``Jobs/bin/<Command>/...``,
    ``<job id>.json``, ``deploy.sh``, ``deploy.ps1``, ``README.txt``.
    """
    top = f"{project.job_id}-{os_name}"
    members: list[tuple[str, Path | bytes, int]] = []
    for path in sorted(binary_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(binary_dir).as_posix()
            mode = path.stat().st_mode & 0o777
            members.append((f"Jobs/bin/{project.command}/{rel}", path, mode))
    members.append((f"{project.job_id}.json", project.job_file(os_name), 0o644))
    for name, data in _deploy_scripts(project).items():
        members.append((name, data, 0o755 if name.endswith(".sh") else 0o644))
    members.append(("README.txt", _bundle_readme(project, os_name), 0o644))

    out.mkdir(parents=True, exist_ok=True)
    suffix = ".zip" if os_name == "windows" else ".tar.gz"
    final = out / f"{top}{suffix}"
    partial = out / f".{top}{suffix}.partial"
    if os_name == "windows":
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, src, mode in members:
                now = time.localtime()
                stamp = (now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)
                info = zipfile.ZipInfo(f"{top}/{name}", date_time=stamp)
                info.external_attr = (0o100000 | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, src.read_bytes() if isinstance(src, Path) else src)
    else:
        with tarfile.open(partial, "w:gz") as tf:
            for name, src, mode in members:
                data = src.read_bytes() if isinstance(src, Path) else src
                entry = tarfile.TarInfo(f"{top}/{name}")
                entry.size = len(data)
                entry.mode = mode
                entry.mtime = int(time.time())
                tf.addfile(entry, io.BytesIO(data))
    partial.replace(final)
    return final


def _entry_script(project: BuildProject, path: Path) -> None:
    module, _, class_name = project.task.partition(":")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'"""PyInstaller entry point of {project.command} (generated by keeper-task build)."""\n'
        f"from {module} import {class_name} as _Task\n\n_Task.main()\n",
        encoding="utf-8",
    )


def _remove_inside(path: Path, parent: Path) -> None:
    resolved = path.resolve()
    if parent.resolve() not in resolved.parents:
        raise BuildError(f"refusing to remove {path}: not inside {parent}")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def build_project(
    root: Path,
    *,
    onefile: bool = False,
    out: Path | None = None,
    sign_command: str | None = None,
    venv: Path | None = None,
    python: str | None = None,
    fresh: bool = False,
    echo: Echo = print,
) -> BuildResult:
    """Build ``root`` into the agent's layout plus a deploy bundle; see the module docstring.

    Args:
        root: The project directory.
        onefile: Build one self-extracting file instead of a directory (slower start).
        out: Output directory (default ``<root>/dist``).
        sign_command: Shell command run on the binary; ``{binary}`` and ``{dir}`` are replaced.
        venv: Build environment directory (default ``<root>/build/keeper-task/venv``).
        python: Interpreter the build environment is made from (default this one).
        fresh: Recreate the build environment.
        echo: Where progress lines go.

    Raises:
        UsageError, SettingsError: The project cannot be built as it is.
        BuildError: A build step failed; the message names its log file.
    """
    start = time.monotonic()
    project = load_project(root)
    os_name = current_os()
    work = project.root / "build" / "keeper-task"
    out_dir = (out if out is not None else project.root / "dist").resolve()
    venv_dir = (venv if venv is not None else work / "venv").resolve()
    logs = work / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    py = _venv_python(venv_dir)
    echo(
        f"building {project.command} for {os_name} only ({'onefile' if onefile else 'onedir'}): "
        "PyInstaller cannot cross-build, build on each OS you deploy to"
    )
    _build_env(
        py, venv_dir, python=python or sys.executable, echo=echo, log=logs / "venv.log", fresh=fresh
    )
    _install_runtime(project, py, venv_dir, logs=logs, echo=echo)
    binary_dir = out_dir / "Jobs" / "bin" / project.command
    binary = _freeze(
        project, py, os_name, binary_dir, out_dir, work=work, onefile=onefile, echo=echo
    )
    sign = sign_command if sign_command is not None else os.environ.get("KEEPER_TASK_SIGN_COMMAND")
    if sign:
        _sign(sign, binary, binary_dir, log=logs / "sign.log", echo=echo)
    else:
        echo("[4/5] " + unsigned_notice(os_name))

    echo("[5/5] writing the deploy bundle")
    bundle = make_bundle(project, os_name, binary_dir, out_dir)
    result = BuildResult(
        os_name, binary, binary_dir, bundle, onefile, bool(sign), time.monotonic() - start
    )
    size = _mb(result.binary_size)
    if not onefile:
        size += f"; directory {_mb(result.total_size)}"
    echo(f"binary: {binary} ({size})")
    echo(f"bundle: {bundle} ({_mb(bundle.stat().st_size)})")
    echo(f"built in {result.seconds:.0f} s")
    return result


def _install_runtime(
    project: BuildProject, py: Path, venv_dir: Path, *, logs: Path, echo: Echo
) -> None:
    """Step 2: the project (runtime dependencies only) and PyInstaller into the build env."""
    pyinstaller = _pyinstaller_spec()
    local = local_keeper_task(project)
    pip_log = logs / "pip.log"
    echo(f"[2/5] installing the project and {pyinstaller} (runtime only; log {pip_log})")
    if local is not None:
        echo(f"      with the keeper-task running this build: {local}")
    try:
        _run_step(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--upgrade-strategy",
                "only-if-needed",
                "--upgrade",
                str(project.root),
                *([local] if local is not None else []),
                pyinstaller,
            ],
            log=pip_log,
            label="pip install",
            echo=echo,
        )
    except BuildError as exc:
        explained = _explain_pip_failure(pip_log, pyinstaller)
        if explained is None:
            raise
        raise explained from exc
    bad = tooling_found(_installed(py), allowed=project.dependencies)
    if bad:
        raise BuildError(
            f"tooling packages got into the build environment: {', '.join(bad)} (pulled in by "
            "the project's dependencies); move them to an optional extra or pass --fresh"
        )
    check = subprocess.run([str(py), "-c", "import PyInstaller"], capture_output=True, check=False)
    if check.returncode != 0:
        raise BuildError(
            f"PyInstaller is missing from the build environment {venv_dir}; pass --fresh to "
            "recreate it"
        )


def _explain_pip_failure(pip_log: Path, pyinstaller: str) -> BuildError | None:
    """A clearer one-line reason for a failed ``pip install`` of step 2, when the log has one."""
    text = pip_log.read_text(encoding="utf-8", errors="replace").lower()
    if "for pyinstaller" in text or "pyinstaller" in _last_line(pip_log).lower():
        return BuildError(
            f"PyInstaller could not be installed into the build environment ({pyinstaller}; "
            f"needs PyPI or a local index): {_last_line(pip_log)}; full log: {pip_log}"
        )
    if "no matching distribution found for keeper-task" in text:
        return BuildError(
            "keeper-task could not be installed into the build environment (not on the "
            "package index): install keeper-task from a checkout or file in the environment "
            "you build from (pip install /path/to/keeper-task), or point the project's "
            f"requirement at it ('keeper-task @ file:///path'); full log: {pip_log}"
        )
    return None


def _freeze(
    project: BuildProject,
    py: Path,
    os_name: str,
    binary_dir: Path,
    out_dir: Path,
    *,
    work: Path,
    onefile: bool,
    echo: Echo,
) -> Path:
    """Step 3: PyInstaller into ``Jobs/bin/<Command>/``; returns the binary's path."""
    exe_name = f"{project.command}.exe" if os_name == "windows" else project.command
    if binary_dir.exists() or binary_dir.is_symlink():
        _remove_inside(binary_dir, out_dir)
    entry = work / "entry" / f"{project.command}_entry.py"
    _entry_script(project, entry)
    cmd = [
        str(py),
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--clean",
        "--log-level",
        "WARN",
        "--name",
        project.command,
        "--distpath",
        str(binary_dir if onefile else binary_dir.parent),
        "--workpath",
        str(work / "pyinstaller"),
        "--specpath",
        str(work),
        "--onefile" if onefile else "--onedir",
    ]
    if os_name == "linux":
        # Measured here: onefile 23 MB -> 13 MB (docs/architecture.md, "Measurements").
        cmd.append("--strip")
    for module in _EXCLUDED_MODULES:
        cmd += ["--exclude-module", module]
    cmd.append(str(entry))
    logs = work / "logs"
    echo(f"[3/5] running PyInstaller (log {logs / 'pyinstaller.log'})")
    _run_step(cmd, log=logs / "pyinstaller.log", label="PyInstaller", echo=echo, cwd=project.root)
    binary = binary_dir / exe_name
    if not binary.is_file():
        raise BuildError(f"PyInstaller finished but {binary} is missing; see {logs}")
    if os_name != "windows":
        binary.chmod(binary.stat().st_mode | 0o755)
    _check_frozen_modules(work / "pyinstaller" / project.command, project.dependencies)
    return binary


_FROZEN_TOOLING_RE = re.compile(
    r"'(?P<name>keeper_task\.(?:build|cli|emulator|scaffold|testing)|[A-Za-z_][\w]*)(?:\.[\w.]*)?'"
)


def _check_frozen_modules(workdir: Path, allowed: Iterable[str]) -> None:
    """Fail when PyInstaller's module list (``PYZ-00.toc``) holds a tooling module."""
    toc = workdir / "PYZ-00.toc"
    if not toc.is_file():
        return
    text = toc.read_text(encoding="utf-8", errors="replace")
    tops = {m.group("name") for m in _FROZEN_TOOLING_RE.finditer(text)}
    allow = {_normalize(a) for a in allowed}
    bad = sorted(
        name
        for name in tops
        if name.startswith("keeper_task.")
        or (_normalize(name) in TOOLING_PACKAGES and _normalize(name) not in allow)
    )
    if bad:
        raise BuildError(
            f"tooling modules were frozen into the binary: {', '.join(bad)} (imported by the "
            f"task or a dependency); see {toc}"
        )
