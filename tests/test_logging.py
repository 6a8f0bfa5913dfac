"""configure_logging / LogPipeline: stderr formats, redaction, buffering, KeeperLogger."""

from __future__ import annotations

import io
import itertools
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from keeper_task import Task, TaskContext
from keeper_task.errors import SettingsError
from keeper_task.logging import (
    REDACTED,
    configure_logging,
    critical_section,
    defer_until_safe,
    in_critical_section,
    looks_secret,
)
from keeper_task.mqtt import MqttClient
from keeper_task.testing import run_task

ROOT = Path(__file__).resolve().parent.parent


def _pythonpath() -> str:
    """This checkout first, then whatever the suite runs with (a lowest-versions run)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln]


def json_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(ln) for ln in lines(buf)]


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


def test_logs_reach_keeper_logger_as_schema_json_and_stderr(broker):
    """Events reach KeeperLogger via MqttClient as schema JSON, and stderr too."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err, job_id="inv-job", job_name="Inventory")
    log = pipeline.get_logger()
    client = MqttClient(
        host=broker.host,
        port=broker.port,
        client_id="inv-job_Inventory",
        ssl_context=broker.ssl_context(),
        allowed_publications=["KeeperLogger"],
    )
    with broker.collect("KeeperLogger") as col:
        client.connect()
        pipeline.attach(lambda b: client.publish("KeeperLogger", b, qos=1))
        log.info("item.processed", i=1, name="a")
        log.warning("disk.low", free_mb=12)
        pipeline.detach()
        assert client.disconnect() == 0
        got = col.wait_for(2)
    docs = [json.loads(p) for _t, p in got]
    assert [d["message"] for d in docs] == ["item.processed", "disk.low"]
    assert docs[0]["level"] == "Information" and docs[1]["level"] == "Warning"
    assert docs[0]["jobId"] == "inv-job" and docs[0]["jobName"] == "Inventory"
    assert docs[0]["source"] == "task"
    assert docs[0]["properties"] == {"i": 1, "name": "a"}
    # stderr carries the same documents, one per line
    assert json_lines(err)[:2] == docs
    assert pipeline.published == 2 and pipeline.publish_failures == 0


def test_events_before_attach_are_buffered_and_sent_in_order():
    """Events logged before attach() are published first, in order, then live events follow."""
    pipeline = configure_logging(fmt="json", stream=io.StringIO())
    log = pipeline.get_logger()
    for i in range(5):
        log.info("early", n=i)
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    log.info("live")
    msgs = [json.loads(b) for b in sent]
    assert [(m["message"], m["properties"].get("n")) for m in msgs] == [
        ("early", 0),
        ("early", 1),
        ("early", 2),
        ("early", 3),
        ("early", 4),
        ("live", None),
    ]


def test_buffer_overflow_keeps_newest_and_reports_dropped():
    """Past the buffer limit the oldest events are dropped, counted, and reported on attach."""
    pipeline = configure_logging(fmt="json", stream=io.StringIO(), buffer=3)
    log = pipeline.get_logger()
    for i in range(5):
        log.info("early", n=i)
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    msgs = [json.loads(b) for b in sent]
    assert [m["properties"].get("n") for m in msgs[:3]] == [2, 3, 4]
    assert msgs[3]["message"] == "keeper_logger.buffer_overflow"
    assert msgs[3]["properties"]["dropped"] == 2
    assert pipeline.buffer_dropped == 2


def test_detach_stops_publishing_and_buffering():
    """After detach() events go to stderr only and are not buffered for a later attach."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    log = pipeline.get_logger()
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    pipeline.detach()
    log.info("after")
    pipeline.attach(sent.append)
    assert sent == []
    assert json_lines(err)[-1]["message"] == "after"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_redaction_in_both_outputs(fmt):
    """Secret-looking keys (also nested) are '[redacted]' on stderr and in the payload."""
    err = io.StringIO()
    pipeline = configure_logging(fmt=fmt, stream=err)
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    headers = {"Authorization": "Bearer abc123", "Accept": "json"}
    pipeline.get_logger().info(
        "login",
        user="bob",
        password="hunter2",
        api_key="k-123",
        client_secret="s3",
        sessionToken="tok",
        headers=headers,
        db_private_key="pk",
    )
    out = err.getvalue()
    for secret in ("hunter2", "k-123", "s3", "tok", "abc123", "pk"):
        assert secret not in out
        assert secret.encode() not in sent[0]
    props = json.loads(sent[0])["properties"]
    assert props["user"] == "bob" and props["password"] == REDACTED
    assert props["headers"] == {"Authorization": REDACTED, "Accept": "json"}
    assert headers["Authorization"] == "Bearer abc123"  # the caller's dict is not mutated
    assert REDACTED in out


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("PASSWD", True),
        ("x-api-key", True),
        ("apikey", True),
        ("ssh_key", True),
        ("accessKey", True),
        ("Cookie", True),
        ("credentials", True),
        ("refresh_token", True),
        ("api.token", True),
        ("X-Api-Key", True),
        ("authorisation", True),
        ("db_passwd", True),
        ("key", True),
        ("private", True),
        ("user", False),
        ("keyboard", False),
        ("monkey", False),
        ("item", False),
    ],
)
def test_looks_secret(key, secret):
    """The secret-name heuristic flags the documented names and leaves ordinary ones."""
    assert looks_secret(key) is secret


def test_json_format_is_one_document_per_line():
    """fmt='json' writes exactly one parseable JSON document per event."""
    err = io.StringIO()
    log = configure_logging(fmt="json", stream=err).get_logger("worker", run=3)
    log.info("a", x=1)
    log.error("b")
    docs = json_lines(err)
    assert len(docs) == 2
    assert docs[0]["source"] == "worker" and docs[0]["properties"] == {"run": 3, "x": 1}
    assert docs[1]["level"] == "Error"


def test_console_format_is_human_readable():
    """fmt='console' writes aligned text with level, event and key=value, not JSON."""
    err = io.StringIO()
    configure_logging(fmt="console", stream=err).get_logger().info("item.done", count=3)
    (line,) = lines(err)
    assert "[info" in line and "item.done" in line and "count=3" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_auto_format_is_json_off_a_terminal_and_console_on_one():
    """fmt='auto' picks JSON for a pipe/file and the console renderer for a real TTY."""
    assert configure_logging(stream=io.StringIO()).json_lines is True
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert configure_logging(stream=tty).json_lines is False
    finally:
        os.close(master)
        os.close(slave)


def test_level_filtering_and_trace():
    """Events below the level are dropped; trace is below debug; .NET names are accepted."""
    err = io.StringIO()
    log = configure_logging(level="warning", fmt="json", stream=err).get_logger()
    log.trace("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.critical("c")
    assert [d["message"] for d in json_lines(err)] == ["w", "c"]
    err2 = io.StringIO()
    log2 = configure_logging(level="Trace", fmt="json", stream=err2).get_logger()
    log2.trace("t")
    assert json_lines(err2)[0]["level"] == "Trace"
    assert configure_logging(level="Information", stream=io.StringIO()).level == "info"
    with pytest.raises(SettingsError, match="unknown log level"):
        configure_logging(level="loud")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exception_traceback_in_stderr_and_payload(fmt):
    """log.exception() puts the traceback on stderr and in the payload's 'exception'."""
    err = io.StringIO()
    pipeline = configure_logging(fmt=fmt, stream=err)
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    try:
        {}["missing"]
    except KeyError:
        pipeline.get_logger().exception("lookup.failed", key="missing")
    doc = json.loads(sent[0])
    assert doc["level"] == "Error"
    assert "Traceback (most recent call last)" in doc["exception"]
    assert "KeyError: 'missing'" in doc["exception"]
    assert "KeyError: 'missing'" in err.getvalue()
    assert "Traceback" in err.getvalue()


def test_publish_failure_never_crashes_and_warns_once():
    """A raising publish is counted and reported once on stderr; logging continues."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)

    def broken(_payload: bytes) -> None:
        raise OSError("broker gone")

    pipeline.attach(broken)
    log = pipeline.get_logger()
    for i in range(3):
        log.info("still.logging", i=i)
    docs = json_lines(err)
    warnings = [d for d in docs if d["message"] == "keeper_logger.publish_failed"]
    assert len(warnings) == 1 and "broker gone" in warnings[0]["properties"]["error"]
    assert [d["properties"]["i"] for d in docs if d["message"] == "still.logging"] == [0, 1, 2]
    assert pipeline.publish_failures == 3
    pipeline.detach()
    assert json_lines(err)[-1]["message"] == "keeper_logger.summary"


def test_logging_inside_publish_does_not_recurse():
    """An event logged from within the publish function goes to stderr only (no recursion)."""
    err = io.StringIO()
    pipeline = configure_logging(level="debug", fmt="json", stream=err)
    log = pipeline.get_logger()
    sent: list[bytes] = []

    def publish(payload: bytes) -> None:
        log.debug("inner")
        sent.append(payload)

    pipeline.attach(publish)
    log.info("outer")
    assert [json.loads(b)["message"] for b in sent] == ["outer"]
    assert [d["message"] for d in json_lines(err)] == ["outer", "inner"]


def test_reconfigure_resets_structlog_global():
    """A second configure_logging() takes over structlog.get_logger() (level and stream)."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging(fmt="json", stream=first)
    lib_log = structlog.get_logger("lib.module")
    lib_log.info("one")
    configure_logging(fmt="json", stream=second, level="error")
    lib_log.info("two")  # below the new level
    lib_log.error("three")
    assert [d["message"] for d in json_lines(first)] == ["one"]
    docs = json_lines(second)
    assert [d["message"] for d in docs] == ["three"]
    assert docs[0]["source"] == "lib.module"


def test_positional_formatting_and_bind():
    """'%s' arguments are interpolated and bind() adds fields to every later event."""
    err = io.StringIO()
    log = configure_logging(fmt="json", stream=err).get_logger().bind(run_id="r1")
    log.info("processed %d items", 3)
    (doc,) = json_lines(err)
    assert doc["message"] == "processed 3 items" and doc["properties"] == {"run_id": "r1"}


def _pipe_stream() -> tuple[Any, int]:
    read_fd, write_fd = os.pipe()
    return os.fdopen(write_fd, "w", buffering=1), read_fd


def _read_until(read_fd: int, needle: bytes, timeout: float = 5.0) -> bytes:
    """Read the pipe until `needle` arrived (select with a deadline, no sleeping)."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            data += os.read(read_fd, 65536)
    return data


def test_stderr_bursts_to_a_pipe_are_coalesced_but_arrive_in_order() -> None:
    """To a pipe, a burst of info lines is written in few writes, in order, within the
    flush interval, without any flush call."""
    stream, read_fd = _pipe_stream()
    try:
        pipeline = configure_logging(fmt="json", stream=stream)
        log = pipeline.get_logger()
        for i in range(200):
            log.info("burst", i=i)
        log.info("last")
        data = _read_until(read_fd, b'"last"')
        docs = [json.loads(line) for line in data.decode().splitlines()]
        assert [d["properties"]["i"] for d in docs if d["message"] == "burst"] == list(range(200))
        assert docs[-1]["message"] == "last"
        pipeline.close()
    finally:
        stream.close()
        os.close(read_fd)


def test_warnings_reach_a_pipe_at_once() -> None:
    """A warning (and what was pending before it) is written immediately, not batched."""
    stream, read_fd = _pipe_stream()
    try:
        pipeline = configure_logging(fmt="json", stream=stream)
        log = pipeline.get_logger()
        log.info("before")
        log.warning("careful")
        ready, _, _ = select.select([read_fd], [], [], 0)  # no waiting at all
        assert ready
        data = os.read(read_fd, 65536).decode()
        assert [json.loads(line)["message"] for line in data.splitlines()] == ["before", "careful"]
        pipeline.close()
    finally:
        stream.close()
        os.close(read_fd)


def test_batched_publishing_keeps_order_and_hands_over_on_warning_and_detach() -> None:
    """attach(batch=True): info events go out in bursts, in order; a warning sends what is
    pending at once; detach() hands over the rest (nothing is lost)."""
    sent: list[str] = []
    pipeline = configure_logging(fmt="json", stream=io.StringIO())
    pipeline.attach(lambda payload: sent.append(json.loads(payload)["message"]), batch=True)
    log = pipeline.get_logger()
    for i in range(5):
        log.info(f"info-{i}")
    log.warning("careful")  # synchronous: everything before it is published now
    assert sent == [*(f"info-{i}" for i in range(5)), "careful"]
    for i in range(300):  # over the burst limit: handed over without waiting for the timer
        log.info("bulk", i=i)
    log.info("last")
    pipeline.detach()
    assert sent[6:] == [*(["bulk"] * 300), "last"]
    assert pipeline.published == len(sent) == 307


# -- shutdown races: every event is delivered or counted ---------------------------------


@pytest.mark.parametrize("batch", [True, False], ids=["batched", "direct"])
@pytest.mark.parametrize("failing", [False, True], ids=["ok", "every-7th-fails"])
def test_detach_while_threads_log_delivers_or_counts_every_event(batch, failing) -> None:
    """8 threads log while detach() runs: sent + undelivered + after_detach == logged, exactly."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    sent: list[bytes] = []
    calls = itertools.count(1)

    def publish(payload: bytes) -> None:
        if failing and next(calls) % 7 == 0:
            raise OSError("broker gone")
        sent.append(payload)

    pipeline.attach(publish, batch=batch)
    log = pipeline.get_logger()
    threads_n, minimum, after = 8, 400, 50
    logged = [0] * threads_n
    started = threading.Barrier(threads_n + 1)

    def worker(n: int) -> None:
        started.wait()
        seen_detached = 0
        i = 0
        # At least `minimum` events, and `after` more once the detach was seen: the detach
        # lands in the middle of the burst whatever the scheduling.
        while i < minimum or seen_detached < after:
            log.info("burst", thread=n, i=i)
            i += 1
            if not pipeline.attached:
                seen_detached += 1
        logged[n] = i

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    started.wait()
    while pipeline._logged < threads_n * 50:  # detach once every thread is under way
        time.sleep(0)
    pipeline.detach()
    for t in threads:
        t.join()
    total = sum(logged)
    assert len(sent) + pipeline.undelivered + pipeline.after_detach == total
    assert pipeline.after_detach >= threads_n * after
    assert len(sent) == pipeline.published
    if failing:
        assert pipeline.undelivered == pipeline.publish_failures > 0
        summary = [d for d in json_lines(err) if d["message"] == "keeper_logger.summary"]
        assert len(summary) == 1
        assert summary[0]["properties"]["undelivered"] == pipeline.undelivered
    else:
        assert pipeline.undelivered == 0
    # Per thread, what was sent keeps the logging order.
    for n in range(threads_n):
        mine = [json.loads(p)["properties"] for p in sent]
        order = [m["i"] for m in mine if m["thread"] == n]
        assert order == sorted(order)


def test_batcher_close_racing_adds_hands_over_every_item() -> None:
    """Items added by many threads while close() runs all reach the sink, in per-thread order
    (the flusher thread flushes once more before it ends; close marks closed first)."""
    from keeper_task.logging import _Batcher

    for _round in range(20):
        got: list[tuple[int, int]] = []
        batcher = _Batcher(got.extend, name="test-batcher", limit=10_000)
        gate = threading.Barrier(5)

        def adder(n: int, b: _Batcher = batcher, g: threading.Barrier = gate) -> None:
            g.wait()
            for i in range(300):
                if b.add((n, i)):
                    b.flush()

        threads = [threading.Thread(target=adder, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        gate.wait()
        batcher.close()
        for t in threads:
            t.join()
        batcher.flush()  # what arrived after close was flushed by its adder; nothing is left
        assert batcher.pending == 0
        assert sorted(got) == [(n, i) for n in range(4) for i in range(300)]
        for n in range(4):
            assert [i for m, i in got if m == n] == list(range(300))


def test_events_after_detach_are_counted_in_one_line_at_exit(tmp_path) -> None:
    """A process that logs after detach() ends with one keeper_logger.after_detach line
    giving the exact count; the summary line counts the failed publishes."""
    script = tmp_path / "late.py"
    script.write_text(
        "from keeper_task.logging import configure_logging\n"
        "p = configure_logging(fmt='json')\n"
        "log = p.get_logger()\n"
        "def publish(payload):\n"
        "    raise OSError('down')\n"
        "p.attach(publish)\n"
        "log.info('before')\n"
        "p.detach()\n"
        "for i in range(3):\n"
        "    log.info('late', i=i)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stderr.splitlines()]
    names = [d["message"] for d in docs]
    assert names == [
        "before",
        "keeper_logger.publish_failed",
        "keeper_logger.summary",
        "late",
        "late",
        "late",
        "keeper_logger.after_detach",
    ]
    assert docs[2]["properties"] == {
        "published": 0,
        "undelivered": 1,
        "failed": 1,
        "buffer_dropped": 0,
    }
    assert docs[-1]["properties"]["count"] == 3


class _Stop(BaseException):
    pass


def test_stop_requests_landing_in_the_pipeline_lose_nothing() -> None:
    """Signals raise in the main thread while it logs (as SIGTERM does in a task): with the
    handler deferring through defer_until_safe, every event that reached stderr was
    published exactly once, in order, and none is counted as lost."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    sent: list[bytes] = []
    pipeline.attach(sent.append)  # direct: each log call publishes on the main thread
    log = pipeline.get_logger()
    raised = 0
    armed = [False]  # raise only around the log call: elsewhere the test itself would break

    def stop() -> None:
        armed[0] = False  # one raise per log call
        raise _Stop

    def handler(_signum: int, _frame: Any) -> None:
        if not armed[0]:
            return
        if not defer_until_safe(stop):
            stop()

    old = signal.signal(signal.SIGUSR1, handler)
    done = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    progress = [0]  # log calls made by the main thread

    def killer() -> None:
        for _ in range(1000):
            seen = progress[0]
            signal.pthread_kill(main, signal.SIGUSR1)
            while progress[0] == seen:  # one signal per log call: wait for the next one
                time.sleep(0)
        done.set()

    thread = threading.Thread(target=killer)
    i = 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # hand the GIL back and forth often: many signals, fast
    try:
        thread.start()
        while not done.is_set():
            try:
                armed[0] = True
                log.info("tick", i=i)
                armed[0] = False
            except _Stop:
                raised += 1
            i += 1
            progress[0] = i
        thread.join()
    finally:
        armed[0] = False
        sys.setswitchinterval(switch)
        signal.signal(signal.SIGUSR1, old)
    pipeline.detach()
    on_stderr = [d["properties"]["i"] for d in json_lines(err) if d["message"] in ("tick", "tail")]
    published = [json.loads(p)["properties"]["i"] for p in sent]
    assert raised > 0  # the signals did land
    assert pipeline.undelivered == 0
    assert len(published) == len(set(published)) == pipeline.published  # once each
    assert published == sorted(published)
    assert set(on_stderr) <= set(published)
    assert not in_critical_section()


def test_critical_section_defers_an_action_until_it_ends() -> None:
    """defer_until_safe runs nothing outside a critical section and, inside one, runs the
    action exactly once when the outermost section ends."""
    ran: list[str] = []
    assert defer_until_safe(lambda: ran.append("x")) is False
    with critical_section():
        with critical_section():
            assert in_critical_section()
            assert defer_until_safe(lambda: ran.append("first")) is True
            assert defer_until_safe(lambda: ran.append("second")) is True
        assert ran == []
    assert ran == ["first"]
    assert not in_critical_section()


def test_run_task_restores_the_structlog_configuration(keeper_agent) -> None:
    """After an in-process run_task, structlog logs where it did before, not into the dead
    StringIO the run captured."""
    before = io.StringIO()
    configure_logging(fmt="json", stream=before)
    config = structlog.get_config()

    class Quiet(Task):
        def run(self, ctx: TaskContext) -> None:
            ctx.log.info("inside")

    result = run_task(keeper_agent, Quiet)
    assert result.exit_code == 0, result.stderr
    assert "inside" in result.stderr
    assert structlog.get_config() == config
    structlog.get_logger("lib").info("after.run")
    assert [d["message"] for d in json_lines(before)] == ["after.run"]
    assert "after.run" not in result.stderr


def test_a_real_terminal_gets_console_lines_with_tracebacks() -> None:
    """On a terminal (a pty): colored console lines, a redacted traceback, no warning, exit
    0 (the console renderer is built with keywords every supported structlog accepts)."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from keeper_task.logging import configure_logging\n"
        "log = configure_logging().get_logger()\n"
        "log.info('on.terminal', count=3, password='pw-123')\n"
        "secret = 'tb-' + 'secret'\n"
        "try:\n"
        "    raise ValueError({'token': secret})\n"
        "except ValueError:\n"
        "    log.exception('failed.here')\n"
    )
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        os.close(slave)
        slave = -1
        data = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
        assert proc.wait(timeout=60) == 0, data
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = data.decode("utf-8", "replace")
    assert "on.terminal" in text and "failed.here" in text
    assert "\x1b[" in text  # colors: the console renderer, not JSON
    assert "ValueError: {'token': '[redacted]'}" in text
    assert "pw-123" not in text and "tb-secret" not in text
    assert "Warning" not in text


def test_report_late_writes_the_after_detach_line_when_asked() -> None:
    """report_late() writes the count of events logged since detach() at once (a runtime
    calls it before its own last line); nothing is written when there are none."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    pipeline.attach(lambda _payload: None)
    log = pipeline.get_logger()
    log.info("sent")
    pipeline.detach()
    pipeline.report_late()
    assert [d["message"] for d in json_lines(err)] == ["sent"]
    log.info("late")
    log.info("late")
    pipeline.report_late()
    docs = json_lines(err)
    assert [d["message"] for d in docs] == ["sent", "late", "late", "keeper_logger.after_detach"]
    assert docs[-1]["properties"]["count"] == 2 == pipeline.after_detach
    pipeline.report_late()  # already reported: no second line
    assert len(json_lines(err)) == 4


def test_zero_buffer_drops_and_counts_early_events() -> None:
    """buffer=0 keeps nothing before attach(): early events are counted as dropped (and
    undelivered), and logging them does not fail."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err, buffer=0)
    log = pipeline.get_logger()
    log.info("early")
    log.info("early")
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    assert [json.loads(p)["message"] for p in sent] == ["keeper_logger.buffer_overflow"]
    assert pipeline.buffer_dropped == 2
    pipeline.detach()
    assert pipeline.undelivered == 2
    summary = json_lines(err)[-1]
    assert summary["message"] == "keeper_logger.summary"
    assert summary["properties"]["buffer_dropped"] == 2
