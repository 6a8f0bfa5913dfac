"""The Task runtime end to end: a real subprocess per exit-code row, real HTTPS, real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from keeper_task import ExitCode, Task, TaskContext, TaskSettings
from tests.support.brokers import BrokerBase, free_port, silent_server
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


#: Task processes started by _popen; the agent fixture kills what a failed test left running.
_SPAWNED: list[subprocess.Popen[str]] = []


@pytest.fixture
def agent(ca: trustme.CA, amqtt_broker: BrokerBase) -> Iterator[FakeAgent]:
    try:
        with FakeAgent(ca, _settings_for(amqtt_broker)) as server:
            yield server
    finally:
        while _SPAWNED:
            proc = _SPAWNED.pop()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


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


def test_secret_in_an_uncaught_exception_reaches_neither_output(
    ca: trustme.CA, amqtt_broker: BrokerBase
) -> None:
    """An exception whose args hold a secret: its traceback and one-line reason are redacted
    on stderr and on KeeperLogger alike; the run still exits 70 with the error named."""
    token = "tok-3f9c1e77d2"
    with (
        FakeAgent(ca, _settings_for(amqtt_broker)) as server,
        amqtt_broker.collect("KeeperLogger") as col,
    ):
        proc = _run(server.base_url, "--behaviour", "crash-secret", "--api-token", token)
        assert proc.returncode == ExitCode.UNCAUGHT_EXCEPTION, proc.stderr
        messages = _wait_messages(col, {"task.traceback", "task.crashed"})
    assert {"task.traceback", "task.crashed"} <= set(messages)
    assert token not in proc.stderr
    assert all(token.encode() not in payload for payload in col.payloads)
    last = json.loads(_last_line(proc.stderr))
    assert last["message"] == "task.crashed"
    assert "ValueError" in last["properties"]["reason"]
    assert "[redacted]" in last["properties"]["reason"]
    assert "[redacted]" in proc.stderr.split("Traceback (most recent call last)", 1)[1]


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


# --- audit additions: every exit path, signals, hangs, secrets, TLS sharing ----------------


def _popen(base_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(SAMPLE), f"--keeper-api-base={base_url}", *args],
        env=env if env is not None else _env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _SPAWNED.append(proc)
    return proc


def _wait_line(stream: Any, fragment: str, timeout: float = 60) -> str:
    """Read lines until one contains `fragment`; EOF ends the wait and the test fails.

    A process started by _popen that stays silent for `timeout` seconds is killed (its EOF
    ends the wait), so a missing line fails the test with the output seen instead of hanging.
    """
    owner = next((p for p in _SPAWNED if stream in (p.stdout, p.stderr)), None)
    timer = threading.Timer(timeout, owner.kill) if owner is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    seen = []
    try:
        for line in stream:
            seen.append(line)
            if fragment in line:
                return line
    finally:
        if timer is not None:
            timer.cancel()
    raise AssertionError(
        f"{fragment!r} never appeared (within {timeout} s); got {''.join(seen)[-2000:]}"
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_PUBLISH_FAIL = ("--behaviour", "publish-fail", "--count", "300")


def test_default_fail_exits_1_and_flushes_queued_events(
    agent: FakeAgent, amqtt_broker: BrokerBase
) -> None:
    """ctx.fail("why") exits 1 (space form of --keeper-api-base) after flushing queued QoS 1."""
    with amqtt_broker.collect("Jobs/sample-job/events") as col:
        proc = subprocess.run(
            [sys.executable, str(SAMPLE), "--keeper-api-base", agent.base_url, *_PUBLISH_FAIL],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == ExitCode.TASK_FAILED == 1, proc.stderr
        got = col.wait_for(300, timeout=10)
    assert "inventory incomplete" in _last_line(proc.stderr)
    assert sorted(json.loads(p)["i"] for _, p in got) == list(range(300))


def test_teardown_error_after_a_successful_run_exits_70(agent: FakeAgent) -> None:
    """A teardown that raises after run() succeeded is the run's outcome: traceback, exit 70."""
    proc = _run(agent.base_url, "--behaviour", "teardown-crash")
    assert proc.returncode == ExitCode.UNCAUGHT_EXCEPTION, proc.stderr
    assert "task.finished" not in _names(proc.stderr)
    last = json.loads(_last_line(proc.stderr))
    assert last["message"] == "task.crashed"
    assert "teardown failed" in last["properties"]["reason"]


def test_teardown_error_after_a_failed_run_keeps_the_runs_code(agent: FakeAgent) -> None:
    """When run() failed, a teardown error is logged with its traceback; the exit code stays."""
    proc = subprocess.run(
        [sys.executable, "-c", _TEARDOWN_AFTER_FAIL, f"--keeper-api-base={agent.base_url}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 5, proc.stderr
    failed = next(e for e in _events(proc.stderr) if e["message"] == "task.teardown_failed")
    assert "cleanup broke" in failed["properties"]["error"]
    assert "Traceback" in failed["exception"]
    assert json.loads(_last_line(proc.stderr))["message"] == "task.failed"


_TEARDOWN_AFTER_FAIL = """
from keeper_task import Task
class T(Task):
    def run(self, ctx): ctx.fail("no data", exit_code=5)
    def teardown(self, ctx): raise OSError("cleanup broke")
T.main()
"""


def test_signal_during_setup_exits_128_plus_n(agent: FakeAgent) -> None:
    """SIGTERM while setup() blocks: exit 143 with one task.stopped line, no traceback."""
    proc = _popen(agent.base_url, "--behaviour", "setup-sleep")
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signal.SIGTERM)
    _, stderr = _finish(proc)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert json.loads(_last_line(stderr))["message"] == "task.stopped"


def test_signal_during_the_startup_retry_loop_exits_cleanly(agent: FakeAgent) -> None:
    """SIGINT while 403s are being retried ends the run at once with 130, not after the budget."""
    agent.faults.forbidden = 10**9
    proc = _popen(agent.base_url, env=_env(KEEPER_TASK_TRUST_TIMEOUT="60"))
    assert proc.stderr is not None
    _wait_line(proc.stderr, "agent.retry")  # warnings reach a pipe at once
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = _finish(proc)
    assert proc.returncode == 130, rest
    assert time.monotonic() - started < 10
    assert "Traceback" not in rest
    assert json.loads(_last_line(rest))["properties"]["reason"] == "interrupted by SIGINT"


def test_signal_is_not_swallowed_by_except_exception_in_task_code(agent: FakeAgent) -> None:
    """A run() loop with `except Exception` still stops on SIGTERM (exit 143)."""
    proc = _popen(agent.base_url, "--behaviour", "swallow")
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signal.SIGTERM)
    _, stderr = _finish(proc)
    assert proc.returncode == 143, stderr
    assert "sample.swallowed" not in _names(stderr)


def test_second_signal_during_teardown_does_not_break_the_flush(
    agent: FakeAgent, amqtt_broker: BrokerBase
) -> None:
    """SIGTERM ends run(); a second SIGTERM in teardown is ignored: teardown ends, all flushed."""
    with amqtt_broker.collect("Jobs/sample-job/events") as col:
        proc = _popen(agent.base_url, "--behaviour", "sleep", "--teardown-wait", "--count", "200")
        assert proc.stdout is not None and proc.stdin is not None
        _wait_line(proc.stdout, "READY")
        proc.send_signal(signal.SIGTERM)
        _wait_line(proc.stdout, "TEARDOWN-START")
        proc.send_signal(signal.SIGTERM)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _, stderr = _finish(proc)
        assert proc.returncode == 143, stderr
        got = col.wait_for(200, timeout=10)
    assert "sample.teardown_done" in _names(stderr)
    assert sorted(json.loads(p)["i"] for _, p in got) == list(range(200))


def test_https_server_that_never_answers_exits_69_within_budget() -> None:
    """An API port that accepts TCP but never speaks TLS/HTTP: exit 69 within the budget.

    Timed from the task's first connection (not from the spawn, whose cost depends on the
    machine's load) to its exit; the bound is a multiple of budget + one request timeout.
    """
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        srv.settimeout(60)
        url = f"https://127.0.0.1:{srv.getsockname()[1]}"
        proc = _popen(url, "--http-timeout", "0.4", env=_env(KEEPER_TASK_TRUST_TIMEOUT="0.5"))
        try:
            first, _ = srv.accept()  # the task has started and is trying
            started = time.monotonic()
            with first:
                _, stderr = proc.communicate(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, stderr
    assert elapsed < 10 * (0.5 + 0.4)
    assert "--http-timeout" in _last_line(stderr)
    assert "Traceback" not in stderr


@pytest.mark.parametrize("tls", [False, True])
def test_broker_that_never_answers_exits_75_within_the_connect_timeout(
    ca: trustme.CA, tls: bool
) -> None:
    """A broker port that accepts TCP but never answers (plain or TLS): exit 75, no hang."""
    with silent_server() as port:
        settings = {"broker.host": "127.0.0.1", "broker.port": str(port)}
        settings["broker.tls"] = "true" if tls else "false"
        with FakeAgent(ca, settings) as server:
            started = time.monotonic()
            proc = _run(server.base_url, "--mqtt-connect-timeout", "0.5")
            elapsed = time.monotonic() - started
    assert proc.returncode == ExitCode.BROKER_UNAVAILABLE, proc.stderr
    assert elapsed < 8
    assert "0.5s" in _last_line(proc.stderr)


def test_stalled_broker_bounds_the_exit_flush(ca: trustme.CA) -> None:
    """A broker that never acks: the exit flush gives up after --mqtt-flush-timeout and says so."""
    with silent_server(connack=b"\x20\x02\x00\x00") as port:
        settings = {"broker.host": "127.0.0.1", "broker.port": str(port), "broker.tls": "false"}
        with FakeAgent(ca, settings) as server:
            started = time.monotonic()
            proc = _run(
                server.base_url, "--behaviour", "publish", "--count", "5",
                "--mqtt-flush-timeout", "0.3",
            )  # fmt: skip
            elapsed = time.monotonic() - started
    assert proc.returncode == ExitCode.SUCCESS, proc.stderr
    assert elapsed < 8
    assert "were not acknowledged before exit" in _last_line(proc.stderr)


def test_wrong_server_certificate_with_ca_bundle_exits_69(agent: FakeAgent, tmp_path: Path) -> None:
    """--ca-bundle of another CA: the agent's certificate is refused in one line, exit 69."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    proc = _run(agent.base_url, "--ca-bundle", str(other))
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, proc.stderr
    assert "certificate" in _last_line(proc.stderr)
    assert "--ca-bundle" in _last_line(proc.stderr)
    assert len([r for r in agent.requests if "PluginSettings" in r.path]) == 0
    assert "Traceback" not in proc.stderr


def test_malformed_settings_body_exits_69_without_quoting_it(agent: FakeAgent) -> None:
    """A settings body that is not JSON: a clear one-line error, exit 69, not retried."""
    agent.faults.body = b'{"broker.host": s3cr3t'
    proc = _run(agent.base_url)
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, proc.stderr
    assert "not valid JSON" in _last_line(proc.stderr)
    assert "s3cr3t" not in proc.stderr
    assert agent.faults.seen == 1


def test_secret_setting_values_are_never_logged(agent: FakeAgent, amqtt_broker: BrokerBase) -> None:
    """A setting named api_token never reaches stderr or KeeperLogger, even when mistyped."""
    secret = "s3cr3t-T0ken"
    with amqtt_broker.collect("KeeperLogger") as col:
        proc = _run(agent.base_url, "--api-token", secret, "--log-level", "trace")
        assert proc.returncode == ExitCode.SUCCESS, proc.stderr
        payloads = b"".join(p for _, p in col.wait_for(3, timeout=10))
    assert secret not in proc.stderr
    assert secret.encode() not in payloads
    for typo in ([f"--api-tokn={secret}"], ["--api-tokn", secret], [secret]):
        proc = _run(agent.base_url, *typo)
        assert proc.returncode == ExitCode.USAGE
        assert secret not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


class _Spy(Task):
    """Records what the context offers while running in-process."""

    seen: dict[str, Any] = {}  # noqa: RUF012
    publishes = ("Jobs/{job_id}/events",)

    def run(self, ctx: TaskContext) -> None:
        assert ctx.mqtt is not None
        ctx.publish(f"Jobs/{ctx.job_id}/events", {"n": 1}, wait=True)
        _Spy.seen = {"unacked": ctx.mqtt.unacked, "client_id": ctx.mqtt.client_id}


@pytest.fixture
def inproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("KEEPER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KEEPER_JOB_ID", "inproc")
    monkeypatch.setenv("KEEPER_TASK_LOG_FORMAT", "json")


@pytest.mark.usefixtures("inproc_env")
def test_publish_wait_returns_after_the_broker_acked(
    agent: FakeAgent, amqtt_broker: BrokerBase
) -> None:
    """ctx.publish(..., wait=True) returns only once the broker acknowledged the message."""
    with amqtt_broker.collect("Jobs/inproc/events") as col:
        assert _Spy.execute([f"--keeper-api-base={agent.base_url}"]) == 0
        assert col.wait_for(1, timeout=5)[0][1] == b'{"n":1}'
    assert _Spy.seen["unacked"] == 0


@pytest.mark.usefixtures("inproc_env")
def test_client_id_template_is_a_setting(agent: FakeAgent, amqtt_broker: BrokerBase) -> None:
    """--mqtt-client-id-template shapes the client id; a template hiding the job id exits 78."""
    template = "--mqtt-client-id-template={job_id}_{pid}"
    assert _Spy.execute([f"--keeper-api-base={agent.base_url}", template]) == 0
    assert _Spy.seen["client_id"] == f"inproc_{os.getpid()}"
    bad = "--mqtt-client-id-template=x_{job_id}"
    assert _Spy.execute([f"--keeper-api-base={agent.base_url}", bad]) == ExitCode.BAD_SETTINGS


@pytest.mark.usefixtures("inproc_env")
def test_one_ssl_context_for_https_and_mqtt_and_no_certifi(
    ca: trustme.CA,
    amqtt_tls_broker: BrokerBase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS and MQTT share the one SSLContext built from --ca-bundle; certifi is never loaded."""
    import certifi

    assert amqtt_tls_broker.ca_pem_path is not None
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + Path(amqtt_tls_broker.ca_pem_path).read_bytes())
    used: list[int] = []
    created: list[Any] = []
    wrap = ssl.SSLContext.wrap_socket
    default_context = ssl.create_default_context

    def spy_wrap(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("server_side"):
            used.append(id(self))
        return wrap(self, *args, **kwargs)

    def spy_default(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        created.append(kwargs.get("cafile"))
        return default_context(*args, **kwargs)

    def no_certifi() -> str:
        raise AssertionError("certifi's bundle was loaded")

    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", spy_wrap)
    monkeypatch.setattr(ssl, "create_default_context", spy_default)
    monkeypatch.setattr(certifi, "where", no_certifi)
    with FakeAgent(ca, _settings_for(amqtt_tls_broker)) as server:
        args = [f"--keeper-api-base={server.base_url}", f"--ca-bundle={bundle}"]
        assert _Spy.execute(args) == 0
    assert created == [str(bundle)]
    assert len(used) >= 2  # the HTTPS request and the MQTT connection
    assert len(set(used)) == 1


class _Busy(Task):
    """Catches every Exception in a pure-Python loop until stopped."""

    def run(self, ctx: TaskContext) -> None:
        while True:
            try:
                sum(range(1000))
            except Exception:  # the point: this must not swallow the deadline
                continue


@pytest.mark.usefixtures("inproc_env")
def test_deadline_off_the_main_thread_is_not_swallowed(agent: FakeAgent) -> None:
    """Task.execute() in a worker thread: the deadline ends a run that catches Exception."""
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(
            _Busy.execute([f"--keeper-api-base={agent.base_url}", "--no-mqtt", "--deadline=0.3"])
        )
    )
    worker.start()
    worker.join(15)
    assert not worker.is_alive()
    assert result == [ExitCode.DEADLINE]


@pytest.mark.parametrize("code", [0, 256, -1])
def test_fail_refuses_exit_codes_the_os_would_not_keep(code: int) -> None:
    """ctx.fail() takes 1-255 only: 256 would reach the agent as 0, a success."""
    from keeper_task.agent_settings import AgentSettings

    ctx: TaskContext = TaskContext(
        settings=TaskSettings(),
        agent_settings=AgentSettings(),
        log=None,
        plugin_settings=None,  # type: ignore[arg-type]
        mqtt=None,
    )
    with pytest.raises(ValueError, match="1-255"):
        ctx.fail("why", exit_code=code)
