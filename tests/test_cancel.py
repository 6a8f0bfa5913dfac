"""Stopping a task cannot be lost: signals and the deadline against adversarial task code.

Every test drives a real task process (tests/support/sample_task.py) and synchronises on what
the process prints (READY, SWALLOWED, TEARDOWN-HANG, the escalation note), never on sleeps.
Time bounds are the task's own configured ones: its ``stop_grace`` (SAMPLE_STOP_GRACE) tells
a graceful stop (teardown ran, no ``task.stop_forced``) from a forced one.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from keeper_task import ExitCode
from tests.support.brokers import BrokerBase, free_port
from tests.support.fake_agent import FakeAgent
from tests.test_task import (
    SAMPLE,
    _env,
    _events,
    _finish,
    _last_line,
    _names,
    _popen,
    _run,
    _wait_line,
    _wait_messages,
    agent,  # noqa: F401 - fixture
    ca,  # noqa: F401 - fixture
)

#: The program name in the task's own lines (the command as invoked).
PROG = f"{Path(sys.executable).name} sample_task.py"

# A grace no test reaches: when the task stops, it stopped gracefully, not by the grace.
_NO_GRACE = "3600"


def _graceful(stderr: str) -> None:
    """Teardown ran, nothing was forced or dropped by Python, the last line is task.stopped."""
    assert "TEARDOWN" in stderr
    assert "task.stop_forced" not in _names(stderr)
    assert "Exception ignored" not in stderr
    assert json.loads(_last_line(stderr))["message"] == "task.stopped"


@pytest.mark.parametrize("mode", ["finalizers", "weakref-finalizers", "generator-finalizers"])
def test_sigterm_is_not_lost_in_finalizers(agent: FakeAgent, mode: str) -> None:  # noqa: F811
    """run() spends its time in finalizers (~20 ms each): SIGTERM still stops it gracefully.

    The stop lands in a finalizer almost every time; Python would drop it there. The bound
    is the configured stop_grace (10 s): within it, teardown runs and nothing is forced.
    """
    env = _env(SAMPLE_STOP_GRACE="10")
    proc = _popen(agent.base_url, "--behaviour", mode, env=env)
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signal.SIGTERM)
    _, stderr = _finish(proc, timeout=60)
    assert proc.returncode == 143, stderr
    _graceful(stderr)
    assert json.loads(_last_line(stderr))["properties"]["reason"] == "interrupted by SIGTERM"


def test_deadline_is_not_lost_in_finalizers(agent: FakeAgent) -> None:  # noqa: F811
    """--deadline=2 with the same finalizer load: exit 124, teardown ran, nothing forced."""
    env = _env(SAMPLE_STOP_GRACE="10")
    proc = _run(agent.base_url, "--behaviour", "finalizers", "--deadline=2", env=env, timeout=60)
    assert proc.returncode == ExitCode.DEADLINE, proc.stderr
    _graceful(proc.stderr)
    assert "deadline of 2 s exceeded" in _last_line(proc.stderr)


def test_swallowed_stop_is_raised_again_then_the_grace_ends_the_process(
    agent: FakeAgent,  # noqa: F811
    amqtt_broker: BrokerBase,
) -> None:
    """run() swallows every stop (bare except BaseException, in a loop): raised again and again.

    After stop_grace (3 s) the process exits 143 without teardown; the log events are
    flushed first (task.stop_forced reaches KeeperLogger) and the last line says why.
    """
    with amqtt_broker.collect("KeeperLogger") as col:
        proc = _popen(agent.base_url, "--behaviour", "swallow-all", env=_env(SAMPLE_STOP_GRACE="3"))
        assert proc.stdout is not None
        _wait_line(proc.stdout, "READY")
        proc.send_signal(signal.SIGTERM)
        _, stderr = _finish(proc, timeout=60)
        assert proc.returncode == 143, stderr
        messages = _wait_messages(col, {"task.stop_forced"})
    # The signal's own raise plus at least one re-raise were swallowed before the grace.
    assert stderr.count("SWALLOWED") >= 2
    assert "TEARDOWN" not in stderr
    assert "task.stop_forced" in messages
    last = _last_line(stderr)
    assert last.startswith(f"{PROG}: error: interrupted by SIGTERM: ")
    assert "did not end within 3 s (stop_grace)" in last
    assert "teardown skipped; 0 MQTT message(s) not acknowledged" in last


def test_second_signal_raises_again_and_third_exits_at_once(agent: FakeAgent) -> None:  # noqa: F811
    """Escalation: 2nd SIGTERM re-raises and notes what a 3rd does; the 3rd exits 143 at once."""
    proc = _popen(
        agent.base_url, "--behaviour", "swallow-all", env=_env(SAMPLE_STOP_GRACE=_NO_GRACE)
    )
    assert proc.stdout is not None and proc.stderr is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signal.SIGTERM)
    _wait_line(proc.stderr, "SWALLOWED")
    proc.send_signal(signal.SIGTERM)
    note = _wait_line(proc.stderr, "a third signal exits at once")
    assert note.startswith(f"{PROG}: note: SIGTERM again: stopping is under way")
    proc.send_signal(signal.SIGINT)  # any stop signal counts; the first one sets the code
    _, rest = _finish(proc, timeout=60)
    assert proc.returncode == 143, rest
    assert "TEARDOWN" not in rest
    last = _last_line(rest)
    assert last.startswith(f"{PROG}: error: interrupted by SIGTERM: ")
    assert "a third stop signal (SIGINT) ended the process at once" in last
    assert "teardown and the flush skipped" in last


@pytest.mark.parametrize("behaviour", ["sleep", "ok"])
def test_hanging_teardown_third_signal_exits(agent: FakeAgent, behaviour: str) -> None:  # noqa: F811
    """A teardown that never returns is not interrupted; the third signal ends the process.

    ``sleep``: the first signal stopped run(); ``ok``: run() had returned, the signals all
    come during teardown. Either way the exit is 143 with the reason on the last line.
    """
    env = _env(SAMPLE_STOP_GRACE=_NO_GRACE)
    proc = _popen(agent.base_url, "--behaviour", behaviour, "--teardown-hang", env=env)
    assert proc.stdout is not None and proc.stderr is not None
    if behaviour == "sleep":
        _wait_line(proc.stdout, "READY")
        proc.send_signal(signal.SIGTERM)
        _wait_line(proc.stdout, "TEARDOWN-HANG")
    else:
        _wait_line(proc.stdout, "TEARDOWN-HANG")
        proc.send_signal(signal.SIGTERM)
        _wait_line(proc.stderr, "note: SIGTERM after run() ended: teardown and the flush go on")
    proc.send_signal(signal.SIGTERM)
    _wait_line(proc.stderr, "a third signal exits at once")
    proc.send_signal(signal.SIGTERM)
    _, rest = _finish(proc, timeout=60)
    assert proc.returncode == 143, rest
    assert "a third stop signal (SIGTERM) ended the process at once" in _last_line(rest)


def test_hanging_teardown_is_ended_by_the_grace(agent: FakeAgent) -> None:  # noqa: F811
    """One SIGTERM, then a teardown that hangs: after stop_grace (1 s) the process exits 143."""
    env = _env(SAMPLE_STOP_GRACE="1")
    proc = _popen(agent.base_url, "--behaviour", "sleep", "--teardown-hang", env=env)
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signal.SIGTERM)
    _, stderr = _finish(proc, timeout=60)
    assert proc.returncode == 143, stderr
    assert "sample.teardown" in _names(stderr)
    last = _last_line(stderr)
    assert "did not end within 1 s (stop_grace)" in last
    assert last.startswith(f"{PROG}: error: interrupted by SIGTERM: ")


def test_signal_after_run_returned_keeps_exit_0(agent: FakeAgent) -> None:  # noqa: F811
    """A SIGTERM during teardown after a successful run() changes nothing: teardown ends, 0."""
    proc = _popen(agent.base_url, "--behaviour", "ok", "--teardown-wait")
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stderr is not None
    _wait_line(proc.stdout, "TEARDOWN-START")
    proc.send_signal(signal.SIGTERM)
    _wait_line(proc.stderr, "note: SIGTERM after run() ended")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    _, stderr = _finish(proc)
    assert proc.returncode == ExitCode.SUCCESS, stderr
    assert "sample.teardown_done" in _names(stderr)
    assert json.loads(_last_line(stderr))["message"] == "task.finished"


# --- every non-zero exit ends with its one-line reason --------------------------------------


def _assert_reason_last(stderr: str, code: int, fragment: str) -> None:
    """The last stderr line is the reason: a plain `prog: error:` line or the outcome event."""
    last = _last_line(stderr)
    assert fragment in last, stderr[-3000:]
    if last.startswith(f"{PROG}: error: "):
        return
    doc = json.loads(last)
    assert doc["level"] in ("Error", "Warning")
    assert doc["properties"]["exit_code"] == code
    assert fragment in doc["properties"]["reason"]


_ROWS = [
    pytest.param(
        ["--behaviour", "publish-fail", "--count", "0"], 1, "inventory incomplete", id="1"
    ),
    pytest.param(["--behaviour", "fail"], 3, "disk is full", id="fail-3"),
    pytest.param(
        ["--behaviour", "sys-exit", "--count", "3"],
        3,
        "sys.exit(3) called at sample_task.py:",
        id="sys.exit(3)",
    ),
    pytest.param(
        ["--behaviour", "sys-exit", "--count", "256"],
        1,
        "sys.exit(256) called at sample_task.py:",
        id="sys.exit(256)",
    ),
    pytest.param(
        ["--behaviour", "sys-exit-text"],
        1,
        "the inventory file is locked (sys.exit called at sample_task.py:",
        id="sys.exit(text)",
    ),
    pytest.param(["--bogus"], 64, "unrecognized arguments: --bogus", id="64"),
    pytest.param(["--settings-plugin", "NoSuchPlugin"], 68, "NoSuchPlugin", id="68"),
    pytest.param(["--behaviour", "crash"], 70, "ZeroDivisionError: boom", id="70"),
    pytest.param(["--count", "many"], 78, "--count", id="78-option"),
    pytest.param(["--ca-bundle", "/nonexistent/ca.pem"], 78, "cannot load CA bundle", id="78-ca"),
    pytest.param(["--behaviour", "sleep", "--deadline", "0.5"], 124, "deadline of 0.5 s", id="124"),
]


@pytest.mark.parametrize(("args", "code", "fragment"), _ROWS)
def test_exit_code_rows_end_with_their_reason(
    agent: FakeAgent,  # noqa: F811
    args: list[str],
    code: int,
    fragment: str,
) -> None:
    """Each row of the exit-code table: the exact code, and the reason as the last line."""
    proc = _run(agent.base_url, *args)
    assert proc.returncode == code, proc.stderr
    _assert_reason_last(proc.stderr, code, fragment)


def test_exit_codes_69_75_77_end_with_their_reason(ca: trustme.CA) -> None:  # noqa: F811
    """Agent unreachable (69), broker unavailable (75), not trusted (77): reason last."""
    proc = _run(f"https://127.0.0.1:{free_port()}", env=_env(KEEPER_TASK_TRUST_TIMEOUT="0.6"))
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, proc.stderr
    _assert_reason_last(proc.stderr, 69, "127.0.0.1")
    broker = {"broker.host": "127.0.0.1", "broker.port": str(free_port()), "broker.tls": "false"}
    with FakeAgent(ca, broker) as server:
        proc = _run(server.base_url)
        assert proc.returncode == ExitCode.BROKER_UNAVAILABLE, proc.stderr
        _assert_reason_last(proc.stderr, 75, "127.0.0.1")
        server.faults.forbidden = 10**9
        proc = _run(server.base_url, env=_env(KEEPER_TASK_TRUST_TIMEOUT="0.6"))
        assert proc.returncode == ExitCode.NOT_TRUSTED, proc.stderr
        _assert_reason_last(proc.stderr, 77, "not launched by the agent")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_rows_end_with_their_reason(agent: FakeAgent, signum: int, code: int) -> None:  # noqa: F811
    """128+N: the exact code and `interrupted by SIG...` as the last line."""
    proc = _popen(agent.base_url, "--behaviour", "sleep")
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    proc.send_signal(signum)
    _, stderr = _finish(proc)
    assert proc.returncode == code, stderr
    _assert_reason_last(stderr, code, f"interrupted by {signal.Signals(signum).name}")


def test_lost_messages_warning_is_followed_by_the_reason(ca: trustme.CA) -> None:  # noqa: F811
    """A failed run whose flush lost messages: the warning comes, then the reason, last."""
    from tests.support.brokers import silent_server

    with silent_server(connack=b"\x20\x02\x00\x00") as port:
        settings = {"broker.host": "127.0.0.1", "broker.port": str(port), "broker.tls": "false"}
        with FakeAgent(ca, settings) as server:
            proc = _run(
                server.base_url, "--behaviour", "publish-fail", "--count", "3",
                "--mqtt-flush-timeout", "0.3",
            )  # fmt: skip
    assert proc.returncode == ExitCode.TASK_FAILED, proc.stderr
    assert "were not acknowledged before exit" in proc.stderr
    assert _last_line(proc.stderr) == f"{PROG}: error: inventory incomplete"


# --- usage errors before the run starts: one plain line, pipe or terminal ----------------


@pytest.mark.parametrize("log_format", ["json", "auto", "console"])
def test_missing_api_base_is_one_plain_line_on_a_pipe(log_format: str) -> None:
    """No --keeper-api-base: exactly one `prog: error:` line on a pipe, never a log record."""
    proc = _run(None, env=_env(KEEPER_TASK_LOG_FORMAT=log_format))
    assert proc.returncode == ExitCode.USAGE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{PROG}: error: missing --keeper-api-base: ")
    assert "{KeeperApiBaseUrl}" in lines[0]


def test_missing_api_base_is_one_plain_line_on_a_terminal() -> None:
    """The same single plain line when stderr is a terminal (console logging)."""
    primary, secondary = pty.openpty()
    env = _env()
    del env["KEEPER_TASK_LOG_FORMAT"]
    try:
        proc = subprocess.run(
            [sys.executable, str(SAMPLE)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=secondary,
            timeout=30,
        )
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if secondary != -1:
            os.close(secondary)
        os.close(primary)
    text = b"".join(chunks).decode()
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == ExitCode.USAGE
    assert len(lines) == 1, text
    assert lines[0].startswith(f"{PROG}: error: missing --keeper-api-base: ")


def test_events_before_the_stop_reach_keeper_logger_on_a_forced_exit(
    agent: FakeAgent,  # noqa: F811
    amqtt_broker: BrokerBase,
) -> None:
    """A forced exit by the grace still flushes: every event logged before it is on the broker."""
    with amqtt_broker.collect("KeeperLogger") as col:
        proc = _popen(agent.base_url, "--behaviour", "swallow-all", env=_env(SAMPLE_STOP_GRACE="1"))
        assert proc.stdout is not None
        _wait_line(proc.stdout, "READY")
        proc.send_signal(signal.SIGTERM)
        _, stderr = _finish(proc, timeout=60)
        assert proc.returncode == 143, stderr
        names = [e["message"] for e in _events(stderr)]
        got = _wait_messages(col, set(names))
    assert set(names) <= set(got)


def test_signal_during_the_exit_flush_keeps_its_bookkeeping(ca: trustme.CA) -> None:  # noqa: F811
    """SIGTERM while the exit flush waits for acks: the flush ends normally and counts the loss.

    The broker never acknowledges: the 5 events (and the KeeperLogger copies of the log
    events) stay unacknowledged for the whole --mqtt-flush-timeout. The same run without a
    signal gives the reference count; the signal must not change it, nor the exit code.
    """
    from tests.support.brokers import silent_server

    args = ("--behaviour", "publish", "--count", "5", "--mqtt-flush-timeout", "3")
    lost = re.compile(r": warning: (\d+) MQTT message\(s\) were not acknowledged before exit$")
    with silent_server(connack=b"\x20\x02\x00\x00") as port:
        settings = {"broker.host": "127.0.0.1", "broker.port": str(port), "broker.tls": "false"}
        with FakeAgent(ca, settings) as server:
            quiet = _run(server.base_url, *args)
            proc = _popen(server.base_url, *args)
            assert proc.stderr is not None
            _wait_line(proc.stderr, "TEARDOWN")
            proc.send_signal(signal.SIGTERM)
            _wait_line(proc.stderr, "note: SIGTERM after run() ended")
            _, rest = _finish(proc, timeout=60)
    assert quiet.returncode == proc.returncode == ExitCode.SUCCESS, rest
    reference = lost.search(_last_line(quiet.stderr))
    counted = lost.search(_last_line(rest))
    assert reference is not None and counted is not None, rest
    assert int(reference.group(1)) >= 5
    assert counted.group(1) == reference.group(1)


def test_deadline_swallowed_forever_ends_with_124_after_the_grace(agent: FakeAgent) -> None:  # noqa: F811
    """--deadline with a run() that swallows every stop: re-raised, then exit 124 by the grace."""
    env = _env(SAMPLE_STOP_GRACE="2")
    proc = _run(agent.base_url, "--behaviour", "swallow-all", "--deadline", "0.5", env=env)
    assert proc.returncode == ExitCode.DEADLINE, proc.stderr
    assert proc.stderr.count("SWALLOWED") >= 2
    last = _last_line(proc.stderr)
    assert last.startswith(f"{PROG}: error: deadline of 0.5 s exceeded: ")
    assert "did not end within 2 s (stop_grace)" in last


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc only")
def test_helper_threads_block_stop_signals_so_they_reach_the_main_thread(
    agent: FakeAgent,  # noqa: F811
) -> None:
    """Every thread the runtime starts (MQTT network thread, log flushers, timers) blocks
    SIGTERM/SIGINT: the OS can then only hand a stop to the main thread, whose blocking call
    (here time.sleep) it interrupts. Were a helper thread to take it, the main thread would
    sleep on with the stop unseen."""
    proc = _popen(agent.base_url, "--behaviour", "sleep", env=_env(SAMPLE_STOP_GRACE=_NO_GRACE))
    assert proc.stdout is not None
    _wait_line(proc.stdout, "READY")
    stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    masks = {}
    for task_dir in Path(f"/proc/{proc.pid}/task").iterdir():
        status = (task_dir / "status").read_text()
        blocked = int(re.search(r"SigBlk:\s*([0-9a-f]+)", status).group(1), 16)
        masks[int(task_dir.name)] = blocked & stops == stops
    assert masks.pop(proc.pid) is False  # the main thread takes the stop signals
    assert masks and all(masks.values()), masks  # every helper thread blocks them
    proc.send_signal(signal.SIGTERM)
    _, stderr = _finish(proc, timeout=60)
    assert proc.returncode == 143, stderr


def test_a_stop_right_before_a_blocking_call_is_not_left_waiting(
    agent: FakeAgent,  # noqa: F811
) -> None:
    """SIGTERM sent the moment the task prints READY, just before it enters time.sleep(3600):
    Python would run the handler only after the sleep returns; the runtime's wakeup-fd poke
    makes it run now. Ten tries (the race was hit in most of them without the poke)."""
    for _ in range(10):
        proc = _popen(agent.base_url, "--behaviour", "sleep", env=_env(SAMPLE_STOP_GRACE=_NO_GRACE))
        assert proc.stdout is not None
        _wait_line(proc.stdout, "READY")
        proc.send_signal(signal.SIGTERM)
        _, stderr = _finish(proc, timeout=60)
        assert proc.returncode == 143, stderr
