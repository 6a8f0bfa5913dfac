"""keeper_task.testing: the pytest fixtures, run_task in-process and as a subprocess, faults."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from keeper_task import Task, TaskContext
from keeper_task.emulator import Emulator
from keeper_task.emulator.records import RequestRecord
from keeper_task.testing import TaskResult, default_job, run_task

ROOT = Path(__file__).resolve().parents[1]
HELLO_SCRIPT = ROOT / "examples" / "hello" / "task.py"
SETTINGS = "/api/PluginSettings/KeeperPrivilegeManager"
FAST = {"KEEPER_TASK_TRUST_TIMEOUT": "5", "KEEPER_TASK_MQTT_CONNECT_TIMEOUT": "2"}

# A real task that waits (bounded) for the broker to drop it, publishes while it is down
# (QoS 1: queued by paho, resent on reconnect), then logs once it is connected again.
RESTART_TASK = """
import time
from keeper_task import Task

def wait_until(check, seconds=10.0):
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            raise SystemExit("the broker did not restart")
        time.sleep(0.01)

class Restart(Task):
    def run(self, ctx):
        wait_until(lambda: not ctx.mqtt.connected)
        ctx.publish(ctx.event_topic, {"sent": "while the broker was down"})
        wait_until(lambda: ctx.mqtt.connected)
        ctx.log.info("after-restart")

if __name__ == "__main__":
    Restart.main()
"""


RESTART_WAIT_TASK = RESTART_TASK.replace(
    'ctx.publish(ctx.event_topic, {"sent": "while the broker was down"})',
    'ctx.publish(ctx.event_topic, {"sent": "while the broker was down"}, wait=True, timeout=20)',
)


def _script(directory: Path, code: str) -> Path:
    path = directory / "task.py"
    path.write_text(code)
    return path


class Greeter(Task):
    def run(self, ctx: TaskContext) -> None:
        ctx.log.info("greeting", broker=ctx.agent_settings.broker_host)
        ctx.publish(ctx.event_topic, {"done": True}, qos=1, wait=True)


def _settings_requests(result: TaskResult) -> list[tuple[int, str | None]]:
    return [(r.status, r.fault) for r in result.requests if r.path == SETTINGS]


def test_in_process_run_trusts_this_process_only_while_it_runs(keeper_agent: Emulator) -> None:
    """A Task class runs in-process; its logs, publishes and requests (by this PID) are kept."""
    result = run_task(keeper_agent, Greeter)
    assert result.exit_code == 0, result.stderr
    assert result.log("greeting")["properties"]["broker"] == "127.0.0.1"
    assert [m.topic for m in result.publishes] == ["Jobs/test-task/events"]
    assert result.requests[0].caller == f"pid {os.getpid()}"
    assert result.denied == []
    with keeper_agent.http_client() as client:  # trust ended with the run
        assert client.get(SETTINGS).status_code == 403


def test_subprocess_run_of_the_hello_example(keeper_agent_session: Emulator) -> None:
    """A .py file runs as a launched subprocess with the job's arguments; its run is returned."""
    result = run_task(keeper_agent_session, HELLO_SCRIPT)
    assert result.exit_code == 0, result.stderr
    assert "hello" in result.messages
    assert result.run is not None and result.run.tasks[0].pid != os.getpid()
    assert '"message":"hello"' in result.stderr.replace(" ", "")


def test_scripted_403_then_success(keeper_agent: Emulator) -> None:
    """faults.forbid(requests=2): the runtime's startup retry gets through on the third try."""
    keeper_agent.faults.forbid(requests=2)
    result = run_task(keeper_agent, HELLO_SCRIPT, env=FAST)
    assert result.exit_code == 0, result.stderr
    assert _settings_requests(result) == [(403, "forbid 403"), (403, "forbid 403"), (200, None)]


def test_scripted_5xx_then_success(keeper_agent: Emulator) -> None:
    """faults.fail(503): a 5xx is retried like the agent restarting."""
    keeper_agent.faults.fail(503, requests=1)
    result = run_task(keeper_agent, Greeter, env=FAST)
    assert result.exit_code == 0, result.stderr
    assert _settings_requests(result) == [(503, "status 503"), (200, None)]


def test_malformed_settings_fail_the_start(keeper_agent: Emulator) -> None:
    """faults.malformed_settings(): truncated JSON makes the task fail to start (non-zero)."""
    keeper_agent.faults.malformed_settings(requests=10)
    result = run_task(keeper_agent, Greeter, env=FAST)
    assert result.exit_code != 0
    assert _settings_requests(result)[0] == (200, "malformed 200")
    assert result.logs == []


def test_broker_down_fails_with_broker_unavailable(keeper_agent: Emulator) -> None:
    """stop_broker(): the task cannot connect and exits with the broker-unavailable code."""
    keeper_agent.stop_broker()
    result = run_task(keeper_agent, HELLO_SCRIPT, env=FAST)
    assert result.exit_code == 75, result.stderr
    assert result.logs == []


def test_broker_restart_mid_run(keeper_agent: Emulator, tmp_path: Path) -> None:
    """faults.restart_broker_after(1): a launched task loses the broker, reconnects (still
    trusted), and a publish made while it was down is delivered after the restart."""
    keeper_agent.faults.restart_broker_after(messages=1)
    result = run_task(keeper_agent, _script(tmp_path, RESTART_TASK), env=FAST)
    assert result.exit_code == 0, result.stderr
    assert any("broker restarted" in n.text for n in keeper_agent.notices)
    assert [m.json() for m in result.publishes] == [{"sent": "while the broker was down"}]
    assert "mqtt.reconnected" in result.messages and "after-restart" in result.messages
    assert result.denied == []


def test_publish_with_wait_rides_out_a_broker_restart(
    keeper_agent: Emulator, tmp_path: Path
) -> None:
    """publish(wait=True) made while the broker is down blocks until the reconnect delivers
    and acknowledges it, instead of failing at once (paho's own wait raises then)."""
    keeper_agent.faults.restart_broker_after(messages=1)
    result = run_task(keeper_agent, _script(tmp_path, RESTART_WAIT_TASK), env=FAST)
    assert result.exit_code == 0, result.stderr
    assert [m.json() for m in result.publishes] == [{"sent": "while the broker was down"}]
    assert "after-restart" in result.messages


def test_403_for_some_requests_then_success(keeper_agent: Emulator) -> None:
    """faults.forbid(requests=N): a launched task is refused N times, then trusted.

    Counted in requests, not seconds: a time window would start before the child has even
    imported, and on a loaded machine could end before its first request.
    """
    keeper_agent.faults.forbid(requests=3)
    result = run_task(keeper_agent, HELLO_SCRIPT, env=FAST)
    assert result.exit_code == 0, result.stderr
    statuses = _settings_requests(result)
    assert statuses == [(403, "forbid 403")] * 3 + [(200, None)]
    assert "hello" in result.messages


def test_403_forever_exits_not_trusted(keeper_agent: Emulator) -> None:
    """403 past the runtime's trust budget: the launched task exits 77, every request 403."""
    keeper_agent.faults.forbid(seconds=60)
    result = run_task(keeper_agent, HELLO_SCRIPT, env={**FAST, "KEEPER_TASK_TRUST_TIMEOUT": "0.5"})
    assert result.exit_code == 77, result.stderr
    assert {status for status, _ in _settings_requests(result)} == {403}
    assert "not launched by the agent" in result.stderr
    assert result.logs == []


def test_malformed_settings_as_a_launched_task(keeper_agent: Emulator) -> None:
    """Truncated settings JSON exits 69 (a bad answer from the keeper_agent); settings that parse
    but hold an invalid broker.port exit 78 (bad settings)."""
    keeper_agent.faults.malformed_settings(requests=10)
    truncated = run_task(keeper_agent, HELLO_SCRIPT, env=FAST)
    keeper_agent.faults.clear()
    keeper_agent.faults.malformed_settings(
        requests=10, body={"broker.host": "127.0.0.1", "broker.port": "not-a-port"}
    )
    invalid = run_task(keeper_agent, HELLO_SCRIPT, env=FAST)
    assert truncated.exit_code == 69, truncated.stderr
    assert "not valid JSON" in truncated.stderr
    assert invalid.exit_code == 78, invalid.stderr
    assert "broker.port" in invalid.stderr
    assert _settings_requests(invalid)[0] == (200, "malformed 200")


def test_registration_delay_gives_startup_403(tmp_path: Path) -> None:
    """Emulator(register_delay=...): the launched task gets 403 until its registration lands,
    then succeeds. Counted, not timed: the delay outlasts the test, and the test lands the
    registration itself once the emulator has refused the task twice."""
    job = default_job()
    results: list[TaskResult] = []
    with Emulator(register_delay=3600) as keeper_agent:
        env = {**FAST, "KEEPER_TASK_TRUST_TIMEOUT": "120"}  # never the budget that ends it
        runner = threading.Thread(
            target=lambda: results.append(run_task(keeper_agent, HELLO_SCRIPT, job=job, env=env))
        )
        runner.start()

        def refused() -> list[RequestRecord]:
            return [r for r in keeper_agent.requests if r.path == SETTINGS and r.status == 403]

        # Woken on every request the emulator records (a count, not a time window).
        assert keeper_agent.wait_for(lambda: len(refused()) >= 2, timeout=60), refused()
        pid = refused()[0].pid
        assert pid is not None
        keeper_agent.registry.register(pid, job["id"])  # the registration lands now
        runner.join(120)
    (result,) = results
    statuses = [status for status, _ in _settings_requests(result)]
    assert result.exit_code == 0, result.stderr
    assert statuses[:2] == [403, 403] and statuses[-1] == 200
    assert set(statuses[:-1]) == {403}


def test_default_job_is_valid_and_overridable() -> None:
    """default_job() validates and takes root-key overrides."""
    from keeper_task.jobs import validate_job

    assert validate_job(default_job()).valid
    assert default_job("x-y", enabled=False)["enabled"] is False
