"""The emulator's job runner with real processes: resolution, arguments, env, timeout, failures."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest

from keeper_task.emulator import EXIT_NOT_STARTED, EXIT_TIMEOUT, Emulator, build_argv
from keeper_task.emulator.errors import EmulatorError
from keeper_task.emulator.launcher import resolve_task_command
from keeper_task.jobs import JobTask
from tests.support.emulator import PYTHON, job_data

ENV_PRINTER = (
    "import os, sys; print(os.environ.get('KEEPER_JOB_ID'), os.environ.get('KEEPER_JOB_NAME'));"
    " print(' '.join(sys.argv[1:]))"
)


def _task(task_id: str, code: str, **extra) -> dict:
    return {
        "id": task_id,
        "name": task_id,
        "command": task_id,
        "arguments": f'-c "{code}" {extra.pop("arguments", "")}',
        "timeoutSeconds": extra.pop("timeoutSeconds", 30),
        "continueOnFailure": extra.pop("continueOnFailure", False),
        **extra,
    }


@pytest.fixture(scope="module")
def agent():
    with Emulator(kill_grace=0.5) as emulator:
        yield emulator


def test_arguments_substitute_the_base_url_and_env_names_the_job(agent: Emulator) -> None:
    """{KeeperApiBaseUrl} becomes https://127.0.0.1:<port>; KEEPER_JOB_ID/NAME are set."""
    agent.add_job(
        job_data("env-job", tasks=[_task("env", ENV_PRINTER, arguments="{KeeperApiBaseUrl}")])
    )
    run = agent.run_job("env-job", command=[PYTHON], wait=60)
    assert run.exit_code == 0, run.tasks[0].stderr
    assert run.tasks[0].stdout_lines == ["env-job Probe job", agent.base_url]
    assert not agent.base_url.endswith("/")


def test_no_mqtt_topics_means_no_job_env_and_unknown_tokens_are_reported(agent: Emulator) -> None:
    """Without mqttTopics the agent sets no KEEPER_JOB_ID; unknown {Tokens} raise a notice."""
    data = job_data("bare-job", tasks=[_task("bare", ENV_PRINTER, arguments="{JobParam}")])
    del data["mqttTopics"]
    agent.add_job(data)
    run = agent.run_job("bare-job", command=[PYTHON], wait=60)
    assert run.tasks[0].stdout_lines == ["None None", "{JobParam}"]
    assert any("{JobParam}" in n.text for n in agent.notices)


def test_timeout_kills_the_whole_process_tree(agent: Emulator) -> None:
    """Past timeoutSeconds the task and its children are killed; exit code 124."""
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    agent.add_job(job_data("hang-job", tasks=[_task("hang", code, timeoutSeconds=1)]))
    run = agent.run_job("hang-job", command=[PYTHON], wait=60)
    task = run.tasks[0]
    assert run.status == "timed_out" and run.exit_code == EXIT_TIMEOUT
    assert task.timed_out and task.duration < 10
    child = int(task.stdout_lines[0])
    for pid in (task.pid, child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert any("timeout" in n.text for n in agent.notices)


def test_continue_on_failure_decides_whether_later_tasks_run(agent: Emulator) -> None:
    """A failing task stops the job unless it has continueOnFailure: true."""
    fail = "import sys; sys.exit(3)"
    ok = "print('second ran')"
    agent.add_job(
        job_data(
            "cont-job",
            tasks=[_task("first", fail, continueOnFailure=True), _task("second", ok)],
        )
    )
    agent.add_job(job_data("stop-job", tasks=[_task("first", fail), _task("second", ok)]))
    cont = agent.run_job("cont-job", command=[PYTHON], wait=60)
    stop = agent.run_job("stop-job", command=[PYTHON], wait=60)
    assert [t.exit_code for t in cont.tasks] == [3, 0]
    assert cont.exit_code == 3 and cont.status == "failed"
    assert cont.tasks[1].stdout_lines == ["second ran"]
    assert [t.task_id for t in stop.tasks] == ["first"]


def test_leftover_processes_are_killed_and_reported(agent: Emulator) -> None:
    """A task that exits leaving a daemon behind gets it killed, with a notice."""
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True)"
    )
    agent.add_job(job_data("leak-job", tasks=[_task("leak", code)]))
    run = agent.run_job("leak-job", command=[PYTHON], wait=60)
    child = int(run.tasks[0].stdout_lines[0])
    proc = psutil.Process(child) if psutil.pid_exists(child) else None
    if proc is not None:
        proc.wait(timeout=5)
    assert any("left processes running" in n.text for n in agent.notices)


def test_binary_resolution_order_and_missing_binary(tmp_path: Path, agent: Emulator) -> None:
    """Jobs/bin/<command>/<command> wins over executablePath; a missing binary exits 127."""
    binary = tmp_path / "Jobs" / "bin" / "tool" / "tool"
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!{sys.executable}\nprint('from Jobs/bin')\n")
    binary.chmod(0o755)
    other = tmp_path / "other"
    other.write_text(f"#!{sys.executable}\nprint('from executablePath')\n")
    other.chmod(0o755)
    task = JobTask.model_validate({"command": "tool", "executablePath": str(other)})
    assert resolve_task_command(task, agent_root=tmp_path) == [str(binary)]
    binary.unlink()
    assert resolve_task_command(task, agent_root=tmp_path) == [str(other)]
    with pytest.raises(EmulatorError, match="not found"):
        resolve_task_command(JobTask.model_validate({"command": "nope-x"}), agent_root=tmp_path)
    agent.add_job(job_data("missing-job"))
    run = agent.run_job("missing-job", agent_root=tmp_path, wait=60)
    assert run.exit_code == EXIT_NOT_STARTED and "not found" in run.tasks[0].error


def test_build_argv_splits_like_a_shell() -> None:
    """Arguments are one string split like a POSIX shell after substitution."""
    argv, unknown = build_argv(["tool"], "--a='x y' --base={KeeperApiBaseUrl}", "https://h:1")
    assert argv == ["tool", "--a=x y", "--base=https://h:1"] and unknown == []


def test_kill_tree_leaves_the_launched_process_to_its_owner() -> None:
    """Killing a task tree never reaps the launched process itself, so its owner (asyncio's
    child watcher) still sees the real signal instead of "unknown child, exit 255"."""
    import signal
    import subprocess

    from keeper_task.emulator.launcher import _kill_tree

    proc = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        _kill_tree(proc.pid, 5.0, lambda: proc.poll() is not None)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stopping_the_emulator_kills_a_running_task_and_marks_the_run(tmp_path: Path) -> None:
    """stop() while a task runs kills its tree; the run ends as "stopped" with the signal's
    exit code and no leftover-process notice."""
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    agent = Emulator(kill_grace=0.5).start()
    try:
        agent.add_job(job_data("stop-job", tasks=[_task("hang", code, timeoutSeconds=60)]))
        run = agent.start_run("stop-job", command=[PYTHON])
        assert agent.wait_for(lambda: any(o.stream == "stdout" for o in agent.output), 20)
        child = int(next(o.text for o in agent.output if o.stream == "stdout"))
    finally:
        agent.stop()
    assert run.done.is_set() and run.status == "stopped"
    task = run.tasks[0]
    assert task.stopped and task.exit_code == 128 + 15  # SIGTERM, not a bogus 255
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
    assert not any("left processes running" in n.text for n in agent.notices)
