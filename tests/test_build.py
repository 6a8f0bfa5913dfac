"""Tests of ``keeper-task build`` (keeper_task.build, keeper_task.cli.build)."""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from keeper_task import build, scaffold
from keeper_task.cli import main as cli_main
from tests.support.projects import REPO_ROOT


def _project(tmp_path: Path, name: str = "demo-task", **kwargs: Any) -> Path:
    spec = scaffold.make_spec(
        name, keeper_task_spec=f"keeper-task @ {REPO_ROOT.as_uri()}", **kwargs
    )
    root = tmp_path / name
    scaffold.create_project(spec, root)
    return root


def _build_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli_main(["build", *argv])
    return code, capsys.readouterr().err


def test_directory_without_pyproject_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Building a directory that is not a project fails with one line and exit 64."""
    code, err = _build_cli(capsys, str(tmp_path))
    assert code == 64
    assert len(err.strip().splitlines()) == 1 and "no pyproject.toml" in err


def test_project_without_keeper_task_table_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pyproject without [tool.keeper-task] is a settings error naming the table."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    code, err = _build_cli(capsys, str(tmp_path))
    assert code == 78 and "[tool.keeper-task]" in err


def test_project_without_a_job_for_this_os_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyInstaller builds for this OS only: no job file for it is a clear error."""
    other = next(o for o in scaffold.OS_NAMES if o != scaffold.current_os())
    root = _project(tmp_path, oses=[other])
    code, err = _build_cli(capsys, str(root))
    assert code == 78
    assert f"no job file for {scaffold.current_os()}" in err and "--os" in err


def test_job_file_must_run_the_command(tmp_path: Path) -> None:
    """A job whose task runs another command is refused before anything is built."""
    root = _project(tmp_path)
    job_file = root / "jobs" / scaffold.current_os() / "demo-task.json"
    data = json.loads(job_file.read_text())
    data["tasks"][0]["command"] = "Other"
    job_file.write_text(json.dumps(data))
    with pytest.raises(build.SettingsError, match="no task runs command 'DemoTask'"):
        build.load_project(root)


def test_tooling_packages_are_detected_unless_the_project_needs_them() -> None:
    """amqtt/pytest/click in the build env are flagged; a declared psutil is allowed."""
    found = build.tooling_found(["httpx", "amqtt", "Pytest", "click", "psutil"], ["psutil"])
    assert found == ["amqtt", "click", "pytest"]
    assert build.tooling_found(["httpx", "paho-mqtt", "structlog", "pydantic-settings"]) == []


@pytest.mark.parametrize("os_name", ["windows", "linux", "macos"])
def test_unsigned_notice_says_what_it_means(os_name: str) -> None:
    """The unsigned notice is one line naming the platform's signing consequence."""
    text = build.unsigned_notice(os_name)
    assert "\n" not in text and "unsigned" in text
    expected = {"windows": "AlternativeSignatures", "macos": "notarize", "linux": "PID"}
    assert expected[os_name] in text


@pytest.mark.parametrize("os_name", ["linux", "windows"])
def test_bundle_holds_binary_job_and_deploy_scripts(tmp_path: Path, os_name: str) -> None:
    """The bundle is named after the OS and holds the binary dir, the job and both scripts."""
    root = _project(tmp_path, oses=[os_name])
    binary_dir = tmp_path / "dist" / "Jobs" / "bin" / "DemoTask"
    (binary_dir / "_internal").mkdir(parents=True)
    exe = "DemoTask.exe" if os_name == "windows" else "DemoTask"
    (binary_dir / exe).write_bytes(b"\x7fELF fake")
    (binary_dir / exe).chmod(0o755)
    (binary_dir / "_internal" / "lib.so").write_bytes(b"lib")
    project = build.BuildProject(
        root=root,
        job_id="demo-task",
        command="DemoTask",
        task="demo_task.task:DemoTask",
        jobs_dir=root / "jobs",
        dependencies=frozenset(),
    )
    bundle = build.make_bundle(project, os_name, binary_dir, tmp_path / "dist")
    top = f"demo-task-{os_name}"
    if os_name == "windows":
        assert bundle.name == f"{top}.zip"
        with zipfile.ZipFile(bundle) as zf:
            names = set(zf.namelist())
            job = json.loads(zf.read(f"{top}/demo-task.json"))
    else:
        assert bundle.name == f"{top}.tar.gz"
        with tarfile.open(bundle) as tf:
            names = set(tf.getnames())
            job = json.load(tf.extractfile(f"{top}/demo-task.json"))  # type: ignore[arg-type]
            assert tf.getmember(f"{top}/Jobs/bin/DemoTask/DemoTask").mode & 0o111
            assert tf.getmember(f"{top}/deploy.sh").mode & 0o111
    assert {
        f"{top}/Jobs/bin/DemoTask/{exe}",
        f"{top}/Jobs/bin/DemoTask/_internal/lib.so",
        f"{top}/demo-task.json",
        f"{top}/deploy.sh",
        f"{top}/deploy.ps1",
        f"{top}/README.txt",
    } <= names
    assert job["osFilter"][{"windows": "windows", "linux": "linux"}[os_name]] is True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_onedir_and_run_the_binary_under_the_emulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scaffolded task builds (isolated venv, PyInstaller onedir) and its binary passes.

    The one real build of the suite: it needs PyPI (CI has it) for the build environment.
    """
    from keeper_task.emulator import Emulator
    from keeper_task.testing import run_task

    root = _project(tmp_path)
    code = cli_main(["build", str(root), "--sign-command", "touch {dir}/signed.marker"])
    out = capsys.readouterr().out
    assert code == 0, out
    os_name = scaffold.current_os()
    exe = "DemoTask.exe" if os_name == "windows" else "DemoTask"
    binary = root / "dist" / "Jobs" / "bin" / "DemoTask" / exe
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert (binary.parent / "_internal").is_dir()  # onedir
    assert (binary.parent / "signed.marker").is_file()  # the signing hook ran on this dir
    assert f"binary: {binary}" in out and "MB" in out
    assert "cannot cross-build" in out
    suffix = ".zip" if os_name == "windows" else ".tar.gz"
    assert (root / "dist" / f"demo-task-{os_name}{suffix}").is_file()
    # The build environment holds the runtime packages only.
    installed = build._installed(build._venv_python(root / "build" / "keeper-task" / "venv"))
    assert {"httpx", "paho-mqtt", "structlog", "pydantic-settings", "demo-task"} <= installed
    assert build.tooling_found(installed) == []

    job = root / "jobs" / os_name / "demo-task.json"
    with Emulator() as agent:
        result = run_task(agent, binary, job=job)
    assert result.exit_code == 0, result.stderr
    assert "demo_task.finished" in result.messages
    events = [m.json() for m in result.publishes if m.topic == "Jobs/demo-task/events"]
    assert events and events[-1]["event"] == "finished"
