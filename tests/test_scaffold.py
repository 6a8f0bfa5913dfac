"""Tests of ``keeper-task new`` (keeper_task.scaffold and keeper_task.cli.new)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from keeper_task import scaffold
from keeper_task.cli import main as cli_main
from keeper_task.errors import UsageError
from keeper_task.jobs import load_job, validate_job
from tests.support.projects import (
    REPO_ROOT,
    deploy_env,
    env_with_venv,
    fake_onedir_binary,
    make_overlay_venv,
    pip,
    pip_install,
    run_captured,
    venv_bin,
)

# Prints where the installed keeper_task reads its project templates from.
_TEMPLATES_PROBE = "from keeper_task import scaffold; print(scaffold.templates_root())"


def _new(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(["new", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_names_are_derived_from_the_job_id() -> None:
    """The module, command and class names follow from the job id."""
    spec = scaffold.make_spec("disk-usage-report")
    assert (spec.module, spec.command, spec.class_name) == (
        "disk_usage_report",
        "DiskUsageReport",
        "DiskUsageReport",
    )
    assert spec.topics == ("KeeperLogger", "Jobs/disk-usage-report/events")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["bad_name"], "contains '_'"),
        (["1abc"], "invalid job id"),
        (["a/b"], "invalid job id"),
        (["../escape"], "invalid job id"),
        (["trailing-"], "invalid job id"),
        (["caf\u00e9"], "invalid job id"),
        (["ok-name", "--module", "class"], "invalid module name"),
        (["ok-name", "--module", "json"], "would shadow"),
        (["ok-name", "--command", "bin/Tool"], "invalid command name"),
        (["ok-name", "--command", "Tool.exe"], "invalid command name"),
        (["ok-name", "--command", "CON"], "reserved device name"),
        (["ok-name", "--os", "solaris"], "unknown OS"),
        (["ok-name", "--publishes", "Jobs/+/events"], "invalid topic"),
        (["ok-name", "--keeper-task-spec", 'keeper-task"; rm'], "invalid --keeper-task-spec"),
        (["ok-name", "--keeper-task-spec", "requests"], "invalid --keeper-task-spec"),
    ],
)
def test_bad_input_is_one_line_and_exit_64(
    argv: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every bad name or option ends with one error line, exit 64, and nothing written."""
    monkeypatch.chdir(tmp_path)
    code, _out, err = _new(capsys, *argv)
    assert code == 64
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err
    assert list(tmp_path.iterdir()) == []


def test_relative_dir_cannot_leave_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dir ../x`` is refused; an absolute ``--dir`` elsewhere is allowed."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _out, err = _new(capsys, "demo", "--dir", "../outside")
    assert code == 64 and "leaves the current directory" in err
    assert not (tmp_path / "outside").exists()
    code, _out, _err = _new(capsys, "demo", "--dir", str(tmp_path / "outside"))
    assert code == 0
    assert (tmp_path / "outside" / "pyproject.toml").is_file()


def test_existing_directory_is_not_overwritten_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-empty target is refused; --force rewrites generated files and keeps the others."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "demo"
    target.mkdir()
    (target / "pyproject.toml").write_text("mine\n")
    (target / "notes.txt").write_text("keep me\n")
    code, _out, err = _new(capsys, "demo")
    assert code == 64 and "--force" in err
    assert (target / "pyproject.toml").read_text() == "mine\n"
    code, _out, _err = _new(capsys, "demo", "--force")
    assert code == 0
    assert "[tool.keeper-task]" in (target / "pyproject.toml").read_text()
    assert (target / "notes.txt").read_text() == "keep me\n"


def test_force_never_writes_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlink inside the target pointing elsewhere is refused, and nothing lands outside."""
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "demo"
    target.mkdir()
    (target / "src").symlink_to(outside, target_is_directory=True)
    code, _out, err = _new(capsys, "demo", "--force")
    assert code == 64 and "symlink" in err
    assert list(outside.iterdir()) == []


def test_generated_project_layout_and_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One valid job per OS with the same id, the documented path, the topics and arguments."""
    monkeypatch.chdir(tmp_path)
    code, out, _err = _new(
        capsys,
        "demo-task",
        "--command",
        "DemoTool",
        "--publishes",
        "Reports/demo",
        "--os",
        "windows,linux",
    )
    assert code == 0 and "created project demo-task" in out
    assert "--agent-root dist" in out  # the next steps include running the built binary
    root = tmp_path / "demo-task"
    for rel in (
        "pyproject.toml",
        "README.md",
        "src/demo_task/task.py",
        "src/demo_task/__main__.py",
        "tests/test_task.py",
        "scripts/build.sh",
        "scripts/build.ps1",
        "scripts/deploy.sh",
        "scripts/deploy.ps1",
    ):
        text = (root / rel).read_text(encoding="utf-8")
        assert "{{" not in text, rel
    assert os.access(root / "scripts" / "deploy.sh", os.X_OK)
    assert not (root / "jobs" / "macos").exists()
    for os_name in ("windows", "linux"):
        path = root / "jobs" / os_name / "demo-task.json"
        data = json.loads(path.read_text())
        assert data["id"] == "demo-task"
        assert data["osFilter"] == {
            "windows": os_name == "windows",
            "linux": os_name == "linux",
            "macOS": False,
        }
        (task,) = data["tasks"]
        # Only the command: the agent finds Jobs/bin/DemoTool/ under whatever root it has.
        assert task["command"] == "DemoTool" and "executablePath" not in task
        assert "--keeper-api-base={KeeperApiBaseUrl}" in task["arguments"]
        assert data["mqttTopics"]["allowedPublications"] == [
            "KeeperLogger",
            "Jobs/demo-task/events",
            "Reports/demo",
        ]
        report = validate_job(load_job(path), file_name=path, current_os=os_name)
        assert report.valid and not report.errors and not report.warnings, report
    task_py = (root / "src" / "demo_task" / "task.py").read_text()
    compile(task_py, "task.py", "exec")
    assert '"Reports/demo",' in task_py and "class DemoTask(Task[DemoTaskSettings])" in task_py
    subprocess.run(["bash", "-n", str(root / "scripts" / "deploy.sh")], check=True)


def test_templates_come_from_the_checkout_in_an_editable_install() -> None:
    """Without the wheel's keeper_task/_templates, the repository's templates/ is used."""
    root = scaffold.templates_root()
    assert Path(str(root)) == REPO_ROOT / "templates"


def test_templates_come_from_the_checkout_after_a_real_editable_install(tmp_path: Path) -> None:
    """``pip install -e`` then ``keeper-task new`` elsewhere uses the live checkout templates.

    hatchling copies ``force-include`` into site-packages at editable-install time (a snapshot
    that goes stale); the scaffold must read the checkout's ``templates/`` instead.
    """
    py = make_overlay_venv(tmp_path / "venv", include_checkout=False)
    # With build isolation: hatchling's editable builds need `editables` (from the index).
    pip_install(py, REPO_ROOT, extra=["--editable"], build_isolation=True)
    env = env_with_venv(tmp_path / "venv")
    work = tmp_path / "work"
    work.mkdir()
    probe = run_captured([py, "-c", _TEMPLATES_PROBE], env=env, cwd=work)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == REPO_ROOT / "templates"
    done = run_captured([py, "-m", "keeper_task.cli", "new", "from-editable"], env=env, cwd=work)
    assert done.returncode == 0, done.stderr
    assert (work / "from-editable" / "src" / "from_editable" / "task.py").is_file()


def test_powershell_scripts_parse(tmp_path: Path) -> None:
    """The generated build.ps1 and deploy.ps1 are syntactically valid PowerShell.

    PowerShell itself is not installable on this CI (no Debian package, not on PyPI or npm),
    so a PowerShell grammar (tree-sitter) checks the syntax; the scripts' behaviour is untested.
    """
    tsp = pytest.importorskip("tree_sitter_powershell")
    tree_sitter = pytest.importorskip("tree_sitter")
    parser = tree_sitter.Parser(tree_sitter.Language(tsp.language()))
    assert parser.parse(b"if ($a) { Write-Host 'x' ").root_node.has_error  # the check bites
    spec = scaffold.make_spec("demo-task", publishes=["Reports/demo"])
    files = scaffold.project_files(spec)
    for name in ("scripts/build.ps1", "scripts/deploy.ps1"):
        tree = parser.parse(files[PurePosixPath(name)].encode())
        assert not tree.root_node.has_error, name


@pytest.mark.parametrize("via", ["keeper-task", "curl"])
def test_deploy_script_places_registers_and_triggers(tmp_path: Path, via: str) -> None:
    """scripts/deploy.sh (keeper-task or curl path) deploys to the emulator, twice over."""
    if via == "curl" and shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from keeper_task.emulator import Emulator

    spec = scaffold.make_spec("demo-task", keeper_task_spec=f"keeper-task @ {REPO_ROOT.as_uri()}")
    root = tmp_path / "demo-task"
    scaffold.create_project(spec, root)
    fake_onedir_binary(
        root / "dist" / "Jobs" / "bin" / "DemoTask", "DemoTask", root / "src", "demo_task"
    )
    env = deploy_env(with_keeper_task=via == "keeper-task")
    with Emulator(state_dir=tmp_path / "agent") as agent:
        argv = [
            "bash",
            str(root / "scripts" / "deploy.sh"),
            "--url", agent.base_url,
            "--agent-root", str(agent.agent_root),
            "--cert", str(agent.admin_cert),
            "--key", str(agent.admin_key),
            "--ca-bundle", str(agent.ca_bundle),
        ]  # fmt: skip
        if via == "curl":
            argv.append("--curl")
        for attempt in (1, 2):  # idempotent: the second deploy replaces and updates
            done = run_captured(argv, env=env, cwd=tmp_path, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert agent.wait_for(
                lambda n=attempt: len([r for r in agent.runs if r.done.is_set()]) >= n, 30
            )
        placed = agent.agent_root / "Jobs" / "bin" / "DemoTask"
        assert os.access(placed / "DemoTask", os.X_OK) and (placed / "_internal").is_dir()
        assert agent.job("demo-task") is not None
        runs = agent.runs
        assert [r.trigger for r in runs] == ["trigger", "trigger"]
        assert all(r.status == "succeeded" for r in runs), [r.tasks for r in runs]
        assert "demo_task.finished" in [log.get("message") for log in agent.logs()]
    assert f"{root / 'jobs' / scaffold.current_os() / 'demo-task.json'}" in done.stderr
    if via == "curl":
        assert "validating" in done.stderr and "keeper-task job" not in done.stderr


def test_unknown_placeholder_is_an_error() -> None:
    """A template naming an undefined placeholder fails loudly instead of leaking ``{{``."""
    from keeper_task.errors import SettingsError

    with pytest.raises(SettingsError, match="unknown placeholder"):
        scaffold.render("x = {{ nope }}", {"job_id": "a"})


def test_spec_without_a_valid_dir_raises_usage_error(tmp_path: Path) -> None:
    """A target that is a file is refused with UsageError."""
    spec = scaffold.make_spec("demo")
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        scaffold.create_project(spec, target)


def test_templates_ship_inside_the_wheel(tmp_path: Path) -> None:
    """A wheel of keeper-task carries the templates and ``new`` works from that install."""
    wheels = tmp_path / "wheels"
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", REPO_ROOT, "-w", wheels)
    (wheel,) = wheels.glob("keeper_task-*.whl")
    py = make_overlay_venv(tmp_path / "venv", include_checkout=False)
    pip_install(py, wheel)
    env = env_with_venv(tmp_path / "venv")
    probe = run_captured([py, "-c", _TEMPLATES_PROBE], env=env, cwd=tmp_path)
    assert probe.returncode == 0, (
        "templates missing from the wheel: pyproject.toml needs "
        '[tool.hatch.build.targets.wheel.force-include] "templates" = "keeper_task/_templates"; '
        + probe.stderr
    )
    found = probe.stdout.strip()
    assert found.endswith(os.path.join("keeper_task", "_templates")), found
    assert str(tmp_path / "venv") in found
    done = run_captured([py, "-m", "keeper_task.cli", "new", "from-wheel"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-wheel" / "src" / "from_wheel" / "task.py").is_file()


def test_scaffold_installs_passes_its_tests_and_runs_under_dev_run(tmp_path: Path) -> None:
    """A new project installs, its generated tests pass untouched, and ``dev run`` runs it."""
    py = make_overlay_venv(tmp_path / "venv", include_checkout=True)
    env = env_with_venv(tmp_path / "venv")
    spec = f"keeper-task @ {REPO_ROOT.as_uri()}"
    created = run_captured(
        [py, "-m", "keeper_task.cli", "new", "demo-task", "--keeper-task-spec", spec],
        env=env,
        cwd=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    project = tmp_path / "demo-task"
    pip_install(py, project)
    tests = run_captured(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env, cwd=project, timeout=180
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
    # The installed console script DemoTask is found on PATH, as the agent's runner would.
    assert (venv_bin(tmp_path / "venv") / "DemoTask").exists()
    host = scaffold.current_os()
    run = run_captured(
        [py, "-m", "keeper_task.cli", "dev", "run", f"jobs/{host}/demo-task.json"],
        env=env,
        cwd=project,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "demo_task.finished" in run.stdout


class _FakeDistribution:
    """Stands in for importlib.metadata's record of how keeper-task was installed."""

    def __init__(self, direct_url: dict[str, object] | None, version: str = "0.3.1") -> None:
        self.version = version
        self._direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        if name == "direct_url.json" and self._direct_url is not None:
            return json.dumps(self._direct_url)
        return None


@pytest.mark.parametrize(
    ("direct_url", "expected", "origin"),
    [
        (None, "keeper-task>=0.3.1,<0.4", "installed from a package index"),
        (
            {"url": "file:///src/keeper-task", "dir_info": {"editable": True}},
            "keeper-task @ file:///src/keeper-task",
            "from a local checkout (file:///src/keeper-task)",
        ),
        (
            {"url": "file:///w/keeper_task-0.3.1-py3-none-any.whl", "archive_info": {}},
            "keeper-task @ file:///w/keeper_task-0.3.1-py3-none-any.whl",
            "from a wheel",
        ),
        (
            {
                "url": "https://example.invalid/keeper-task.git",
                "vcs_info": {"vcs": "git", "commit_id": "abc123"},
            },
            "keeper-task @ git+https://example.invalid/keeper-task.git@abc123",
            "that same revision",
        ),
    ],
)
def test_keeper_task_requirement_follows_where_keeper_task_came_from(
    monkeypatch: pytest.MonkeyPatch,
    direct_url: dict[str, object] | None,
    expected: str,
    origin: str,
) -> None:
    """Index install -> a version range; checkout, wheel or VCS -> a direct reference."""
    from importlib import metadata

    monkeypatch.setattr(metadata, "distribution", lambda _name: _FakeDistribution(direct_url))
    requirement, why = scaffold.detect_keeper_task_spec()
    assert requirement == expected
    assert origin in why
    spec = scaffold.make_spec("demo", keeper_task_spec=requirement, keeper_task_origin=why)
    assert spec.keeper_task_spec == expected  # accepted by the TOML-safety check


def test_new_says_which_requirement_it_wrote_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The requirement and its reason are on screen and in the generated README; the
    override (option or KEEPER_TASK_SPEC) wins and is named as the reason."""
    from importlib import metadata

    checkout = {"url": "file:///src/keeper-task", "dir_info": {"editable": True}}
    monkeypatch.setattr(metadata, "distribution", lambda _name: _FakeDistribution(checkout))
    monkeypatch.delenv("KEEPER_TASK_SPEC", raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, _err = _new(capsys, "demo-task")
    assert code == 0
    assert "  requires: keeper-task @ file:///src/keeper-task\n" in out
    assert "cd demo-task && " in out and " dev run\n" in out
    project = tmp_path / "demo-task"
    pyproject = (project / "pyproject.toml").read_text()
    assert '"keeper-task @ file:///src/keeper-task",' in pyproject
    assert '"keeper-task[emulator] @ file:///src/keeper-task",' in pyproject
    readme = " ".join((project / "README.md").read_text().split())
    assert (
        "The project requires `keeper-task @ file:///src/keeper-task` (in `pyproject.toml`): "
        "keeper-task was installed from a local checkout (file:///src/keeper-task)"
    ) in readme
    monkeypatch.setenv("KEEPER_TASK_SPEC", "keeper-task>=0.1")
    code, out, _err = _new(capsys, "env-task")
    assert code == 0 and "given with KEEPER_TASK_SPEC" in out
    assert '"keeper-task>=0.1",' in (tmp_path / "env-task" / "pyproject.toml").read_text()
    code, out, _err = _new(capsys, "opt-task", "--keeper-task-spec", "keeper-task>=0.2")
    assert code == 0 and "given with --keeper-task-spec" in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generated_project_installs_and_passes_its_tests_in_its_own_fresh_venv(
    tmp_path: Path,
) -> None:
    """`keeper-task new` with no option, then a brand-new venv with pip (no overlay, nothing
    shared with this environment): `pip install -e '.[test]'` resolves keeper-task from where
    this keeper-task came from (packages from the index) and the project's tests pass."""
    from importlib import metadata

    raw = metadata.distribution("keeper-task").read_text("direct_url.json")
    if not raw or not json.loads(raw).get("url", "").startswith("file:"):
        pytest.skip("this keeper-task is not installed from a local checkout or wheel")
    url = json.loads(raw)["url"]
    env = env_with_venv(tmp_path / "unused")  # no agent variables, no PYTHONPATH
    env.pop("VIRTUAL_ENV", None)
    env.pop("KEEPER_TASK_SPEC", None)
    created = run_captured([sys.executable, "-m", "keeper_task.cli", "new", "fresh-task"],
                           env=env, cwd=tmp_path)  # fmt: skip
    assert created.returncode == 0, created.stderr
    project = tmp_path / "fresh-task"
    assert f'"keeper-task @ {url}",' in (project / "pyproject.toml").read_text()
    venv = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv_bin(venv) / ("python.exe" if os.name == "nt" else "python")
    installed = run_captured(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[test]"],
        env=env,
        cwd=project,
        timeout=800,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    tests = run_captured(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env, cwd=project, timeout=300
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
