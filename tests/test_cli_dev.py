"""`keeper-task dev run` and `dev agent` as real subprocesses: the hello example, bad inputs."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.support.emulator import job_data
from tests.support.projects import run_captured

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello" / "job.json"


def _cli(*args: str, tmp: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp)}  # the emulator's temporary state goes here
    for key in ("KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE"):
        env.pop(key, None)
    return run_captured(
        [sys.executable, "-m", "keeper_task.cli", *args], env=env, cwd=ROOT, timeout=timeout
    )


def _assert_clean(tmp: Path) -> None:
    assert psutil.Process().children(recursive=True) == []
    assert list(tmp.glob("keeper-task-emulator-*")) == []


def _start_dev_agent(state: Path) -> subprocess.Popen[str]:
    """Start ``keeper-task dev agent --state-dir state`` with its output piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "keeper_task.cli", "dev", "agent", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A queue fed with ``proc``'s stdout lines by a thread (None at EOF)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_line(lines: queue.Queue[str | None], match: Callable[[str], bool]) -> str:
    """The first line that matches (fails after 30 s without one, or at EOF)."""
    while True:
        line = lines.get(timeout=30)
        assert line is not None, "the process ended before printing the expected line"
        if match(line):
            return line


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
    ("name", "content", "expected", "code"),
    [
        ("missing", None, "not found", 64),
        ("malformed", '{"id": "x",', "malformed JSON", 78),
        ("underscore", json.dumps(job_data("bad_id")), "_", 78),
        (
            "no-binary",
            json.dumps(job_data("no-binary")),
            "task binary for command 'probe' not found",
            69,
        ),
    ],
)
def test_dev_run_bad_inputs_give_one_line(
    tmp_path: Path, name: str, content: str | None, expected: str, code: int
) -> None:
    """Missing job file (a usage error, 64), invalid job file, '_' in the id, missing binary:
    one error line and the documented exit code."""
    job = tmp_path / "jobs" / f"{name}.json"
    job.parent.mkdir()
    if content is not None:
        job.write_text(content)
    result = _cli("dev", "run", str(job), tmp=tmp_path)
    assert result.returncode == code, result.stderr
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
    """`dev agent` prints base URL, CA bundle, admin cert/key and a curl line; the seed's
    curl flows (list, create from a job file with -d @file, trigger, delete) work unchanged
    but for paths, a triggered run is reported, no client certificate means 403, and a
    broken job file found at start is reported."""
    state = tmp_path / "state"
    (state / "Jobs").mkdir(parents=True)
    (state / "Jobs" / "broken.json").write_text('{"id": "broken",')
    proc = _start_dev_agent(state)
    try:
        lines = _lines_of(proc)
        head = [_wait_line(lines, lambda ln: ln.startswith("keeper-task dev agent: serving"))]
        while not head[-1].startswith("Press Ctrl-C"):
            head.append(_wait_line(lines, lambda ln: True))
        base = head[0].split()[-1]
        info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:-1])}
        ca, cert, key = info["CA bundle"], info["admin cert"], info["admin key"]
        assert base.startswith("https://127.0.0.1:")
        assert Path(ca) == state / "ca.pem" and Path(cert).is_file() and Path(key).is_file()
        assert info["try"] == f"curl --cacert {ca} --cert {cert} --key {key} {base}/api/Jobs"
        bin_dir = state / "Jobs" / "bin" / "probe"
        bin_dir.mkdir(parents=True)
        (bin_dir / "probe").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "probe").chmod(0o755)
        job = tmp_path / "probe-job.json"
        job.write_text(json.dumps(job_data("probe-job"), indent=2))  # -d strips newlines
        creds = ["--cert", cert, "--key", key, "--cacert", ca]
        json_type = ["-H", "Content-Type: application/json"]

        def curl(*args: str) -> dict:
            out = subprocess.run(["curl", "-s", *args], capture_output=True, text=True, check=True)
            return json.loads(out.stdout)

        assert curl(*creds, f"{base}/api/Jobs")["count"] == 0
        created = curl("-X", "POST", *creds, *json_type, "-d", f"@{job}", f"{base}/api/Jobs")
        assert created["success"] is True, created
        listed = curl(*creds, f"{base}/api/Jobs")
        assert listed["count"] == 1 and listed["jobs"][0]["id"] == "probe-job"
        trigger = f"{base}/api/Jobs/probe-job/trigger"
        run_id = curl("-X", "POST", *creds, *json_type, "-d", "{}", trigger)["runId"]
        ended = _wait_line(
            lines,
            lambda ln: ln.startswith(f"[run] job probe-job {run_id}") and "started" not in ln,
        )
        assert "(trigger): succeeded, exit code 0" in ended
        deleted = curl("-X", "DELETE", *creds, f"{base}/api/Jobs/probe-job")
        assert deleted["success"] is True
        assert not (state / "Jobs" / "probe-job.json").exists()
        refused = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                ca,
                base + "/api/Jobs",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.stdout == "403"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert "keeper-task: job file skipped:" in stderr and "broken.json" in stderr
    assert psutil.Process().children(recursive=True) == []


def test_dev_agent_shows_each_log_event_of_a_triggered_run_once(tmp_path: Path) -> None:
    """A keeper-task binary triggered over the Admin API: each of its log events is printed
    once (stderr and KeeperLogger copies paired), all before the run's end line."""
    from keeper_task.agent.jobs import JobsClient
    from keeper_task.tls import client_ssl_context

    state = tmp_path / "state"
    bin_dir = state / "Jobs" / "bin" / "hello"
    bin_dir.mkdir(parents=True)
    binary = bin_dir / "hello"
    hello_src = (ROOT / "examples" / "hello" / "task.py").read_text()
    binary.write_text(f"#!{sys.executable}\n{hello_src}")
    binary.chmod(0o755)
    job = json.loads(HELLO.read_text())
    job["events"] = [{"eventType": "Manual"}]  # not Startup: `dev agent` would run it at start
    (state / "Jobs" / "hello-task.json").write_text(json.dumps(job))
    proc = _start_dev_agent(state)
    try:
        lines = _lines_of(proc)
        base = _wait_line(lines, lambda ln: ln.startswith("keeper-task dev agent: serving"))
        base = base.split()[-1]
        tls = client_ssl_context(
            host="127.0.0.1",
            ca_bundle=state / "ca.pem",
            client_cert=state / "admin.pem",
            client_key=state / "admin-key.pem",
        )
        with JobsClient(base, ssl_context=tls) as jobs:
            jobs.trigger("hello-task")
        seen: list[str] = []
        while True:
            line = _wait_line(lines, lambda ln: True)
            seen.append(line)
            if line.startswith("[run] job hello-task") and "started" not in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    assert "succeeded, exit code 0" in seen[-1]
    hello = [ln for ln in seen if " hello " in f"{ln} "]
    assert len(hello) == 1, seen
    assert hello[0].startswith("[KeeperLogger] Information hello")
    assert psutil.Process().children(recursive=True) == []


HANGING_TASK = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("child", child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_dev_run_interrupted_kills_the_task_tree_and_summarises(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM while the task runs: the task and its child are killed, a summary
    line names the signal, the exit code is 128+N, no process or temporary state is left
    (a second signal during the cleanup does not abort it)."""
    (tmp_path / "task.py").write_text(HANGING_TASK)
    job = tmp_path / "sig-job.json"
    job.write_text(json.dumps(job_data("sig-job")))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keeper_task.cli", "dev", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        lines = _lines_of(proc)
        child = int(_wait_line(lines, lambda ln: ln.startswith("[stdout] child")).split()[-1])
        task_pid = psutil.Process(child).ppid()
        proc.send_signal(signum)
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
        summary = _wait_line(lines, lambda ln: ln.startswith("--- job"))
        task_line = _wait_line(lines, lambda ln: ln.startswith("    task"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert summary.startswith(f"--- job sig-job: interrupted by {signum.name} after")
    assert f"exit code {128 + signum}" in summary
    assert f"(pid {task_pid}) (killed: dev run was stopped)" in task_line
    for pid in (child, task_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    _assert_clean(tmp_path)


@pytest.mark.parametrize("case", ["task-not-on-path", "task-path-missing", "not-executable", "dir"])
def test_dev_run_unstartable_task_gives_one_line(tmp_path: Path, case: str) -> None:
    """A --task command that does not exist, a Jobs/bin binary that is not executable, or a
    directory given as the job: one error line before anything starts, non-zero exit."""
    job = tmp_path / "agent" / "Jobs" / "probe-job.json"
    job.parent.mkdir(parents=True)
    job.write_text(json.dumps(job_data("probe-job")))
    args = ["dev", "run", str(job)]
    expected = {
        "task-not-on-path": "'no-such-tool-x' is not a file and not found on PATH",
        "task-path-missing": f"{tmp_path}/nowhere/tool does not exist",
        "not-executable": "is not executable; run `chmod +x",
        "dir": f"no job to run in {job.parent}: expected a project made by keeper-task new",
    }[case]
    if case == "task-not-on-path":
        args += ["--task", "no-such-tool-x --flag"]
    elif case == "task-path-missing":
        args += ["--task", f"{tmp_path}/nowhere/tool"]
    elif case == "not-executable":
        binary = job.parent / "bin" / "probe" / "probe"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o644)
    else:
        args = ["dev", "run", str(job.parent)]
    result = _cli(*args, tmp=tmp_path)
    # A bad --task or a directory without a job: usage errors; a job's unusable binary: 69.
    assert result.returncode == (69 if case == "not-executable" else 64), result.stderr
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in errors[0]
    assert result.stdout == ""
    _assert_clean(tmp_path)


def test_dev_without_the_emulator_extra_says_what_to_install(tmp_path: Path) -> None:
    """Without the [emulator] extra's packages, `dev run` prints one line naming the extra."""
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"  # as if aiohttp were not installed
        "from keeper_task.cli import main\n"
        f"sys.exit(main(['dev', 'run', {str(HELLO)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "keeper-task: error: keeper-task dev needs the [emulator] extra (module 'aiohttp' is "
        "missing): pip install 'keeper-task[emulator]'"
    ]


def test_dev_run_output_pairs_log_copies_by_whole_document() -> None:
    """Two events of the same millisecond with the same message name (a loop logging items)
    are each shown once, whichever copy (stderr or KeeperLogger) arrives first."""
    import io

    from keeper_task.cli.dev import _Printer
    from keeper_task.emulator import BrokerMessage, OutputLine

    def doc(rank: int) -> str:
        return json.dumps(
            {
                "timestamp": "t1",
                "level": "Information",
                "message": "item",
                "properties": {"rank": rank},
            }
        )

    out, err = io.StringIO(), io.StringIO()
    printer = _Printer(out, err, verbose=False)
    for rank in (1, 2):
        printer(BrokerMessage("KeeperLogger", doc(rank).encode()))
    for rank in (1, 2):
        printer(OutputLine("run-1", "t", "stderr", doc(rank)))
    for rank in (3, 4):
        printer(OutputLine("run-1", "t", "stderr", doc(rank)))
    for rank in (3, 4):
        printer(BrokerMessage("KeeperLogger", doc(rank).encode()))
    printer(OutputLine("run-1", "t", "stderr", doc(5)))  # never reached the broker
    printer.flush()
    assert out.getvalue().splitlines() == [
        *(f"[KeeperLogger] Information item rank={rank}" for rank in (1, 2, 3, 4)),
        "[stderr] Information item rank=5",
    ]


def test_dev_run_without_argument_runs_the_projects_source(tmp_path: Path) -> None:
    """In a project made by `keeper-task new`, `dev run` (no argument) runs this OS's job
    from the project's source, says which job and which executable, and shows the task's
    KeeperLogger lines; `dev run DIR` does the same from elsewhere."""
    from keeper_task import scaffold

    spec = scaffold.make_spec("demo-task")
    project = tmp_path / "demo-task"
    scaffold.create_project(spec, project)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for key in ("KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE", "PYTHONPATH"):
        env.pop(key, None)
    host = scaffold.current_os()
    # In the project, in one of its sub-directories (found upwards), and given as DIR.
    for cwd, args, where, source in (
        (project, [], "", "src/demo_task"),
        (project / "src", [], f"{project}/", "demo_task"),
        (tmp_path, ["demo-task"], "demo-task/", "demo-task/src/demo_task"),
    ):
        result = run_captured(
            [sys.executable, "-m", "keeper_task.cli", "dev", "run", *args],
            env=env,
            cwd=cwd,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.splitlines()[:2] == [
            f"keeper-task: job {where}jobs/{host}/demo-task.json (the project's job for {host} "
            "(pyproject.toml))",
            f"keeper-task: task run: running {sys.executable} -m demo_task (no 'DemoTask' "
            f"binary yet: the project's source {source} with this Python; "
            "`keeper-task build` makes the binary)",
        ]
        logs = [ln for ln in result.stdout.splitlines() if ln.startswith("[KeeperLogger]")]
        started = "[KeeperLogger] Information demo_task.started task=DemoTask dry_run=false"
        assert started in logs, result.stdout
        assert "--- job demo-task: succeeded" in result.stdout
    _assert_clean(tmp_path)


def test_dev_run_names_a_binary_found_under_the_agent_root(tmp_path: Path) -> None:
    """A binary at Jobs/bin/<command>/<command> under --agent-root is the one launched, and
    the line says so (not the project's source, not PATH)."""
    from keeper_task import scaffold

    scaffold.create_project(scaffold.make_spec("demo-task"), tmp_path / "demo-task")
    project = tmp_path / "demo-task"
    binary = project / "dist" / "Jobs" / "bin" / "DemoTask" / "DemoTask"
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!/bin/sh\nPYTHONPATH='{project / 'src'}' exec '{sys.executable}' "
                      '-m demo_task "$@"\n')  # fmt: skip
    binary.chmod(0o755)
    result = _cli("dev", "run", str(project), "--agent-root", str(project / "dist"), tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    running = [ln for ln in result.stderr.splitlines() if ": running " in ln]
    assert running == [
        f"keeper-task: task run: running {binary} (Jobs/bin/DemoTask/ under the agent root "
        f"{project / 'dist'})"
    ]
    assert "demo_task.finished" in result.stdout
    _assert_clean(tmp_path)


def test_dev_run_loads_a_plugins_folder_beside_the_job(tmp_path: Path) -> None:
    """examples/plugin_settings runs as its README line shows: its plugins/ folder is loaded
    (without it the plugin is unknown and the task exits 68)."""
    result = _cli("dev", "run", "examples/plugin_settings/job.json", tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "keeper-task: plugin settings from examples/plugin_settings/plugins" in result.stderr
    assert "settings.written" in result.stdout
    _assert_clean(tmp_path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "missing command after 'keeper-task': one of new, dev,"),
        (["dev"], "missing command after 'keeper-task dev': one of run, agent"),
        (["dev", "run", "--bogus"], "unrecognized arguments: --bogus"),
        (["dev", "run", "nowhere.json"], "job file nowhere.json not found"),
        (["dev", "run", str(HELLO), "--setting", "novalue"], "expected KEY=VALUE"),
        (["dev", "run", str(HELLO), "--timeout", "0"], "--timeout must be > 0"),
        (["dev", "run", str(HELLO), "--task", "no-such-tool-x"], "not found on PATH"),
        (["dev", "run", str(HELLO), "--context", "{"], "--context"),
        (["new", "bad_name"], "contains '_'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_64(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """Everything wrong before a run starts: one `keeper-task: error:` line, exit 64."""
    result = _cli(*args, tmp=tmp_path)
    assert result.returncode == 64, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("keeper-task: error: ") and expected in result.stderr
    assert result.stdout == ""


def test_dev_agent_takes_port_6889_else_warns_and_takes_a_free_one(tmp_path: Path) -> None:
    """`dev agent` serves on the agent's port 6889; when it is taken, a one-line warning
    names the port used instead."""
    from keeper_task.cli.dev import AGENT_PORT

    holder: socket.socket | None = socket.socket()
    try:
        holder.bind(("127.0.0.1", AGENT_PORT))
        holder.listen()
    except OSError:  # something else holds 6889 already: the fallback is what we test
        holder.close()
        holder = None
    # A broken job file: its notice shows that the fallback emulator's events are printed.
    (tmp_path / "state" / "Jobs").mkdir(parents=True)
    (tmp_path / "state" / "Jobs" / "broken.json").write_text('{"id": "broken",')
    proc = _start_dev_agent(tmp_path / "state")
    try:
        lines = _lines_of(proc)
        serving = _wait_line(lines, lambda ln: ln.startswith("keeper-task dev agent: serving"))
        port = int(serving.rsplit(":", 1)[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
        if holder is not None:
            holder.close()
    assert port != AGENT_PORT
    warnings = [ln for ln in stderr.splitlines() if "warning" in ln]
    assert warnings == [
        f"keeper-task: warning: port {AGENT_PORT} (the agent's) is in use; serving on {port} "
        f"instead: pass --url https://127.0.0.1:{port} to keeper-task job and deploy.sh"
    ]
    assert "keeper-task: job file skipped:" in stderr and "broken.json" in stderr
    # Free again: the agent's port is taken.
    proc = _start_dev_agent(tmp_path / "state")
    try:
        serving = _wait_line(
            _lines_of(proc), lambda ln: ln.startswith("keeper-task dev agent: serving")
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    if holder is not None:  # we held it, so it is ours to check now
        assert serving == f"keeper-task dev agent: serving https://127.0.0.1:{AGENT_PORT}"
        assert "warning" not in stderr
    assert psutil.Process().children(recursive=True) == []


def test_dev_run_output_follows_event_time_not_arrival() -> None:
    """A task's log burst arrives after the publish it made in between: lines are shown by
    event time (log timestamps, arrival time otherwise), each held the ordering window."""
    import io
    import time

    from keeper_task.cli.dev import _Printer
    from keeper_task.emulator import BrokerMessage, OutputLine
    from keeper_task.log_schema import format_timestamp

    def log(message: str, at: float) -> bytes:
        body = {"timestamp": format_timestamp(at), "level": "Information", "message": message}
        return json.dumps(body).encode()

    out, err = io.StringIO(), io.StringIO()
    printer = _Printer(out, err, verbose=False, window=3600)  # nothing released before flush
    base = time.time()  # event times near now: the window (3600 s) holds them until flush()
    printer(BrokerMessage("Jobs/x/events", b'{"event":"started"}', time=base + 0.010))
    printer(BrokerMessage("KeeperLogger", log("connected", base + 0.001), time=base + 0.060))
    printer(BrokerMessage("KeeperLogger", log("item", base + 0.020), time=base + 0.061))
    printer(OutputLine("run-1", "t", "stdout", "plain print", time=base + 0.015))
    assert out.getvalue() == ""  # held back: a later arrival may still belong before
    printer.flush()
    assert out.getvalue().splitlines() == [
        "[KeeperLogger] Information connected",
        '[mqtt Jobs/x/events] {"event":"started"}',
        "[stdout] plain print",
        "[KeeperLogger] Information item",
    ]

    # With a short window, lines are released by the writer thread without a flush.
    class Watched(io.StringIO):
        written = threading.Event()

        def write(self, text: str) -> int:
            count = super().write(text)
            self.written.set()
            return count

    out2 = Watched()
    streaming = _Printer(out2, err, verbose=False, window=0.05)
    streaming(OutputLine("run-1", "t", "stdout", "live"))
    assert out2.written.wait(200 * 0.05)  # a generous multiple of the window
    assert out2.getvalue() == "[stdout] live\n"


def test_dev_run_in_a_project_without_a_job_for_this_os(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A project whose jobs are all for other OSes: one line naming the missing file and the
    ones there are, exit 64, nothing started."""
    from keeper_task import scaffold
    from keeper_task.cli import main as cli_main

    host = scaffold.current_os()
    others = [o for o in scaffold.OS_NAMES if o != host]
    project = tmp_path / "demo-task"
    scaffold.create_project(scaffold.make_spec("demo-task", oses=others), project)
    assert cli_main(["dev", "run", str(project)]) == 64
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("keeper-task: error: project ") and len(err.splitlines()) == 1
    assert f"has no job for {host}: {project}/jobs/{host}/demo-task.json is missing" in err
    assert f"jobs/{others[0]}/demo-task.json" in err
