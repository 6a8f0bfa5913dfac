"""`keeper-task dev run` and `dev agent` as real subprocesses: the hello example, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.emulator import job_data

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello" / "job.json"


def _cli(*args: str, tmp: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp)}  # the emulator's temporary state goes here
    for key in ("KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "keeper_task.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def _assert_clean(tmp: Path) -> None:
    assert psutil.Process().children(recursive=True) == []
    assert list(tmp.glob("keeper-task-emulator-*")) == []


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("keeper-task: error:")]


def test_dev_run_hello_example_prints_its_keeper_logger_message(tmp_path: Path) -> None:
    """The README's first command: the hello task runs from task.py and logs via KeeperLogger."""
    result = _cli("dev", "run", str(HELLO), tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    hello = [ln for ln in result.stdout.splitlines() if ln.startswith("[KeeperLogger]")]
    assert any(
        ln.startswith("[KeeperLogger] Information hello") and "broker=127.0.0.1" in ln
        for ln in hello
    ), result.stdout
    assert "--- job hello-task: succeeded" in result.stdout
    assert "denied: 0" in result.stdout
    _assert_clean(tmp_path)


def test_dev_run_shows_each_log_event_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event on stderr and on KeeperLogger is shown once; one that never reached the
    broker (a startup failure) is still shown, from stderr."""
    ok = _cli("dev", "run", str(HELLO), tmp=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    hello = [ln for ln in ok.stdout.splitlines() if " hello " in ln + " " and "Information" in ln]
    assert hello == [next(ln for ln in hello if ln.startswith("[KeeperLogger]"))]
    monkeypatch.setenv("KEEPER_TASK_TRUST_TIMEOUT", "0.3")  # inherited by the task
    refused = _cli("dev", "run", str(HELLO), "--register-delay", "5", tmp=tmp_path)
    assert refused.returncode == 77
    assert any(
        ln.startswith("[stderr] Error task.error") and "not launched by the agent" in ln
        for ln in refused.stdout.splitlines()
    ), refused.stdout
    _assert_clean(tmp_path)


def test_dev_run_with_task_override(tmp_path: Path) -> None:
    """--task "python examples/hello/task.py" replaces the executable; arguments still follow."""
    result = _cli("dev", "run", str(HELLO), "--task", "python examples/hello/task.py", tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[KeeperLogger] Information hello" in result.stdout
    _assert_clean(tmp_path)


def test_dev_run_reports_denied_publishes_and_exit_code(tmp_path: Path) -> None:
    """A publish outside allowedPublications is reported loudly; the task's exit code is kept."""
    script = tmp_path / "task.py"
    script.write_text(
        "from keeper_task import Task\n"
        "class T(Task):\n"
        "    def run(self, ctx):\n"
        "        ctx.mqtt.publish('Undeclared/topic', b'x', qos=1)\n"
        "        ctx.fail('done', exit_code=3)\n"
        "if __name__ == '__main__':\n"
        "    T.main()\n"
    )
    job = tmp_path / "job.json"
    job.write_text(json.dumps(job_data("deny-job")))
    result = _cli("dev", "run", str(job), tmp=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "DENIED denied publish to 'Undeclared/topic'" in result.stderr
    assert "    DENIED denied publish to 'Undeclared/topic'" in result.stdout
    _assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing", None, "not found"),
        ("malformed", '{"id": "x",', "malformed JSON"),
        ("underscore", json.dumps(job_data("bad_id")), "_"),
        (
            "no-binary",
            json.dumps(job_data("no-binary")),
            "task binary for command 'probe' not found",
        ),
    ],
)
def test_dev_run_bad_inputs_give_one_line(tmp_path: Path, name, content, expected) -> None:
    """Missing/invalid job file, '_' in the id, missing binary: one error line, non-zero exit."""
    job = tmp_path / "jobs" / f"{name}.json"
    job.parent.mkdir()
    if content is not None:
        job.write_text(content)
    result = _cli("dev", "run", str(job), tmp=tmp_path)
    assert result.returncode != 0
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in errors[0]
    _assert_clean(tmp_path)


def test_dev_run_port_in_use(tmp_path: Path) -> None:
    """A port already taken gives one clear line, a non-zero exit, no state left behind."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("dev", "run", str(HELLO), "--port", str(port), tmp=tmp_path)
    assert result.returncode != 0
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and f"port {port}" in errors[0] and "in use" in errors[0]
    _assert_clean(tmp_path)


def test_dev_run_kills_a_task_past_its_timeout(tmp_path: Path) -> None:
    """A task hanging past timeoutSeconds is killed: one clear line, exit 124, nothing left."""
    job = tmp_path / "hang.json"
    data = job_data("hang-job")
    data["tasks"][0]["timeoutSeconds"] = 1
    data["tasks"][0]["arguments"] = "-c 'import time; time.sleep(60)'"
    job.write_text(json.dumps(data))
    result = _cli("dev", "run", str(job), "--task", "python", tmp=tmp_path)
    assert result.returncode == 124, result.stdout + result.stderr
    timeouts = [ln for ln in result.stderr.splitlines() if "ran past its timeout of 1 s" in ln]
    assert len(timeouts) == 1
    _assert_clean(tmp_path)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_dev_agent_serves_the_seed_curl_flows(tmp_path: Path) -> None:
    """`dev agent` prints CA/cert/key and a curl line; list, create, delete work with curl."""
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "keeper_task.cli", "dev", "agent", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                break
        info = dict(ln.strip().split(":", 1) for ln in lines[1:] if ":" in ln)
        curl = info["try"].strip().split()
        assert curl[0] == "curl" and "--cert" in curl and "--key" in curl
        base = curl[-1].rsplit("/api/", 1)[0]
        bin_dir = state / "Jobs" / "bin" / "probe"
        bin_dir.mkdir(parents=True)
        (bin_dir / "probe").write_text("#!/bin/sh\n")
        (bin_dir / "probe").chmod(0o755)
        job = tmp_path / "probe-job.json"
        job.write_text(json.dumps(job_data("probe-job")))

        def run_curl(*extra: str) -> dict:
            out = subprocess.run(
                [*curl[:-1], "-s", "-f", *extra], capture_output=True, text=True, check=True
            )
            return json.loads(out.stdout)

        assert run_curl(f"{base}/api/Jobs")["count"] == 0
        created = run_curl(
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{job}",
            f"{base}/api/Jobs",
        )
        assert created["success"] is True
        assert run_curl(f"{base}/api/Jobs")["count"] == 1
        assert run_curl("-X", "DELETE", f"{base}/api/Jobs/probe-job")["success"] is True
        refused = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                str(state / "ca.pem"),
                f"{base}/api/Jobs",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.stdout == "403"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert (state / "admin.pem").is_file() and (state / "ca.pem").is_file()
    assert psutil.Process().children(recursive=True) == []
