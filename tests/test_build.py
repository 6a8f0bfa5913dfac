"""Tests of ``keeper-task build`` (keeper_task.build, keeper_task.cli.build)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from keeper_task import build, scaffold
from keeper_task.cli import main as cli_main
from tests.support.projects import REPO_ROOT, deploy_env, fake_onedir_binary


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


class _FakeDist:
    def __init__(self, direct_url: str | None) -> None:
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        return self.direct_url if name == "direct_url.json" else None


def _project_with(requirements: tuple[str, ...]) -> build.BuildProject:
    return build.BuildProject(
        root=Path("/p"),
        job_id="demo-task",
        command="DemoTask",
        task="demo_task.task:DemoTask",
        jobs_dir=Path("/p/jobs"),
        dependencies=frozenset({"keeper-task"}),
        requirements=requirements,
    )


@pytest.mark.parametrize(
    ("direct_url", "requirements", "expected"),
    [
        # Editable checkout: the index may not have it; the binary gets the tested code.
        (
            '{"url": "file:///src/keeper-task", "dir_info": {"editable": true}}',
            ("keeper-task>=0.1",),
            "keeper-task @ file:///src/keeper-task",
        ),
        # A local wheel file.
        (
            '{"url": "file:///w/keeper_task-0.1.0-py3-none-any.whl", "archive_info": {}}',
            ("keeper-task",),
            "keeper-task @ file:///w/keeper_task-0.1.0-py3-none-any.whl",
        ),
        # From an index: the project's own requirement resolves there.
        (None, ("keeper-task>=0.1",), None),
        # From a VCS/remote URL: not a local source.
        ('{"url": "https://example.invalid/kt.whl", "archive_info": {}}', ("keeper-task",), None),
        # The project pins its own direct reference: never add a second one.
        (
            '{"url": "file:///src/keeper-task", "dir_info": {}}',
            ("keeper_task @ file:///elsewhere",),
            None,
        ),
    ],
)
def test_build_environment_gets_the_local_keeper_task(
    monkeypatch: pytest.MonkeyPatch,
    direct_url: str | None,
    requirements: tuple[str, ...],
    expected: str | None,
) -> None:
    """A keeper-task installed from a checkout or file goes into the build env as that URL."""
    monkeypatch.setattr(build.metadata, "distribution", lambda _name: _FakeDist(direct_url))
    assert build.local_keeper_task(_project_with(requirements)) == expected


def test_load_project_keeps_the_requirement_lines(tmp_path: Path) -> None:
    """``load_project`` records the project's requirement lines as written."""
    root = _project(tmp_path)
    project = build.load_project(root)
    assert project.requirements == (f"keeper-task @ {REPO_ROOT.as_uri()}",)
    assert build.local_keeper_task(project) is None


def test_frozen_tooling_modules_fail_the_build(tmp_path: Path) -> None:
    """PyInstaller's module list holding the emulator or a tooling package is a build error."""
    toc = tmp_path / "PYZ-00.toc"
    clean = "[('httpx', '/x', 'PYMODULE'), ('keeper_task.task', '/x', 'PYMODULE')]"
    toc.write_text(clean)
    build._check_frozen_modules(tmp_path, allowed=())
    for bad, name in (
        ("('keeper_task.emulator.core', '/x', 'PYMODULE')", "keeper_task.emulator"),
        ("('amqtt.broker', '/x', 'PYMODULE')", "amqtt"),
        ("('click', '/x', 'PYMODULE')", "click"),
    ):
        toc.write_text(clean[:-1] + ", " + bad + "]")
        with pytest.raises(build.BuildError, match=name):
            build._check_frozen_modules(tmp_path, allowed=())
    # A tooling package the project itself depends on is allowed.
    build._check_frozen_modules(tmp_path, allowed=("click",))


def test_failing_sign_command_fails_the_build(tmp_path: Path) -> None:
    """A signing command that exits non-zero stops the build with its output and log."""
    binary = tmp_path / "DemoTask"
    binary.write_bytes(b"x")
    log = tmp_path / "sign.log"
    lines: list[str] = []
    with pytest.raises(build.BuildError, match=r"signing failed \(exit 3\): no certificate"):
        build._sign("echo no certificate; exit 3", binary, tmp_path, log=log, echo=lines.append)
    assert lines == ["[4/5] signing: running --sign-command"]
    build._sign("test -f {binary} && test -d {dir}", binary, tmp_path, log=log, echo=lines.append)


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


def test_bundle_deploys_with_curl_alone(tmp_path: Path) -> None:
    """Unpacked on a machine without Python tools, the bundle's deploy.sh deploys with curl."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from keeper_task.emulator import Emulator

    os_name = scaffold.current_os()
    if os_name == "windows":
        pytest.skip("the Windows bundle is deployed with deploy.ps1 (PowerShell)")
    root = _project(tmp_path)
    binary_dir = root / "dist" / "Jobs" / "bin" / "DemoTask"
    fake_onedir_binary(binary_dir, "DemoTask", root / "src", "demo_task")
    bundle = build.make_bundle(build.load_project(root), os_name, binary_dir, root / "dist")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(bundle) as tf:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+: refuse unsafe members, as users should
            tf.extractall(unpacked, filter="data")
        else:
            tf.extractall(unpacked)
    here = unpacked / f"demo-task-{os_name}"
    with Emulator(state_dir=tmp_path / "agent") as agent:
        done = subprocess.run(
            [
                str(here / "deploy.sh"),
                "--url",
                agent.base_url,
                "--agent-root",
                str(agent.agent_root),
                "--cert",
                str(agent.admin_cert),
                "--key",
                str(agent.admin_key),
            ],
            capture_output=True,
            text=True,
            env=deploy_env(with_keeper_task=False),
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert agent.wait_for(lambda: bool(agent.runs) and agent.runs[0].done.is_set(), 30)
        assert agent.runs[0].status == "succeeded", agent.runs[0].tasks
        assert os.access(agent.agent_root / "Jobs" / "bin" / "DemoTask" / "DemoTask", os.X_OK)
    assert f"validating {here / 'demo-task.json'}" in done.stderr


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
    # ... and the binary froze no tooling module (PyInstaller's module list).
    toc = (root / "build" / "keeper-task" / "pyinstaller" / "DemoTask" / "PYZ-00.toc").read_text()
    assert "'keeper_task.task'" in toc and "'httpx'" in toc
    for module in (
        "keeper_task.emulator",
        "keeper_task.cli",
        "keeper_task.testing",
        "amqtt",
        "aiohttp",
        "psutil",
        "trustme",
        "pytest",
        "PyInstaller",
        "click",
        "rich",
    ):
        assert f"'{module}'" not in toc and f"'{module}." not in toc, module

    job = root / "jobs" / os_name / "demo-task.json"
    with Emulator() as agent:
        result = run_task(agent, binary, job=job)
    assert result.exit_code == 0, result.stderr
    assert "demo_task.finished" in result.messages
    events = [m.json() for m in result.publishes if m.topic == "Jobs/demo-task/events"]
    assert events and events[-1]["event"] == "finished"
