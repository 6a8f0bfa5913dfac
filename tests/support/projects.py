"""Helpers for tests that install generated projects or wheels into throwaway venvs.

An *overlay venv* is a venv without pip (created in well under a second) whose site-packages
holds a ``.pth`` file listing this test environment's site-packages: what gets installed into
the overlay shadows the test environment, everything else (httpx, pytest, hatchling, ...) is
still importable. Nothing is ever installed into the shared test environment itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def venv_python(venv: Path) -> Path:
    """The interpreter of ``venv``."""
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def venv_bin(venv: Path) -> Path:
    """The scripts directory of ``venv``."""
    return venv / ("Scripts" if os.name == "nt" else "bin")


def make_overlay_venv(venv: Path, *, include_checkout: bool) -> Path:
    """Create an overlay venv; return its interpreter.

    Args:
        venv: Where to create it.
        include_checkout: Also put this repository on the path (keeper_task from source),
            as an editable install would.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    py = venv_python(venv)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    paths = []
    if include_checkout:
        paths.append(str(REPO_ROOT))
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in paths:
            paths.append(path)
    Path(site, "_keeper_task_test_overlay.pth").write_text("\n".join(paths) + "\n")
    return py


def pip(*args: str | Path) -> None:
    """Run this environment's pip with ``args``; a failure fails the test."""
    subprocess.run([sys.executable, "-m", "pip", *(str(a) for a in args)], check=True, timeout=300)


def pip_install(
    py: Path,
    *targets: str | Path,
    extra: Sequence[str] = (),
    build_isolation: bool = False,
) -> None:
    """Install ``targets`` into the venv of ``py`` with this environment's pip, no deps.

    Args:
        py: The venv's interpreter.
        targets: What to install (wheels, project directories).
        extra: Options placed just before ``targets`` (e.g. ``["--editable"]``).
        build_isolation: Build in an isolated environment (fetches build deps from the index).
    """
    isolation = () if build_isolation else ("--no-build-isolation",)
    pip(
        "--python",
        py,
        "install",
        "--quiet",
        "--no-deps",
        *isolation,
        "--disable-pip-version-check",
        *extra,
        *targets,
    )


def run_captured(
    argv: Sequence[str | Path], *, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``cwd`` with ``env``, capturing text output; the caller checks the code."""
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def env_with_venv(venv: Path) -> dict[str, str]:
    """The current environment with ``venv``'s scripts first on PATH (as if activated)."""
    env = dict(os.environ)
    env["PATH"] = str(venv_bin(venv)) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(venv)
    for name in ("PYTHONPATH", "KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE"):
        env.pop(name, None)
    return env


def fake_onedir_binary(binary_dir: Path, command: str, src: Path, module: str) -> Path:
    """Stand in for a PyInstaller onedir build: ``binary_dir/<command>`` runs the source.

    A shell script that runs ``python -m <module>`` from ``src`` with this interpreter, plus an
    ``_internal/`` file as PyInstaller writes: enough for the deploy scripts and the emulator,
    without the minute a real build takes (the slow test in test_build.py does one).
    """
    (binary_dir / "_internal").mkdir(parents=True, exist_ok=True)
    (binary_dir / "_internal" / "base_library.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    exe = binary_dir / command
    exe.write_text(
        f"#!/bin/sh\nPYTHONPATH='{src}' exec '{sys.executable}' -m {module} \"$@\"\n",
        encoding="utf-8",
    )
    exe.chmod(0o755)
    return exe


def deploy_env(*, with_keeper_task: bool) -> dict[str, str]:
    """Environment for running a deploy script: keeper-task on PATH or not, no agent vars."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEEPER_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    system = [p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir()]
    if with_keeper_task:
        system.insert(0, str(Path(sys.executable).parent))
    env["PATH"] = os.pathsep.join(system)
    return env
