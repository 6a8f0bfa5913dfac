"""The Task runtime end to end: a real subprocess per exit-code row, real HTTPS, real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from keeper_task import ExitCode, Task, TaskContext, TaskSettings
from tests.support.brokers import BrokerBase, free_port
from tests.support.fake_agent import FakeAgent

SAMPLE = Path(__file__).parent / "support" / "sample_task.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _settings_for(b: BrokerBase) -> dict[str, str]:
    return {
        "broker.host": b.host,
        "broker.port": str(b.port),
        "broker.tls": "true" if b.tls else "false",
        "some.other": "kept",
    }


@pytest.fixture
def agent(ca: trustme.CA, amqtt_broker: BrokerBase) -> Iterator[FakeAgent]:
    with FakeAgent(ca, _settings_for(amqtt_broker)) as server:
        yield server


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["PYTHONPATH"] = str(ROOT)
    env["KEEPER_JOB_ID"] = "sample-job"
    env["KEEPER_JOB_NAME"] = "Sample job"
    env["KEEPER_TASK_TRUST_TIMEOUT"] = "3"
    env["KEEPER_TASK_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def _run(
    base_url: str | None, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SAMPLE)]
    if base_url is not None:
        argv.append(f"--keeper-api-base={base_url}")
    return subprocess.run(
        [*argv, *args],
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _names(stderr: str) -> list[str]:
    return [str(e.get("message")) for e in _events(stderr)]


def _wait_messages(col: Any, wanted: set[str], timeout: float = 10) -> list[str]:
    """Wait (on the collector's arrivals, no sleeping) until all `wanted` messages came."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [json.loads(p)["message"] for p in col.payloads]
        remaining = deadline - time.monotonic()
        if wanted <= set(messages) or remaining <= 0:
            return messages
        col.wait_for(len(messages) + 1, timeout=remaining)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_success_logs_reach_keeper_logger_and_stderr(ca: trustme.CA, broker: BrokerBase) -> None:
    """Exit 0; the hello event arrives on KeeperLogger over TLS (both brokers) and on stderr."""
    with FakeAgent(ca, _settings_for(broker)) as server, broker.collect("KeeperLogger") as col:
        proc = _run(server.base_url)
        assert proc.returncode == ExitCode.SUCCESS, proc.stderr
        messages = _wait_messages(col, {"hello", "task.finished"})
        docs = [json.loads(p) for p in col.payloads]
    assert "hello" in _names(proc.stderr)
    assert {"hello", "task.finished", "sample.setup", "sample.teardown"} <= set(messages)
    hello = next(p for p in docs if p["message"] == "hello")
    assert hello["jobId"] == "sample-job"
    assert hello["level"] == "Information"
    assert hello["properties"]["broker"] == broker.host


def test_task_failure_exits_with_the_authors_code(agent: FakeAgent) -> None:
    """ctx.fail('...', exit_code=3) exits 3 with the reason on the last stderr line."""
    proc = _run(agent.base_url, "--behaviour", "fail")
    assert proc.returncode == 3
    assert "disk is full" in _last_line(proc.stderr)
    assert "TEARDOWN" in proc.stderr


def test_uncaught_exception_logs_traceback_and_one_line(agent: FakeAgent) -> None:
    """An uncaught exception exits 70: traceback logged once, last line names the error."""
    proc = _run(agent.base_url, "--behaviour", "crash")
    assert proc.returncode == ExitCode.UNCAUGHT_EXCEPTION
    assert proc.stderr.count("Traceback (most recent call last)") == 1
    last = json.loads(_last_line(proc.stderr))
    assert last["message"] == "task.crashed"
    assert "ZeroDivisionError: boom" in last["properties"]["reason"]
    assert "TEARDOWN" in proc.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--count"], "expected one argument"),
    ],
)
def test_bad_arguments_exit_64_with_one_line(
    agent: FakeAgent, args: list[str], fragment: str
) -> None:
    """Unknown or incomplete arguments: exit 64, one line, no traceback."""
    proc = _run(agent.base_url, *args)
    assert proc.returncode == ExitCode.USAGE
    assert fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_missing_api_base_is_a_usage_error(agent: FakeAgent) -> None:
    """Without --keeper-api-base the task says how to pass {KeeperApiBaseUrl} (exit 64)."""
    proc = _run(None)
    assert proc.returncode == ExitCode.USAGE
    assert "{KeeperApiBaseUrl}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_setting_value_exits_78(agent: FakeAgent) -> None:
    """An invalid option value exits 78 naming the option."""
    proc = _run(agent.base_url, "--count", "many")
    assert proc.returncode == ExitCode.BAD_SETTINGS
    assert "--count" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plugin_not_found_exits_68(agent: FakeAgent) -> None:
    """A 404 for the settings plugin is not retried and exits 68."""
    proc = _run(agent.base_url, "--settings-plugin", "NoSuchPlugin")
    assert proc.returncode == ExitCode.PLUGIN_NOT_FOUND
    assert "NoSuchPlugin" in _last_line(proc.stderr)
    assert len([r for r in agent.requests if "NoSuchPlugin" in r.path]) == 1


def test_agent_unreachable_exits_69() -> None:
    """A closed API port is retried inside the budget, then exits 69."""
    port = free_port()
    proc = _run(f"https://127.0.0.1:{port}", env=_env(KEEPER_TASK_TRUST_TIMEOUT="0.6"))
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE
    assert "agent.retry" in _names(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_not_trusted_exits_77(agent: FakeAgent) -> None:
    """403 past the budget means 'not launched by the agent': exit 77."""
    agent.faults.forbidden = 10_000
    proc = _run(agent.base_url, env=_env(KEEPER_TASK_TRUST_TIMEOUT="0.6"))
    assert proc.returncode == ExitCode.NOT_TRUSTED
    assert "not launched by the agent" in _last_line(proc.stderr)
    assert agent.faults.seen >= 2


def test_startup_403_is_retried_then_succeeds(agent: FakeAgent) -> None:
    """Two 403s during the registration window are retried (and logged), then the run works."""
    agent.faults.forbidden = 2
    proc = _run(agent.base_url)
    assert proc.returncode == ExitCode.SUCCESS, proc.stderr
    assert _names(proc.stderr).count("agent.retry") == 2


def test_broker_unavailable_exits_75(ca: trustme.CA) -> None:
    """A broker address nobody listens on exits 75 quickly."""
    settings = {"broker.host": "127.0.0.1", "broker.port": str(free_port()), "broker.tls": "false"}
    with FakeAgent(ca, settings) as server:
        proc = _run(server.base_url)
    assert proc.returncode == ExitCode.BROKER_UNAVAILABLE
    assert "Traceback" not in proc.stderr


def test_bad_agent_settings_exit_78(ca: trustme.CA) -> None:
    """A non-integer broker.port from the agent exits 78 naming the key."""
    with FakeAgent(ca, {"broker.host": "127.0.0.1", "broker.port": "eighty"}) as server:
        proc = _run(server.base_url)
    assert proc.returncode == ExitCode.BAD_SETTINGS
    assert "broker.port" in _last_line(proc.stderr)


def test_deadline_ends_the_run_with_124(agent: FakeAgent) -> None:
    """--deadline stops a hanging run(): teardown runs and the exit code is 124."""
    proc = _run(agent.base_url, "--behaviour", "sleep", "--deadline", "1.5")
    assert proc.returncode == ExitCode.DEADLINE, proc.stderr
    assert "TEARDOWN" in proc.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_cancels_cleanly(
    agent: FakeAgent, amqtt_broker: BrokerBase, signum: int, code: int
) -> None:
    """SIGTERM/SIGINT: teardown runs, its log reaches KeeperLogger, exit is 128+N."""
    with amqtt_broker.collect("KeeperLogger") as col:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SAMPLE),
                f"--keeper-api-base={agent.base_url}",
                "--behaviour",
                "sleep",
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "READY"
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == code, stderr
        assert "TEARDOWN" in stderr
        messages = _wait_messages(col, {"sample.teardown", "task.stopped"})
        assert "sample.teardown" in messages
        assert "task.stopped" in messages


def test_without_job_id_runs_with_stderr_logs_only(agent: FakeAgent) -> None:
    """No KEEPER_JOB_ID (no mqttTopics): the task runs, says why MQTT is off, exits 0."""
    env = _env()
    del env["KEEPER_JOB_ID"]
    proc = _run(agent.base_url, env=env)
    assert proc.returncode == ExitCode.SUCCESS, proc.stderr
    assert "mqtt.disabled" in _names(proc.stderr)
    assert "hello" in _names(proc.stderr)


def test_publish_without_job_id_names_the_cause(agent: FakeAgent) -> None:
    """Publishing when MQTT is off raises a clear error naming KEEPER_JOB_ID / mqttTopics."""
    env = _env()
    del env["KEEPER_JOB_ID"]
    proc = _run(agent.base_url, "--behaviour", "publish", env=env)
    assert proc.returncode != 0
    assert "mqttTopics" in _last_line(proc.stderr)


def test_undeclared_topic_raises_at_once(agent: FakeAgent) -> None:
    """A publish outside the declared topics fails loudly instead of being dropped silently."""
    proc = _run(agent.base_url, "--behaviour", "undeclared")
    assert proc.returncode != 0
    assert "Some/other/topic" in _last_line(proc.stderr)


def test_queued_messages_are_flushed_on_exit(agent: FakeAgent, amqtt_broker: BrokerBase) -> None:
    """500 QoS 1 events published without waiting all reach the broker before exit."""
    with amqtt_broker.collect("Jobs/sample-job/events") as col:
        proc = _run(agent.base_url, "--behaviour", "publish", "--count", "500")
        assert proc.returncode == ExitCode.SUCCESS, proc.stderr
        got = col.wait_for(500, timeout=10)
    assert sorted(json.loads(p)["i"] for _, p in got) == list(range(500))


def test_job_id_with_underscore_is_refused(agent: FakeAgent) -> None:
    """KEEPER_JOB_ID with '_' is a clear settings error (exit 78), never rewritten."""
    proc = _run(agent.base_url, env=_env(KEEPER_JOB_ID="sample_job"))
    assert proc.returncode == ExitCode.BAD_SETTINGS
    assert "'_'" in proc.stderr


class _InProc(Task):
    """An in-process task recording what it saw."""

    seen: dict[str, Any] = {}  # noqa: RUF012

    def run(self, ctx: TaskContext) -> None:
        _InProc.seen = {
            "broker_port": ctx.agent_settings.broker_port,
            "other": ctx.agent_settings.get("some.other"),
            "job_id": ctx.job_id,
            "mqtt": ctx.mqtt is not None,
        }


def test_execute_in_process_returns_the_code(
    agent: FakeAgent, amqtt_broker: BrokerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task.execute() runs in-process and returns the exit code without sys.exit."""
    monkeypatch.setenv("KEEPER_JOB_ID", "inproc")
    monkeypatch.setenv("KEEPER_TASK_LOG_FORMAT", "json")
    code = _InProc.execute([f"--keeper-api-base={agent.base_url}"])
    assert code == 0
    assert _InProc.seen == {
        "broker_port": amqtt_broker.port,
        "other": "kept",
        "job_id": "inproc",
        "mqtt": True,
    }


class _Typed(TaskSettings):
    """Typed settings for generic inference."""

    level: int = 1


class _TypedTask(Task[_Typed]):
    def run(self, ctx: TaskContext[_Typed]) -> None:
        ctx.fail(f"level {ctx.settings.level}", exit_code=9)


def test_settings_class_is_inferred_from_the_generic(
    agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task[MySettings] uses MySettings for parsing (its options exist)."""
    monkeypatch.delenv("KEEPER_JOB_ID", raising=False)
    assert _TypedTask.settings_class is _Typed
    assert _TypedTask.execute([f"--keeper-api-base={agent.base_url}", "--level", "4"]) == 9
