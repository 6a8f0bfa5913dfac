"""Process trust over real sockets: launched tasks, their descendants, the registration delay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keeper_task.emulator import Emulator, ProcessRegistry
from tests.support.emulator import CHILD_PROBE, HTTP_PROBE, PYTHON, job_data, write_script

SETTINGS = "/api/PluginSettings/KeeperPrivilegeManager"


def _probe_job(job_id: str, deadline: float) -> dict:
    data = job_data(job_id)
    data["tasks"][0]["arguments"] = f"{{KeeperApiBaseUrl}} {SETTINGS} {deadline}"
    return data


def test_launched_process_gets_plugin_tier(tmp_path: Path) -> None:
    """A task the emulator launched reads Plugin Settings on its first request."""
    probe = write_script(tmp_path, "probe.py", HTTP_PROBE)
    with Emulator() as agent:
        agent.add_job(_probe_job("tier-job", 0))
        run = agent.run_job("tier-job", command=[PYTHON, str(probe)], wait=60)
        request = agent.requests[-1]
    assert run.exit_code == 0, run.tasks[0].stderr
    assert run.tasks[0].stdout_lines == ["200"]
    assert request.caller == f"pid {run.tasks[0].pid}"


def test_descendant_of_launched_process_is_trusted(tmp_path: Path) -> None:
    """A child of the launched process (PyInstaller onefile re-exec) is trusted too."""
    probe = write_script(tmp_path, "probe.py", HTTP_PROBE)
    parent = write_script(tmp_path, "parent.py", CHILD_PROBE)
    with Emulator() as agent:
        agent.add_job(_probe_job("child-job", 0))
        run = agent.run_job("child-job", command=[PYTHON, str(parent), str(probe)], wait=60)
        caller = agent.requests[-1].caller
    assert run.tasks[0].stdout_lines == ["200"], run.tasks[0].stderr
    assert caller.startswith("pid ") and caller != f"pid {run.tasks[0].pid}"


def test_registration_delay_gives_403_then_200(tmp_path: Path) -> None:
    """During the registration delay the launched task gets 403, then the same process gets
    200. Counted, not timed: the delay outlasts the test, which lands the registration itself
    once the emulator has refused the process twice."""
    probe = write_script(tmp_path, "probe.py", HTTP_PROBE)
    with Emulator(register_delay=3600) as agent:
        agent.add_job(_probe_job("delay-job", 60))
        run = agent.start_run("delay-job", command=[PYTHON, str(probe)])

        def refused() -> list[Any]:
            return [r for r in agent.requests if r.path == SETTINGS and r.status == 403]

        assert agent.wait_for(lambda: len(refused()) >= 2, timeout=60), refused()
        agent.registry.register(refused()[0].pid, "delay-job")  # the registration lands now
        assert run.done.wait(60)
        statuses = [(r.status, r.caller) for r in agent.requests if r.path == SETTINGS]
    lines = run.tasks[0].stdout_lines
    assert lines[:2] == ["403", "403"] and lines[-1] == "200", lines
    pid = f"pid {run.tasks[0].pid}"
    # The emulator recognised the process while it was not yet registered, and refused it.
    assert statuses[0] == (403, pid) and statuses[-1] == (200, pid)


def test_registry_forgets_exited_tasks_and_scopes_explicit_trust() -> None:
    """Trust ends with the task; trusting() is explicit and ends with its block."""
    registry = ProcessRegistry()
    assert registry.job_of(12345) is None
    registry.register(12345, "some-job")
    assert registry.job_of(12345) == "some-job"
    registry.unregister(12345)
    assert registry.job_of(12345) is None
    with registry.trusting(777):
        assert 777 in registry._roots()[0]
    assert 777 not in registry._roots()[0]


def test_grandchild_real_task_is_trusted_for_settings_and_mqtt(
    keeper_agent: Emulator, tmp_path: Path
) -> None:
    """A real task started two process levels below the launched one (a wrapper whose
    child re-executes, like a PyInstaller onefile binary under a launcher script) reads
    Plugin Settings and connects to the broker as the launched job."""
    from keeper_task.testing import run_task

    wrapper = write_script(
        tmp_path, "wrapper.py", "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"
    )
    hello = Path(__file__).resolve().parents[1] / "examples" / "hello" / "task.py"
    command = [PYTHON, str(wrapper), PYTHON, str(wrapper), PYTHON, str(hello)]
    result = run_task(keeper_agent, command)
    assert result.exit_code == 0, result.stderr
    assert "hello" in result.messages and result.denied == []
    launched = result.run.tasks[0].pid if result.run else None
    callers = {r.caller for r in result.requests if r.path == SETTINGS}
    assert len(callers) == 1 and callers != {f"pid {launched}"}, callers
    assert keeper_agent.messages[-1].client_id == "test-task_Test-task"
