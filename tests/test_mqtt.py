"""MqttClient and build_client_id against real brokers (amqtt, mosquitto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from keeper_task import mqtt as mqtt_module
from keeper_task.errors import (
    BrokerUnavailableError,
    MqttError,
    PublishError,
    SettingsError,
    TopicNotDeclaredError,
)
from keeper_task.mqtt import (
    DEFAULT_CLIENT_ID_TEMPLATE,
    MqttClient,
    build_client_id,
    topic_allowed,
)
from keeper_task.tls import client_ssl_context
from tests.support.brokers import (
    BrokerBase,
    MosquittoBroker,
    find_mosquitto,
    free_port,
    silent_server,
)
from tests.support.fake_agent import FakeAgent


def make_client(b, **kw) -> MqttClient:
    kw.setdefault("client_id", "test-job_unit")
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("ssl_context", b.ssl_context())
    return MqttClient(host=b.host, port=b.port, **kw)


# -- client id ------------------------------------------------------------------------------


def test_client_id_default_template_puts_job_id_first():
    """The default template yields '<job_id>_<job_name>' with the job name sanitised."""
    cid = build_client_id(
        DEFAULT_CLIENT_ID_TEMPLATE, job_id="nightly-inv", job_name="Nightly inv_2!"
    )
    assert cid == "nightly-inv_Nightly-inv-2-"
    assert cid.split("_")[0] == "nightly-inv"


def test_client_id_missing_job_name_and_pid_field():
    """A missing job name becomes 'task' and {pid} is the given (or current) process id."""
    assert build_client_id("{job_id}_{job_name}", job_id="j1") == "j1_task"
    assert build_client_id("{job_id}_{pid}", job_id="j1", pid=42) == "j1_42"


@pytest.mark.parametrize("job_id", ["my_job", "", "_x"])
def test_client_id_refuses_bad_job_id(job_id):
    """An empty job id or one containing '_' is a SettingsError, never rewritten."""
    with pytest.raises(SettingsError, match="job id"):
        build_client_id(DEFAULT_CLIENT_ID_TEMPLATE, job_id=job_id, job_name="n")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{job_name}_{job_id}", "first '_'-separated segment"),
        ("{job_id}-{pid}", "first '_'-separated segment"),
        ("{job_id}_{host}", "unknown field"),
        ("{job_id}_{", "invalid MQTT client id template"),
    ],
)
def test_client_id_refuses_bad_template(template, match):
    """A template that does not start with the job id segment, or has unknown fields, fails."""
    with pytest.raises(SettingsError, match=match):
        build_client_id(template, job_id="job-1", job_name="n", pid=1)


def test_topic_allowed_uses_mqtt_wildcards():
    """'+' matches one level and '#' any remainder; other topics are not allowed."""
    allowed = ["KeeperLogger", "Jobs/+/events", "Custom/#"]
    assert topic_allowed("KeeperLogger", allowed)
    assert topic_allowed("Jobs/job-1/events", allowed)
    assert topic_allowed("Custom/a/b/c", allowed)
    assert not topic_allowed("Jobs/job-1/other", allowed)
    assert not topic_allowed("KeeperLogger/x", allowed)


# -- connect --------------------------------------------------------------------------------


def test_tcp_nodelay_is_set_on_the_socket(plain_broker):
    """After connect() the broker socket has TCP_NODELAY (paho does not set it)."""
    client = make_client(plain_broker)
    client.connect()
    try:
        sock = client._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert client.connected
    finally:
        client.disconnect()
    assert not client.connected


def test_connect_refused_port_fails_fast():
    """A closed port raises BrokerUnavailableError at once, naming the broker address."""
    port = free_port()
    client = MqttClient(host="127.0.0.1", port=port, client_id="j_x", ssl_context=None)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}") as info:
        client.connect()
    assert time.monotonic() - t0 < 2
    assert isinstance(info.value.__cause__, OSError)
    assert client.disconnect() == 0  # idempotent and harmless after a failed connect


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_connect_times_out_on_silent_server(tls):
    """A server that accepts but never answers gives BrokerUnavailableError within the timeout."""
    ctx = client_ssl_context(host="127.0.0.1") if tls else None
    with silent_server() as port:
        client = MqttClient(
            host="127.0.0.1", port=port, client_id="j_x", ssl_context=ctx, connect_timeout=0.5
        )
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=r"0\.5s"):
            client.connect()
        assert time.monotonic() - t0 < 1.5
        assert not client.connected


class _Stop(BaseException):
    """Stands for a signal or the task's deadline arriving while connect() waits."""


def test_connect_interrupted_while_waiting_stops_the_network_thread():
    """A signal during the CONNACK wait leaves no paho thread behind (nothing keeps running)."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def on_signal(_signum, _frame):
        raise _Stop

    old = signal.signal(signal.SIGUSR1, on_signal)
    try:
        with silent_server() as port:
            client = MqttClient(
                host="127.0.0.1",
                port=port,
                client_id="interrupted_x",
                ssl_context=None,
                connect_timeout=30,
            )
            timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))
            timer.start()
            try:
                with pytest.raises(_Stop):
                    client.connect()
            finally:
                timer.cancel()
    finally:
        signal.signal(signal.SIGUSR1, old)
    alive = [t.name for t in threading.enumerate() if "interrupted_x" in t.name]
    assert alive == []
    assert not client.connected


def test_connack_not_authorized_says_process_not_trusted():
    """A CONNACK 'not authorized' is BrokerUnavailableError explaining the agent's trust."""
    with silent_server(connack=b"\x20\x02\x00\x05") as port:
        client = MqttClient(host="127.0.0.1", port=port, client_id="j_x", ssl_context=None)
        with pytest.raises(BrokerUnavailableError, match="does not trust this process") as info:
            client.connect()
    assert info.value.rc == 135


@pytest.mark.mosquitto
def test_real_broker_refusing_anonymous_is_not_trusted():
    """mosquitto without anonymous access refuses us with a not-authorized CONNACK."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin")
    with MosquittoBroker(allow_anonymous=False) as b:
        client = make_client(b)
        with pytest.raises(BrokerUnavailableError, match="does not trust") as info:
            client.connect()
    assert info.value.rc in (134, 135)


def test_tls_with_the_right_ca(broker):
    """TLS verified against the broker's CA connects and delivers a message."""
    client = make_client(
        broker, ssl_context=client_ssl_context(host="127.0.0.1", ca_bundle=broker.ca_pem_path)
    )
    client.connect()
    try:
        assert client.tls and client.connected
        with broker.collect("t/tls") as col:
            client.publish("t/tls", b"hello", wait=True)
            assert col.wait_for(1) == [("t/tls", b"hello")]
    finally:
        client.disconnect()


def test_tls_unverified_toward_loopback(broker):
    """Without a CA bundle the loopback policy (encrypted, unverified) still connects."""
    client = make_client(broker, ssl_context=client_ssl_context(host="127.0.0.1"))
    client.connect()
    assert client.connected
    assert client.disconnect() == 0


def test_tls_with_a_wrong_ca_fails(amqtt_tls_broker, tmp_path):
    """A CA that did not sign the broker's certificate gives BrokerUnavailableError (TLS)."""
    from tests.support.brokers import make_ca_files

    other = make_ca_files(tmp_path / "other")
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=other.ca_pem)
    client = make_client(amqtt_tls_broker, ssl_context=ctx)
    with pytest.raises(BrokerUnavailableError, match="TLS"):
        client.connect()


# -- publish --------------------------------------------------------------------------------


def test_undeclared_topic_raises_before_sending(plain_broker):
    """An undeclared topic raises TopicNotDeclaredError and nothing reaches the broker."""
    client = make_client(plain_broker, allowed_publications=["KeeperLogger", "Jobs/+/events"])
    client.connect()
    try:
        with plain_broker.collect("#") as col:
            with pytest.raises(TopicNotDeclaredError, match="Secret/topic"):
                client.publish("Secret/topic", b"x")
            assert client.unacked == 0
            client.publish("Jobs/job-1/events", {"ok": True}, wait=True)
            client.publish("KeeperLogger", "line", wait=True)
            msgs = col.wait_for(2)
        topics = [t for t, _ in msgs]
        assert "Secret/topic" not in topics
        assert ("Jobs/job-1/events", b'{"ok":true}') in msgs
        assert ("KeeperLogger", b"line") in msgs
    finally:
        client.disconnect()


def test_publish_wait_returns_after_ack(broker):
    """publish(wait=True) returns only once the broker acknowledged (nothing left unacked)."""
    client = make_client(broker)
    client.connect()
    try:
        client.publish("t/wait", b"1", qos=1, wait=True, timeout=5)
        assert client.unacked == 0
        client.publish("t/wait", b"2", qos=2, wait=True, timeout=5)
        assert client.unacked == 0
    finally:
        client.disconnect()


def test_burst_of_qos1_messages_all_delivered(broker):
    """1500 QoS 1 messages published without waiting are all acked by disconnect() and received."""
    n = 1500
    with broker.collect("burst") as col:
        client = make_client(broker)
        client.connect()
        for i in range(n):
            client.publish("burst", str(i).encode())
        assert client.disconnect(timeout=20) == 0
        got = col.wait_for(n, timeout=20)
    assert sorted(int(p) for _, p in got) == list(range(n))


def test_publish_from_many_threads(amqtt_broker):
    """Concurrent publishers on one client lose nothing (the client is thread-safe)."""
    client = make_client(amqtt_broker)
    client.connect()
    with amqtt_broker.collect("mt/#") as col:

        def work(k: int) -> None:
            for i in range(200):
                client.publish(f"mt/{k}", f"{k}-{i}".encode())

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.flush(10) == 0
        got = col.wait_for(800, timeout=10)
    client.disconnect()
    assert len({p for _, p in got}) == 800


def test_publish_when_not_connected_and_bad_payloads(amqtt_broker):
    """Publishing while not connected is BrokerUnavailableError; bad input is PublishError."""
    client = make_client(amqtt_broker)
    with pytest.raises(BrokerUnavailableError, match="not connected"):
        client.publish("t", b"x")
    client.connect()
    with pytest.raises(PublishError, match="JSON"):
        client.publish("t", {"x": object()})
    with pytest.raises(PublishError, match="must be bytes"):
        client.publish("t", 3.5)  # type: ignore[arg-type]
    with pytest.raises(PublishError, match="cannot publish"):
        client.publish("t/+/x", b"x")
    assert client.unacked == 0
    assert client.disconnect() == 0
    assert client.disconnect() == 0  # idempotent
    with pytest.raises(BrokerUnavailableError):
        client.publish("t", b"x")


def test_subscribe_receives_messages(plain_broker):
    """subscribe() waits for the SUBACK and hands (topic, payload) to the callback."""
    client = make_client(plain_broker)
    client.connect()
    got: list[tuple[str, bytes]] = []
    done = threading.Event()

    def on_msg(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        done.set()

    try:
        client.subscribe("in/+", on_msg)
        client.publish("in/a", json.dumps({"v": 1}), wait=True)
        assert done.wait(5)
        assert got == [("in/a", b'{"v": 1}')]
    finally:
        client.disconnect()


def test_subscribe_before_connect_is_an_error(amqtt_broker):
    """subscribe() on a client that is not connected raises an MqttError subclass."""
    client = make_client(amqtt_broker)
    with pytest.raises(MqttError):
        client.subscribe("x", lambda _t, _p: None)


def test_publish_wait_times_out_when_broker_stops_acking():
    """Without a PUBACK, wait=True raises PublishError and disconnect() counts it lost."""
    # A fake broker: accept CONNECT with CONNACK 0, then swallow everything.
    with silent_server(connack=b"\x20\x02\x00\x00") as port:
        client = MqttClient(host="127.0.0.1", port=port, client_id="j_x", ssl_context=None)
        client.connect()
        with pytest.raises(PublishError, match="not acknowledged"):
            client.publish("t", b"x", wait=True, timeout=0.3)
        assert client.unacked == 1
        assert client.disconnect(timeout=0.2) == 1


def test_stalled_broker_counts_every_unacknowledged_message():
    """A broker that never acks: disconnect() returns exactly the number published."""
    with silent_server(connack=b"\x20\x02\x00\x00") as port:
        client = MqttClient(host="127.0.0.1", port=port, client_id="j_x", ssl_context=None)
        client.connect()
        for i in range(50):
            client.publish("t", str(i).encode())
        assert client.unacked == 50
        assert client.disconnect(timeout=0.2) == 50
        assert client.disconnect() == 50  # idempotent: the same count again


@pytest.mark.parametrize("timeout", [1e20, float("inf")], ids=["1e20", "inf"])
def test_huge_flush_timeouts_deliver_everything(plain_broker, timeout):
    """disconnect(1e20) with 1,000 queued events neither overflows nor drops: all arrive."""
    n = 1000
    with plain_broker.collect("huge") as col:
        client = make_client(plain_broker)
        client.connect()
        client.publish("huge", b"first", wait=True, timeout=timeout)
        for i in range(n):
            client.publish("huge", str(i).encode())
        assert client.disconnect(timeout=timeout) == 0
        got = col.wait_for(n + 1, timeout=20)
    assert sorted(int(p) for _, p in got if p != b"first") == list(range(n))


def test_wait_inside_a_subscription_callback_is_refused_and_plain_publish_works(plain_broker):
    """The callback runs on the network thread: wait=True there would wait for itself."""
    client = make_client(plain_broker)
    client.connect()
    errors: list[BaseException] = []
    done = threading.Event()

    def on_msg(_topic: str, _payload: bytes) -> None:
        try:
            client.publish("cb/reply", b"r", wait=True)
        except PublishError as exc:
            errors.append(exc)
        client.publish("cb/reply", b"r")  # queued; sent once the callback returns
        done.set()

    try:
        with plain_broker.collect("cb/reply") as col:
            client.subscribe("cb/in", on_msg)
            client.publish("cb/in", b"x", wait=True)
            assert done.wait(10)
            assert col.wait_for(1, timeout=10) == [("cb/reply", b"r")]
        assert len(errors) == 1 and "subscription callback" in str(errors[0])
    finally:
        assert client.disconnect() == 0


# -- asynchronous raises during publish -----------------------------------------------------


class _Injected(BaseException):
    """Stands for a signal handler's or the deadline's raise, at one chosen bytecode."""


def _publish_raising_at(client: MqttClient, step: int, payload: bytes) -> bool:
    """Call publish() with an exception injected at its ``step``-th bytecode (any frame of
    keeper_task/mqtt.py); return True when publish() completed before that step."""
    count = 0

    def local(frame, event, _arg):
        nonlocal count
        if event == "opcode":
            count += 1
            if count == step:
                raise _Injected
        return local

    def tracer(frame, _event, _arg):
        if frame.f_code.co_filename != mqtt_module.__file__:
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    try:
        client.publish("async/t", payload)
    except _Injected:
        return False
    finally:
        sys.settrace(None)
    return True


def test_an_asynchronous_raise_anywhere_in_publish_keeps_the_count_exact(plain_broker):
    """A raise at every bytecode of publish() in turn: each message is counted exactly when
    it will be sent, and the broker receives exactly the counted ones (none lost uncounted,
    no phantom left for the flush to wait on)."""
    client = make_client(plain_broker)
    client.connect()
    # Park the network thread in a subscription callback so nothing is sent meanwhile:
    # unacked then changes only through publish() itself.
    entered, release = threading.Event(), threading.Event()

    def park(_t: str, _p: bytes) -> None:
        entered.set()
        release.wait(60)

    client.subscribe("async/park", park)
    try:
        with plain_broker.collect("async/t") as col:
            client.publish("async/park", b"x")
            assert entered.wait(10)
            base = client.unacked
            counted: list[bytes] = []
            step = 0
            completed = False
            while not completed:
                step += 1
                payload = str(step).encode()
                before = client.unacked
                completed = _publish_raising_at(client, step, payload)
                delta = client.unacked - before
                assert delta in (0, 1), (step, delta)
                if completed:
                    assert delta == 1
                if delta:
                    counted.append(payload)
            assert step > 50  # the injection really walked through publish()
            assert client.unacked == base + len(counted)
            release.set()
            assert client.flush(10) == 0
            client.publish("async/t", b"end", wait=True)
            got = [p for _, p in col.wait_for(len(counted) + 1, timeout=10)]
        # QoS 1 from one client on one topic keeps its order: everything came before "end".
        assert got[-1] == b"end"
        assert sorted(got[:-1]) == sorted(counted)
    finally:
        release.set()
        assert client.disconnect() == 0


# -- a stopped task publishing in a loop (real processes) -----------------------------------

PUBLISH_LOOP = Path(__file__).parent / "support" / "mqtt_publish_loop_task.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mqtt_ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("attempt", range(4))
def test_sigterm_while_publishing_exits_at_once_and_counts_nothing_lost(
    mqtt_ca: trustme.CA, amqtt_broker: BrokerBase, attempt: int
) -> None:
    """SIGTERM lands somewhere in a publish loop: exit 143 without waiting out the flush
    timeout, no 'not acknowledged' line, and the broker got every message the task sent."""
    flush_timeout = 40.0
    settings = {
        "broker.host": amqtt_broker.host,
        "broker.port": str(amqtt_broker.port),
        "broker.tls": "false",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env.update(
        PYTHONPATH=str(ROOT),
        KEEPER_JOB_ID="loop-job",
        KEEPER_JOB_NAME="loop",
        KEEPER_TASK_TRUST_TIMEOUT="5",
        KEEPER_TASK_MQTT_FLUSH_TIMEOUT=str(flush_timeout),
    )
    with FakeAgent(mqtt_ca, settings) as agent, amqtt_broker.collect("Jobs/loop-job/events") as col:
        proc = subprocess.Popen(
            [sys.executable, str(PUBLISH_LOOP), f"--keeper-api-base={agent.base_url}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "PUBLISHING", proc.stderr
            proc.send_signal(signal.SIGTERM)
            # Half the flush timeout: a phantom unacked message would make it wait it out.
            out, err = proc.communicate(timeout=flush_timeout / 2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 143, err
        assert "not acknowledged" not in err
        sent = int(out.split("SENT ")[1].split()[0])
        assert sent >= 200
        got = col.wait_for(sent, timeout=20)
    numbers = [json.loads(p)["i"] for _, p in got]
    assert len(numbers) == len(set(numbers))
    # The publish the signal interrupted may have been sent too.
    assert set(numbers) in (set(range(sent)), set(range(sent + 1)))


# -- what the network loop relies on in paho (a new paho release must keep it) --------------


def _pump(client: paho.Client, until, timeout: float = 10.0) -> None:
    """Drive a bare paho client through its external-loop API until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "paho did not get there in time"
        sock = client.socket()
        assert sock is not None
        wlist = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock], wlist, [], 0.1)
        if readable:
            client.loop_read()
        if writable:
            client.loop_write()
        client.loop_misc()


def _open_sockets() -> dict[str, int]:
    """Socket inode -> file descriptor, for the sockets this process has open."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listing's own descriptor, closed meanwhile
        if target.startswith("socket:"):
            found[target] = int(name)
    return found


def _family(fd: int) -> int | None:
    """The address family of the socket behind ``fd`` (None: not a socket, or gone)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return int(sock.family)
    except OSError:
        return None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_paho_external_loop_contract(plain_broker):
    """MqttClient's network loop and its bookkeeping rely on exactly these paho behaviours:

    * ``connect()`` without ``loop_start()`` opens only the MQTT socket: no wake-up
      socketpair that every publish would write a byte to (paho's own thread does that);
    * ``on_socket_open`` hands over the socket (TCP_NODELAY is set there);
    * with ``on_socket_register_write`` set, ``publish()`` only queues: one register call
      for a whole burst, ``want_write()`` true, and one ``loop_write()`` writes it all;
    * one ``loop_read()`` handles every buffered packet while that many are in flight;
    * ``reconnect()`` drops unwritten QoS 0 messages, setting their info's ``rc`` to
      ``MQTT_ERR_CONN_LOST`` without calling ``on_publish`` (MqttClient counts them as lost
      from that);
    * ``socket()`` is None once the connection is closed.
    """
    opened: list[socket.socket] = []
    registers: list[int] = []
    unregisters: list[int] = []
    acked: list[int] = []
    connected = threading.Event()
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="contract_x",
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(0)
    client.on_socket_open = lambda _c, _u, s: opened.append(s)
    client.on_socket_register_write = lambda _c, _u, _s: registers.append(1)
    client.on_socket_unregister_write = lambda _c, _u, _s: unregisters.append(1)
    client.on_connect = lambda *_a: connected.set()
    client.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
    if plain_broker.tls:
        client.tls_set_context(plain_broker.ssl_context())
    sockets = _open_sockets()
    client.connect(plain_broker.host, plain_broker.port, keepalive=30)
    try:
        now = _open_sockets()
        new = [fd for inode, fd in now.items() if inode not in sockets]
        assert client.socket().fileno() in new
        # No socketpair (AF_UNIX); an in-process broker may add its accepted TCP socket.
        assert [fd for fd in new if _family(fd) == socket.AF_UNIX] == []
        assert len(opened) == 1 and opened[0] is client.socket()
        _pump(client, connected.is_set)

        n = 200
        registers.clear()
        unregisters.clear()
        infos = [client.publish("contract", str(i).encode(), qos=1) for i in range(n)]
        assert all(info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS for info in infos)
        assert registers == [1]  # one wake-up for the whole burst
        assert client.want_write()
        assert client.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert not client.want_write() and unregisters == [1]

        # Wait until all n PUBACKs (4 bytes each) are buffered, then read them in one call.
        sock = client.socket()
        assert sock is not None
        deadline = time.monotonic() + 10
        while True:
            select.select([sock], [], [], 0.1)
            try:
                if len(sock.recv(4 * n, socket.MSG_PEEK)) >= 4 * n:
                    break
            except BlockingIOError:
                pass
            assert time.monotonic() < deadline, "the broker did not ack in time"
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert sorted(acked) == sorted(info.mid for info in infos)

        acked.clear()
        dropped = client.publish("contract", b"qos0", qos=0)  # queued, not written
        assert dropped.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not dropped.is_published()
        client.reconnect()
        assert dropped.rc == MQTTErrorCode.MQTT_ERR_CONN_LOST
        assert acked == []
        assert len(opened) == 2 and opened[1] is client.socket()
    finally:
        client.disconnect()
        if client.socket() is not None:
            _pump(client, lambda: client.socket() is None)
    assert client.socket() is None


class _Events:
    """A logger that records event names and lets a test wait for one (no sleeping)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._cond = threading.Condition()

    def _record(self, event: str, **_fields: object) -> None:
        with self._cond:
            self.names.append(event)
            self._cond.notify_all()

    info = warning = error = _record

    def wait_for(self, event: str, count: int = 1, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.names.count(event) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


@pytest.mark.mosquitto
def test_reconnect_delivers_what_was_queued_and_restores_subscriptions(monkeypatch):
    """The broker restarts on the same port: a QoS 1 message published while it was down is
    delivered after the reconnect, QoS 0 is refused meanwhile, and the subscription is back."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not found on PATH or in /usr/sbin")
    import tests.support.brokers as brokers

    events = _Events()
    received = threading.Event()
    first = MosquittoBroker().start()
    port = first.port
    client = make_client(first, logger=events, connect_timeout=5)
    client.connect()
    client.subscribe("re/in", lambda _t, _p: received.set())
    first.stop()
    assert events.wait_for("mqtt.connection_lost")
    assert not client.connected
    client.publish("re/out", b"while down", qos=1)
    with pytest.raises(BrokerUnavailableError, match="QoS 0"):
        client.publish("re/out", b"qos0", qos=0)
    assert client.unacked == 1
    monkeypatch.setattr(brokers, "free_port", lambda: port)
    with MosquittoBroker() as second:
        assert second.port == port
        with second.collect("re/out") as col:
            assert events.wait_for("mqtt.reconnected")
            assert client.flush(10) == 0
            # Sent before the collector subscribed or after: either way the broker acked it.
            client.publish("re/out", b"after", qos=1, wait=True)
            deadline = time.monotonic() + 10
            while b"after" not in col.payloads and time.monotonic() < deadline:
                col.wait_for(len(col.payloads) + 1, timeout=deadline - time.monotonic())
            assert b"after" in col.payloads
        client.publish("re/in", b"x", qos=1, wait=True)
        assert received.wait(10)
        assert client.disconnect() == 0
