"""Tests for ``keeper-task job``: offline validation, every agent command, and deploy."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper_task.cli import main
from tests.support import jobs as support_jobs
from tests.support.https import HttpsServer, Response
from tests.support.jobs import AdminPki, FakeJobsAgent, example_job, write_job

# The Admin-tier fixtures shared with the other jobs test module.
pki = support_jobs.pki
_shared_server = support_jobs._shared_server
server = support_jobs.server
agent = support_jobs.agent

ENV_VARS = (
    "KEEPER_AGENT_URL",
    "KEEPER_ADMIN_CERT",
    "KEEPER_ADMIN_KEY",
    "KEEPER_ADMIN_KEY_PASSWORD",
    "KEEPER_CA_BUNDLE",
    "KEEPER_AGENT_ROOT",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def closed_url(pki: AdminPki) -> str:
    """An https URL on 127.0.0.1 where nothing listens (the agent is unreachable)."""
    with HttpsServer(pki.server_ca) as srv:
        return srv.base_url


@pytest.fixture
def conn(server: HttpsServer, pki: AdminPki) -> list[str]:
    """Connection options for the test agent."""
    return [
        "--url",
        server.base_url,
        "--cert",
        str(pki.admin_pem),
        "--ca-bundle",
        str(pki.ca_bundle),
    ]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- validate --------------------------------------------------------------------------------


def test_validate_valid_file_prints_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid job prints `path: valid` and exits 0."""
    path = write_job(tmp_path, example_job())
    code, out, err = run(capsys, "job", "validate", str(path))
    assert (code, out, err) == (0, f"{path}: valid\n", "")


def test_validate_reports_errors_and_warnings_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each error and warning is one `path: error:`/`path: warning:` line; exit 1."""
    job = example_job("bad_id")
    job["tasks"][0]["arguments"] = "--x"
    path = write_job(tmp_path, job, name="other.json")
    code, out, _ = run(capsys, "job", "validate", str(path))
    lines = out.splitlines()
    assert code == 1
    assert f"{path}: error: id 'bad_id' contains an underscore" in lines[0]
    assert lines[1].startswith(f"{path}: error: id 'bad_id' does not match the file name")
    assert any(
        line.startswith(f"{path}: warning: tasks[0].arguments never passes") for line in lines
    )
    assert lines[-1] == f"{path}: invalid (2 errors)"


def test_validate_malformed_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Malformed JSON is shown as path:line:col; a missing file is an error; others still run."""
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "id": "bad",\n  "tasks": [,]\n}', encoding="utf-8")
    good = write_job(tmp_path, example_job())
    missing = tmp_path / "missing.json"
    code, out, _ = run(capsys, "job", "validate", str(bad), str(good))
    assert code == 1
    assert f"{bad}:3:13: error: malformed JSON: Expecting value" in out
    assert f"{good}: valid" in out
    # A missing input file is a usage error found before anything runs (exit 64).
    code, out, err = run(capsys, "job", "validate", str(bad), str(missing), str(good))
    assert (code, out) == (64, "")
    assert err == f"keeper-task: error: job file {missing} does not exist\n"


def test_validate_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the agent's report shape per file."""
    path = write_job(tmp_path, example_job(enabled=False))
    code, out, _ = run(capsys, "job", "validate", "--json", str(path))
    assert code == 0
    result = json.loads(out)
    assert result["valid"] is True
    entry = result["files"][0]
    assert entry["file"] == str(path) and entry["jobId"] == "disk-usage-reporter"
    assert entry["errors"] == [] and entry["agent"] is None
    assert entry["warnings"][0].startswith("enabled is false")


def test_validate_with_agent_root_checks_the_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--agent-root (or KEEPER_AGENT_ROOT) turns on the binary check."""
    path = write_job(tmp_path, example_job())
    code, out, _ = run(
        capsys, "job", "validate", str(path), "--agent-root", str(tmp_path), "--os", "linux"
    )
    assert code == 1 and "binary for command 'DiskUsageReporter' not found" in out
    monkeypatch.setenv("KEEPER_AGENT_ROOT", str(tmp_path))
    code, out, _ = run(capsys, "job", "validate", str(path), "--os", "linux")
    assert code == 1 and "not found" in out
    code, _, _ = run(capsys, "job", "validate", str(path), "--os", "windows")
    assert code == 0  # osFilter excludes Windows: no binary check


def test_validate_with_url_also_asks_the_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: HttpsServer, conn: list[str]
) -> None:
    """With --url the agent's verdict is printed too and decides the exit code."""
    server.route(
        "POST",
        r"/api/Jobs/validate",
        Response(
            200, {"valid": False, "errors": ["Binary not found"], "warnings": [], "jobId": "x"}
        ),
    )
    path = write_job(tmp_path, example_job())
    code, out, _ = run(capsys, "job", "validate", str(path), *conn)
    assert code == 1
    assert out.splitlines() == [
        f"{path}: valid",
        f"{path}: agent: error: Binary not found",
        f"{path}: agent: invalid (1 error)",
    ]
    assert server.requests[0].json() == example_job()


# -- agent commands --------------------------------------------------------------------------


def test_create_list_get_update_delete(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    agent: FakeJobsAgent,
    conn: list[str],
) -> None:
    """The CRUD commands reach the agent and print one line each."""
    path = write_job(tmp_path, example_job("a-job"))
    assert run(capsys, "job", "create", str(path), *conn)[:2] == (
        0,
        "job 'a-job' created or updated (Job saved)\n",
    )
    code, out, _ = run(capsys, "job", "list", *conn)
    assert code == 0 and out.splitlines() == ["a-job  enabled   Disk usage reporter", "1 job"]
    code, out, _ = run(capsys, "job", "get", "a-job", *conn)
    assert code == 0 and json.loads(out) == example_job("a-job")
    other = write_job(tmp_path, example_job("b-job", name="Renamed"))
    code, out, err = run(capsys, "job", "update", "a-job", str(other), *conn)
    assert code == 0 and out == "job 'a-job' updated (Job updated)\n"
    assert "the agent uses the URL id 'a-job'" in err
    assert agent.jobs["a-job"]["name"] == "Renamed"
    assert run(capsys, "job", "delete", "a-job", *conn)[:2] == (
        0,
        "job 'a-job' deleted (Job deleted)\n",
    )
    assert agent.jobs == {}
    assert run(capsys, "job", "list", *conn)[1] == "no jobs (ok)\n"


def test_trigger_run_reload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent: FakeJobsAgent, conn: list[str]
) -> None:
    """trigger sends {} or the --context object (inline or @file); run and reload work."""
    agent.jobs["j"] = example_job("j")
    context_file = tmp_path / "ctx.json"
    context_file.write_text('{"from": "file"}', encoding="utf-8")
    assert run(capsys, "job", "trigger", "j", *conn)[:2] == (
        0,
        "job 'j' triggered (Job triggered)\n",
    )
    assert run(capsys, "job", "trigger", "j", "--context", '{"user": "a"}', *conn)[0] == 0
    assert run(capsys, "job", "trigger", "j", "--context", f"@{context_file}", *conn)[0] == 0
    assert run(capsys, "job", "run", "j", *conn)[0] == 0
    code, out, _ = run(capsys, "job", "reload", "--json", *conn)
    assert code == 0 and json.loads(out)["response"] == {"message": "Jobs reloaded"}
    assert agent.triggered == [
        ("j", {}),
        ("j", {"user": "a"}),
        ("j", {"from": "file"}),
        ("j", None),
    ]
    assert agent.reloads == 1


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ("[1]", "--context must be a JSON object"),
        ("{", "--context: malformed JSON at line 1 column 2"),
        ("@/nonexistent/ctx.json", "cannot read --context file"),
    ],
)
def test_bad_context_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], context: str, message: str
) -> None:
    """A bad --context exits 64 with one error line, before any request."""
    code, out, err = run(capsys, "job", "trigger", "j", "--context", context)
    assert code == 64 and out == ""
    assert err.startswith("keeper-task: error: ") and message in err
    assert err.count("\n") == 1


def test_unknown_job_and_rejected_create_exit_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent: FakeJobsAgent, conn: list[str]
) -> None:
    """404 exits 68; a job refused locally or by the agent (400) exits 1; one line each."""
    code, _, err = run(capsys, "job", "get", "ghost", *conn)
    assert code == 68
    assert err == (
        "keeper-task: error: job 'ghost' is unknown to the agent; "
        "`keeper-task job list` shows what exists\n"
    )
    bad = example_job("x")
    bad["enabled"] = "yes"
    code, _, err = run(capsys, "job", "create", str(write_job(tmp_path, bad)), *conn)
    assert code == 1 and "enabled must be true or false, got a string" in err  # refused locally
    assert "nothing was sent to the agent" in err and err.count("\n") == 1
    agent.refuse["x"] = ["binary not found on the validating host", "second problem"]
    code, _, err = run(capsys, "job", "create", str(write_job(tmp_path, example_job("x"))), *conn)
    assert code == 1 and err.count("\n") == 1
    assert "the agent rejected job 'x' (400): binary not found on the validating host" in err
    agent.jobs["off"] = example_job("off", enabled=False)
    code, _, err = run(capsys, "job", "trigger", "off", *conn)
    assert code == 1 and "Job off is disabled" in err
    malformed = tmp_path / "m.json"
    malformed.write_text('{"id": "m",\n  "tasks": }', encoding="utf-8")
    code, _, err = run(capsys, "job", "create", str(malformed), *conn)
    assert code == 1 and f"{malformed}:2:12: malformed JSON" in err
    assert server_requests_of(agent) == ["GET", "POST", "POST"]  # nothing sent for local errors
    # --json gives the agent's errors as the array it sent.
    code, out, _ = run(
        capsys, "job", "create", "--json", str(write_job(tmp_path, example_job("x"))), *conn
    )
    assert code == 1
    assert json.loads(out)["errors"] == [
        "binary not found on the validating host",
        "second problem",
    ]


def server_requests_of(agent: FakeJobsAgent) -> list[str]:
    return [r.method for r in agent.server.requests]


def test_missing_client_certificate_exits_77(
    capsys: pytest.CaptureFixture[str], server: HttpsServer, pki: AdminPki, agent: FakeJobsAgent
) -> None:
    """Without a certificate the command says so and exits with NOT_TRUSTED (77)."""
    code, _, err = run(
        capsys, "job", "list", "--url", server.base_url, "--ca-bundle", str(pki.ca_bundle)
    )
    assert code == 77
    assert "requires a client certificate for the Admin tier and none was given" in err


def test_environment_supplies_the_connection(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    server: HttpsServer,
    pki: AdminPki,
    agent: FakeJobsAgent,
) -> None:
    """KEEPER_AGENT_URL, KEEPER_ADMIN_CERT/KEY and KEEPER_CA_BUNDLE replace the options."""
    monkeypatch.setenv("KEEPER_AGENT_URL", server.base_url)
    monkeypatch.setenv("KEEPER_ADMIN_CERT", str(pki.admin_cert))
    monkeypatch.setenv("KEEPER_ADMIN_KEY", str(pki.admin_key))
    monkeypatch.setenv("KEEPER_CA_BUNDLE", str(pki.ca_bundle))
    assert run(capsys, "job", "reload")[0] == 0
    assert agent.reloads == 1


def test_job_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`keeper-task job` alone lists the job commands and exits 64."""
    code, _, err = run(capsys, "job")
    assert code == 64
    for name in ("validate", "list", "get", "create", "update", "delete", "trigger", "run"):
        assert name in err
    assert "deploy" in err and "reload" in err


# -- deploy ----------------------------------------------------------------------------------


@pytest.fixture
def agent_root(tmp_path: Path) -> Path:
    root = tmp_path / "KeeperPrivilegeManager"
    root.mkdir()
    return root


def _binary(tmp_path: Path, content: bytes = b"#!/bin/sh\necho hi\n") -> Path:
    path = tmp_path / "dist" / "disk-usage-reporter-build"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o644)  # deploy must make it executable
    return path


def test_deploy_places_validates_creates_and_triggers(
    tmp_path: Path,
    agent_root: Path,
    capsys: pytest.CaptureFixture[str],
    agent: FakeJobsAgent,
    server: HttpsServer,
    conn: list[str],
) -> None:
    """Deploy copies the binary to Jobs/bin/<command>/, validates twice, creates, triggers."""
    job_file = write_job(tmp_path, example_job())
    binary = _binary(tmp_path)
    args = [
        "job",
        "deploy",
        str(job_file),
        "--binary",
        str(binary),
        "--agent-root",
        str(agent_root),
    ]
    code, out, err = run(capsys, *args, "--trigger", *conn)
    installed = agent_root / "Jobs/bin/DiskUsageReporter/DiskUsageReporter"
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"binary: installed {installed}",
        "validate: valid offline (0 warning(s))",
        "agent validate: valid",
        "create: job 'disk-usage-reporter' registered (Job saved)",
        "trigger: job 'disk-usage-reporter' triggered (Job triggered)",
    ]
    assert installed.read_bytes() == binary.read_bytes()
    if os.name != "nt":
        assert installed.stat().st_mode & stat.S_IXOTH
    assert [(r.method, r.path) for r in server.requests] == [
        ("POST", "/api/Jobs/validate"),
        ("POST", "/api/Jobs"),
        ("POST", "/api/Jobs/disk-usage-reporter/trigger"),
    ]
    assert agent.jobs["disk-usage-reporter"] == example_job()

    # Same content again: nothing changes on disk, the job is registered again.
    mtime = installed.stat().st_mtime_ns
    code, out, _ = run(capsys, *args, *conn)
    assert code == 0 and out.splitlines()[0] == f"binary: unchanged {installed}"
    assert installed.stat().st_mtime_ns == mtime
    assert len(out.splitlines()) == 4  # no trigger this time

    _binary(tmp_path, b"#!/bin/sh\necho v2\n")
    code, out, _ = run(capsys, *args, "--json", *conn)
    steps = json.loads(out)["steps"]
    assert code == 0 and steps[0]["action"] == "updated"
    assert installed.read_bytes() == b"#!/bin/sh\necho v2\n"


def test_deploy_onedir_directory(
    tmp_path: Path,
    agent_root: Path,
    capsys: pytest.CaptureFixture[str],
    agent: FakeJobsAgent,
    conn: list[str],
) -> None:
    """A onedir build is copied file by file; it must hold <command> at its top."""
    job_file = write_job(tmp_path, example_job())
    onedir = tmp_path / "dist" / "DiskUsageReporter"
    (onedir / "_internal").mkdir(parents=True)
    (onedir / "_internal" / "lib.so").write_bytes(b"lib")
    args = [
        "job",
        "deploy",
        str(job_file),
        "--binary",
        str(onedir),
        "--agent-root",
        str(agent_root),
    ]
    code, _, err = run(capsys, *args, *conn)
    assert code == 64 and "has no DiskUsageReporter at its top" in err
    (onedir / "DiskUsageReporter").write_bytes(b"exe")
    code, _, _ = run(capsys, *args, *conn)
    target = agent_root / "Jobs/bin/DiskUsageReporter"
    assert code == 0
    assert (target / "_internal" / "lib.so").read_bytes() == b"lib"
    assert (target / "DiskUsageReporter").read_bytes() == b"exe"


def test_deploy_stops_on_an_invalid_job(
    tmp_path: Path,
    agent_root: Path,
    capsys: pytest.CaptureFixture[str],
    agent: FakeJobsAgent,
    server: HttpsServer,
    conn: list[str],
) -> None:
    """An offline validation error stops deploy before any agent call; exit 1."""
    job = example_job()
    job["priority"] = 42
    job_file = write_job(tmp_path, job)
    code, out, _ = run(
        capsys,
        "job",
        "deploy",
        str(job_file),
        "--binary",
        str(_binary(tmp_path)),
        "--agent-root",
        str(agent_root),
        *conn,
    )
    assert code == 1
    assert "validate: error: priority must be from 1 to 10, got 42" in out
    assert server.requests == [] and agent.jobs == {}


def test_deploy_needs_an_existing_agent_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing agent root is a one-line settings error (exit 78)."""
    job_file = write_job(tmp_path, example_job())
    code, _, err = run(
        capsys,
        "job",
        "deploy",
        str(job_file),
        "--binary",
        str(_binary(tmp_path)),
        "--agent-root",
        str(tmp_path / "nope"),
    )
    assert code == 78 and "is not a directory; pass --agent-root" in err


def test_cli_runs_as_a_module(tmp_path: Path) -> None:
    """`python -m keeper_task.cli job validate` works in a fresh process, with exit code 1."""
    good = write_job(tmp_path, example_job())
    bad = write_job(tmp_path, example_job("x_y"))
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    result = subprocess.run(
        [sys.executable, "-m", "keeper_task.cli", "job", "validate", str(good), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"{good}: valid" in result.stdout
    assert f"{bad}: error: id 'x_y' contains an underscore" in result.stdout


# -- --json, exit codes and bad inputs -------------------------------------------------------


def test_json_output_of_every_subcommand_is_valid_json(
    tmp_path: Path,
    agent_root: Path,
    capsys: pytest.CaptureFixture[str],
    agent: FakeJobsAgent,
    conn: list[str],
) -> None:
    """Each sub-command's --json output is one JSON document of the documented shape."""
    job_file = write_job(tmp_path, example_job("j"))

    def as_json(*args: str) -> object:
        code, out, err = run(capsys, "job", *args, "--json")
        assert (code, err) == (0, ""), err
        return json.loads(out)

    assert as_json("validate", str(job_file))["valid"] is True  # type: ignore[index]
    assert as_json("create", str(job_file), *conn) == {
        "ok": True,
        "jobId": "j",
        "response": {"message": "Job saved", "jobId": "j"},
    }
    assert as_json("list", *conn) == {
        "jobs": [{"id": "j", "name": "Disk usage reporter", "enabled": True}],
        "count": 1,
        "message": "ok",
    }
    assert as_json("get", "j", *conn) == example_job("j")
    assert as_json("update", "j", str(job_file), *conn)["jobId"] == "j"  # type: ignore[index]
    for command in ("trigger", "run"):
        assert as_json(command, "j", *conn)["ok"] is True  # type: ignore[index]
    assert as_json("reload", *conn)["jobId"] is None  # type: ignore[index]
    assert as_json("delete", "j", *conn)["response"] == {"message": "Job deleted"}  # type: ignore[index]
    deployed = as_json(
        "deploy",
        str(write_job(tmp_path, example_job())),
        "--binary",
        str(_binary(tmp_path)),
        "--agent-root",
        str(agent_root),
        *conn,
    )
    assert deployed["ok"] is True  # type: ignore[index]
    assert [s["step"] for s in deployed["steps"]] == [  # type: ignore[index]
        "binary",
        "validate",
        "agent validate",
        "create",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["get", "j"],
        ["create", "{job}"],
        ["update", "j", "{job}"],
        ["delete", "j"],
        ["trigger", "j"],
        ["run", "j"],
        ["reload"],
        ["validate", "--online", "{job}"],
        ["deploy", "{job}", "--binary", "{binary}", "--agent-root", "{root}"],
    ],
)
def test_json_failure_is_valid_json_with_the_exit_code(
    tmp_path: Path,
    agent_root: Path,
    pki: AdminPki,
    closed_url: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
) -> None:
    """With --json a failing command still prints JSON (ok false, error, exitCode) and exits 69."""
    url = closed_url
    values = {
        "{job}": str(write_job(tmp_path, example_job("j"))),
        "{binary}": str(_binary(tmp_path)),
        "{root}": str(agent_root),
    }
    argv = [values.get(a, a) for a in args]
    code, out, err = run(capsys, "job", *argv, "--json", "--url", url, "--cert", str(pki.admin_pem))
    result = json.loads(out)
    assert code == 69 and result["ok"] is False and result["exitCode"] == 69
    assert result["error"].startswith(f"cannot connect to the agent at {url}")
    assert err == f"keeper-task: error: {result['error']}\n"
    if args[0] == "deploy":  # the steps done before the agent call are reported
        assert [s["step"] for s in result["steps"]] == ["binary", "validate"]


def test_help_documents_json_output_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """Each sub-command's --help states its --json shape and the exit codes."""
    for command in ("validate", "list", "get", "create", "update", "delete", "trigger", "run"):
        with pytest.raises(SystemExit):
            main(["job", command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--json prints" in out and '"ok": false' in out, command
        assert "exit codes: 0 success; 1 job invalid" in out, command


def test_deploy_of_an_invalid_job_places_nothing(
    tmp_path: Path, agent_root: Path, capsys: pytest.CaptureFixture[str], server: HttpsServer
) -> None:
    """The agent's rules are checked before the binary is copied: a bad job leaves no trace."""
    job = example_job()
    job["tasks"][0]["timeoutSeconds"] = 0
    code, out, _ = run(
        capsys,
        "job",
        "deploy",
        str(write_job(tmp_path, job)),
        "--binary",
        str(_binary(tmp_path)),
        "--agent-root",
        str(agent_root),
    )
    assert code == 1
    assert out.splitlines() == [
        "validate: error: tasks[0].timeoutSeconds must be a positive integer, got 0",
        "validate: invalid; fix the errors above",
    ]
    assert not (agent_root / "Jobs").exists() and server.requests == []


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing binary", 64, "--binary {tmp}/nope does not exist; build the task first"),
        ("empty dir", 64, "--binary directory {tmp}/empty has no DiskUsageReporter at its top"),
        ("missing job", 64, "job file {tmp}/missing.json does not exist"),
        ("two commands", 64, "has several task commands (DiskUsageReporter, Second)"),
        ("unreachable", 69, "cannot connect to the agent at"),
    ],
)
def test_deploy_bad_inputs_give_one_line(
    tmp_path: Path,
    agent_root: Path,
    closed_url: str,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: int,
    message: str,
) -> None:
    """Each bad deploy input ends with exactly one error line and its own exit code."""
    (tmp_path / "empty").mkdir()
    job = example_job()
    if case == "two commands":
        job["tasks"].append({**job["tasks"][0], "command": "Second"})
    job_file = str(write_job(tmp_path, job))
    binary = str(_binary(tmp_path))
    if case == "missing binary":
        binary = str(tmp_path / "nope")
    elif case == "empty dir":
        binary = str(tmp_path / "empty")
    elif case == "missing job":
        job_file = str(tmp_path / "missing.json")
    got, _, err = run(
        capsys,
        "job",
        "deploy",
        job_file,
        "--binary",
        binary,
        "--agent-root",
        str(agent_root),
        "--url",
        closed_url,
    )
    assert got == code
    assert err.startswith("keeper-task: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err


# -- end to end against the emulator ---------------------------------------------------------


def test_job_commands_against_the_emulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: AdminPki
) -> None:
    """create, list, trigger, delete and deploy (twice) work against the real emulator."""
    from keeper_task.emulator import Emulator

    script = b'#!/bin/sh\necho "deployed-task $*"\n'
    source = tmp_path / "src"
    source.mkdir()
    with Emulator(jobs_dir=tmp_path / "agent" / "Jobs") as emu:
        conn = [
            "--url",
            emu.base_url,
            "--cert",
            str(emu.admin_cert),
            "--key",
            str(emu.admin_key),
            "--ca-bundle",
            str(emu.ca_bundle),
        ]
        # A job whose binary the administrator already placed: create -> list -> trigger.
        placed = emu.agent_root / "Jobs/bin/DiskUsageReporter/DiskUsageReporter"
        placed.parent.mkdir(parents=True)
        placed.write_bytes(script)
        placed.chmod(0o755)
        job = example_job("e2e-job", osFilter={"linux": True, "windows": True, "macOS": True})
        job_file = write_job(source, job)
        code, out, err = run(capsys, "job", "create", str(job_file), *conn)
        assert (code, err) == (0, ""), err
        assert emu.job("e2e-job") is not None
        assert json.loads((emu.jobs_dir / "e2e-job.json").read_text()) == job  # nothing lost
        code, out, _ = run(capsys, "job", "list", *conn)
        assert code == 0 and out.splitlines() == [
            "e2e-job  enabled   Disk usage reporter",
            "1 job",
        ]
        code, out, _ = run(
            capsys, "job", "trigger", "e2e-job", "--context", '{"k": 1}', "--json", *conn
        )
        run_id = json.loads(out)["response"]["runId"]
        (job_run,) = [r for r in emu.runs if r.run_id == run_id]
        assert job_run.done.wait(30) and job_run.status == "succeeded", job_run
        assert job_run.context == {"k": 1}
        assert job_run.tasks[0].stdout_lines == [
            f"deployed-task --keeper-api-base={emu.base_url} --threshold-percent 90"
        ]
        code, out, _ = run(capsys, "job", "delete", "e2e-job", *conn)
        assert code == 0 and out.startswith("job 'e2e-job' deleted")
        assert not (emu.jobs_dir / "e2e-job.json").exists()
        assert run(capsys, "job", "get", "e2e-job", *conn)[0] == 68

        # deploy: place -> validate -> create -> trigger, run twice.
        deploy_job = example_job(
            "deployed", osFilter={"linux": True, "windows": True, "macOS": True}
        )
        deploy_job["tasks"][0]["command"] = "Deployed"
        deploy_file = write_job(source, deploy_job)
        binary = source / "Deployed-build"
        binary.write_bytes(script)
        args = ["job", "deploy", str(deploy_file), "--binary", str(binary)]
        args += ["--agent-root", str(emu.agent_root), "--trigger", *conn]
        installed = emu.agent_root / "Jobs/bin/Deployed/Deployed"
        code, out, err = run(capsys, *args)
        assert (code, err) == (0, ""), err
        assert out.splitlines()[0] == f"binary: installed {installed}"
        assert "create: job 'deployed' registered (Job 'deployed' created)" in out
        code, out, err = run(capsys, *args)
        assert (code, err) == (0, ""), err
        assert out.splitlines()[0] == f"binary: unchanged {installed}"
        assert "create: job 'deployed' registered (Job 'deployed' updated)" in out
        runs = [r for r in emu.runs if r.job_id == "deployed"]
        assert len(runs) == 2
        assert all(r.done.wait(30) and r.status == "succeeded" for r in runs), runs
        assert [j.id for j in emu.jobs()] == ["deployed"]

        # Credentials the agent does not accept: exit 77 with the reason.
        code, _, err = run(
            capsys, "job", "list", "--url", emu.base_url, "--ca-bundle", str(emu.ca_bundle)
        )
        assert code == 77 and "none was given" in err
        code, _, err = run(
            capsys,
            "job",
            "list",
            "--url",
            emu.base_url,
            "--cert",
            str(pki.other_pem),
            "--ca-bundle",
            str(emu.ca_bundle),
        )
        # Another CA's certificate completes TLS and gets the documented 403 (Admin tier).
        assert code == 77 and "refused the job list with 403 (TLS worked)" in err


def test_get_prints_what_the_agent_holds_even_outside_the_model(
    capsys: pytest.CaptureFixture[str], server: HttpsServer, conn: list[str]
) -> None:
    """`job get` shows the agent's JSON as sent, e.g. an enum serialized as a number."""
    stored = example_job("num")
    stored["tasks"][0]["ExecutionType"] = 0  # .NET writes enums as numbers by default
    server.route("GET", r"/api/Jobs/num", Response(200, stored))
    code, out, err = run(capsys, "job", "get", "num", *conn)
    assert (code, err) == (0, "") and json.loads(out) == stored


def test_reload_shows_the_agents_message_and_skipped_files(
    capsys: pytest.CaptureFixture[str], server: HttpsServer, conn: list[str]
) -> None:
    """Human output of reload carries the agent's message and each problem it listed."""
    body = {"message": "Reloaded 1 job(s)", "errors": ["Jobs/bad.json:2:1: malformed JSON"]}
    server.route("POST", r"/api/Jobs/reload", Response(200, body))
    code, out, _ = run(capsys, "job", "reload", *conn)
    assert code == 0
    assert out.splitlines() == [
        "the agent reloaded its job definitions from disk (Reloaded 1 job(s))",
        "agent: warning: Jobs/bad.json:2:1: malformed JSON",
    ]


# -- hostile option values and wrong services ------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "nan", "0", "inf", "-inf", "1e10", "abc", ""])
def test_bad_timeout_is_one_line_exit_64_and_json_error(
    capsys: pytest.CaptureFixture[str], closed_url: str, value: str
) -> None:
    """--timeout outside (0, 86400] or not a number: one plain line, exit 64, nothing sent;
    with --json a JSON error object on stdout."""
    code, out, err = run(capsys, "job", "list", "--url", closed_url, f"--timeout={value}")
    assert (code, out) == (64, "")
    assert err.startswith(f"keeper-task: error: --timeout {value!r} ") and err.count("\n") == 1
    code, out, err = run(capsys, "job", "list", "--json", "--url", closed_url, f"--timeout={value}")
    assert code == 64 and err.count("\n") == 1
    assert json.loads(out) == {"ok": False, "error": err.strip()[20:], "exitCode": 64}


def test_url_at_the_emulators_mqtt_broker_says_so_exit_69(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--url at the broker port `dev agent` prints: "an MQTT broker over TLS", exit 69, not
    the client-certificate diagnosis (77)."""
    from keeper_task.emulator import Emulator

    with Emulator() as emu:
        assert emu.broker is not None
        url = f"https://127.0.0.1:{emu.broker.port}"
        cert = ["--cert", str(emu.admin_cert), "--key", str(emu.admin_key), "--timeout", "5"]
        code, out, err = run(capsys, "job", "list", "--json", "--url", url, *cert)
    assert code == 69
    assert "is not the agent's HTTPS API: it is an MQTT broker over TLS" in err
    assert "client certificate" not in err and err.count("\n") == 1
    assert json.loads(out)["exitCode"] == 69


def test_url_at_a_plain_mqtt_broker_says_so_exit_69(
    capsys: pytest.CaptureFixture[str], amqtt_broker: Any
) -> None:
    """A broker without TLS: "an MQTT broker without TLS", exit 69."""
    url = f"https://127.0.0.1:{amqtt_broker.port}"
    code, _, err = run(capsys, "job", "list", "--url", url, "--timeout", "5")
    assert code == 69
    assert "it is an MQTT broker without TLS" in err and err.count("\n") == 1


def test_url_at_a_plain_http_port_says_so_exit_69(capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's HTTP port given as an https:// URL: "plain HTTP, not HTTPS", exit 69."""
    from keeper_task.emulator import Emulator

    with Emulator(http_port=0) as emu:
        url = f"https://127.0.0.1:{emu.http_port}"
        code, _, err = run(capsys, "job", "list", "--url", url, "--timeout", "5")
    assert code == 69
    assert "it speaks plain HTTP, not HTTPS" in err and err.count("\n") == 1


def test_untrusted_tls_certificate_error_names_the_reason_once(
    capsys: pytest.CaptureFixture[str], server: HttpsServer, pki: AdminPki
) -> None:
    """A CA bundle that does not verify the agent: the OpenSSL reason appears once."""
    other = trustme.CA()
    bundle = pki.ca_bundle.parent / "unrelated-ca.pem"
    other.cert_pem.write_to_path(str(bundle))
    code, _, err = run(capsys, "job", "list", "--url", server.base_url, "--ca-bundle", str(bundle))
    assert code == 69 and err.count("\n") == 1
    assert err.count("CERTIFICATE_VERIFY_FAILED") == 1, err


def test_create_and_update_check_offline_before_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], agent: FakeJobsAgent, conn: list[str]
) -> None:
    """An invalid job never reaches the agent: underscore ids, a file named differently
    from the id (create; --any-file-name allows it), an invalid body for update."""
    underscore = write_job(tmp_path, example_job("under_score"))
    code, out, err = run(capsys, "job", "create", "--json", str(underscore), *conn)
    assert code == 1 and err.count("\n") == 1 and "nothing was sent to the agent" in err
    body = json.loads(out)
    assert body["exitCode"] == 1 and any("for example 'under-score'" in e for e in body["errors"])
    renamed = tmp_path / "other-name.json"
    renamed.write_text(json.dumps(example_job("disk-usage-reporter")), encoding="utf-8")
    code, _, err = run(capsys, "job", "create", str(renamed), *conn)
    assert code == 1 and "does not match the file name 'other-name.json'" in err
    assert agent.server.requests == []
    code, _, err = run(capsys, "job", "create", "--any-file-name", str(renamed), *conn)
    assert (code, err) == (0, "")
    assert [r.method for r in agent.server.requests] == ["POST"]
    broken = example_job()
    broken["tasks"][0]["timeoutSeconds"] = 0
    code, _, err = run(
        capsys, "job", "update", "disk-usage-reporter", str(write_job(tmp_path, broken)), *conn
    )
    assert code == 1 and "timeoutSeconds must be a positive integer" in err
    # The URL id is what the agent stores: an invalid URL id is refused before sending too.
    code, _, err = run(
        capsys, "job", "update", "bad_id", str(write_job(tmp_path, example_job())), *conn
    )
    assert code == 1 and "underscore" in err
    assert [r.method for r in agent.server.requests] == ["POST"]


def test_validate_huge_integer_is_one_line_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An integer of more than 4,300 digits: one error line (exit 1), and a JSON report."""
    path = tmp_path / "big.json"
    path.write_text('{"id": "big", "priority": ' + "9" * 5000 + "}", encoding="utf-8")
    code, out, err = run(capsys, "job", "validate", str(path))
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        f"{path}: error: an integer has 5000 digits; at most 4300 are accepted (no job field "
        "needs more than a few)",
        f"{path}: invalid (1 error)",
    ]
    code, out, _ = run(capsys, "job", "validate", "--json", str(path))
    assert code == 1 and json.loads(out)["files"][0]["errors"][0].endswith("needs more than a few)")


@settings(max_examples=150, deadline=None)
@given(
    command=st.sampled_from(["list", "get", "delete", "trigger", "run", "validate", "create"]),
    option=st.sampled_from(["--timeout", "--url", "--cert", "--key", "--ca-bundle", "--context"]),
    value=st.text(max_size=40),
)
def test_no_option_value_gives_a_traceback(command: str, option: str, value: str) -> None:
    """Any value for any option of `keeper-task job`: an exit code from the documented set and
    at most one error line, never a traceback (the agent URL points nowhere)."""
    import contextlib
    import io

    args = ["job", command]
    if command in ("get", "delete", "trigger", "run"):
        args.append("some-id")
    if command in ("validate", "create"):
        args.append(os.devnull)
    if option == "--context" and command != "trigger":
        option = "--timeout"
    args.append(f"{option}={value}")
    if option != "--url":
        args += ["--url", "https://127.0.0.1:9"]  # discard port: nothing listens
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    assert code in {0, 1, 64, 68, 69, 77, 78}, (args, code, err.getvalue())
    assert "Traceback" not in err.getvalue() and err.getvalue().count("\n") <= 1, err.getvalue()


def test_timeout_bounds_and_directory_job_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout accepts (0, 86400]; a directory given as the job file is exit 64."""
    from keeper_task.cli.job import parse_timeout
    from keeper_task.errors import UsageError

    assert parse_timeout("86400") == 86400.0 and parse_timeout("0.5") == 0.5
    with pytest.raises(UsageError, match="out of range"):
        parse_timeout("86400.5")
    code, out, err = run(capsys, "job", "validate", str(tmp_path))
    assert (code, out) == (64, "")
    assert err == f"keeper-task: error: job file {tmp_path} is a directory, not a JSON file\n"
