"""The emulator's MQTT broker over real TLS sockets: client ids, topic permissions, recording."""

from __future__ import annotations

import json
import shutil
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from keeper_task.emulator import Emulator, parse_broker_spec, topic_allowed
from keeper_task.emulator.errors import EmulatorError
from tests.support.emulator import MQTT_PROBE, PYTHON, job_data, write_script


def _mqtt_job(job_id: str, client_id: str, pubs: list[str], subs: list[str]) -> dict:
    data = job_data(
        job_id,
        mqttTopics={
            "allowedPublications": ["KeeperLogger", "Custom/+/status"],
            "allowedSubscriptions": ["Commands/#"],
        },
    )
    args = f"127.0.0.1 {{port}} {client_id} '{json.dumps(pubs)}' '{json.dumps(subs)}'"
    data["tasks"][0]["arguments"] = args
    return data


def _run_probe(agent: Emulator, tmp_path: Path, job_id: str, client_id: str, pubs, subs):
    probe = write_script(tmp_path, "mqtt_probe.py", MQTT_PROBE)
    data = _mqtt_job(job_id, client_id, pubs, subs)
    data["tasks"][0]["arguments"] = data["tasks"][0]["arguments"].replace(
        "{port}", str(agent.broker.port)
    )
    agent.add_job(data)
    run = agent.run_job(job_id, command=[PYTHON, str(probe)], wait=60)
    assert run.exit_code == 0, run.tasks[0].stderr
    return run.tasks[0].stdout_lines


def test_allowed_publishes_are_recorded_and_others_denied(tmp_path: Path) -> None:
    """Undeclared publishes are dropped and reported; the connection stays up for the rest."""
    with Emulator() as agent:
        lines = _run_probe(
            agent,
            tmp_path,
            "pub-job",
            "pub-job_Pub-job",
            ["Secret/topic", "KeeperLogger", "Custom/a/status"],
            [],
        )
        topics = [m.topic for m in agent.messages]
        denied = agent.denied
    assert lines == ["connect 0"]
    assert topics == ["KeeperLogger", "Custom/a/status"]
    assert agent.messages[0].client_id == "pub-job_Pub-job"
    assert agent.messages[0].job_id == "pub-job"
    assert [(d.action, d.topic, d.job_id) for d in denied] == [
        ("publish", "Secret/topic", "pub-job")
    ]
    assert "allowedPublications" in denied[0].reason


def test_subscriptions_outside_allowed_list_are_refused(tmp_path: Path) -> None:
    """An undeclared subscription gets 0x80 and is recorded; a declared one is granted."""
    with Emulator() as agent:
        lines = _run_probe(agent, tmp_path, "sub-job", "sub-job_x", [], ["Commands/run", "Other/#"])
        denied = agent.denied
    assert lines == ["connect 0", "sub Commands/run [1]", "sub Other/# [128]"]
    assert [(d.action, d.topic) for d in denied] == [("subscribe", "Other/#")]


def test_client_id_must_name_a_known_job(tmp_path: Path) -> None:
    """The first '_' segment of the client id must be a known job, else CONNACK refuses."""
    with Emulator() as agent:
        lines = _run_probe(agent, tmp_path, "real-job", "ghost-job_Real", ["KeeperLogger"], [])
        denied = agent.denied
        messages = agent.messages
    assert lines == ["connect 135"]  # paho v2: MQTT 3.1.1 code 5 = "Not authorized"
    assert messages == []
    assert denied[0].action == "connect" and "'ghost-job'" in denied[0].reason


def test_process_not_launched_by_the_agent_is_refused() -> None:
    """The test process itself is not trusted, so the broker refuses its connection."""
    with Emulator() as agent:
        agent.add_job(job_data("known-job"))
        done = threading.Event()
        result: dict[str, int] = {}

        def on_connect(client, userdata, flags, rc, props=None):
            result["rc"] = rc.value
            done.set()

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="known-job_Test")
        ctx = ssl.create_default_context(cafile=str(agent.ca_bundle))
        client.tls_set_context(ctx)
        client.on_connect = on_connect
        client.connect("127.0.0.1", agent.broker.port)
        client.loop_start()
        try:
            assert done.wait(10)
        finally:
            client.disconnect()
            client.loop_stop()
        assert result["rc"] == 135  # "Not authorized"
        assert "not launched" in agent.denied[-1].reason


def test_agent_side_publish_and_broker_down() -> None:
    """publish() injects a message as the agent; stop_broker() closes the port, start reopens it."""
    with Emulator() as agent:
        agent.publish("Jobs/x/events", {"k": 1})
        assert agent.messages[-1].json() == {"k": 1}
        port = agent.broker.port
        agent.stop_broker()
        assert not agent.broker.running
        with pytest.raises(EmulatorError):
            agent.publish("x", b"1")
        agent.start_broker()
        assert agent.broker.running and agent.broker.port == port


# Publish a QoS 1 burst without waiting in between, QoS 2 messages and a QoS 0 burst, wait
# until paho has sent them all, then disconnect and exit at once: the publishes still
# queued inside the broker at that moment must be recorded too.
BURST_PROBE = r"""
import ssl, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, n0 = int(sys.argv[4]), int(sys.argv[5])
connected = threading.Event()
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
c.tls_set_context(ctx)
c.on_connect = lambda *a: connected.set()
c.connect(host, port); c.loop_start()
assert connected.wait(10)
infos = [c.publish("KeeperLogger", f"q1-{i}", qos=1) for i in range(n)]
infos += [c.publish("Custom/q2/status", f"q2-{i}", qos=2) for i in range(10)]
infos += [c.publish("Custom/q0/status", f"q0-{i}", qos=0) for i in range(n0)]  # no acks
for info in infos:
    info.wait_for_publish(30)
c.disconnect(); c.loop_stop()
print("sent", flush=True)
"""


@pytest.mark.parametrize("round_", range(2))
def test_a_burst_sent_just_before_exit_is_recorded_completely(tmp_path: Path, round_: int) -> None:
    """Every publish of a task that exits right after its burst is recorded, in order, once:
    QoS 1 (acknowledged while still queued in the broker), QoS 0 and QoS 2."""
    n, n0 = 300, 1000
    with Emulator() as agent:
        probe = write_script(tmp_path, "burst.py", BURST_PROBE)
        data = job_data(
            "burst-job",
            mqttTopics={
                "allowedPublications": ["KeeperLogger", "Custom/+/status"],
                "allowedSubscriptions": [],
            },
        )
        data["tasks"][0]["arguments"] = f"127.0.0.1 {agent.broker.port} burst-job_Burst {n} {n0}"
        agent.add_job(data)
        run = agent.run_job("burst-job", command=[PYTHON, str(probe)], wait=120)
        assert run.exit_code == 0, run.tasks[0].stderr
        by_topic: dict[str, list[bytes]] = {}
        for m in agent.messages:
            by_topic.setdefault(m.topic, []).append(m.payload)
        qos = {m.topic: m.qos for m in agent.messages}
    assert run.tasks[0].stdout_lines == ["sent"]
    assert by_topic["KeeperLogger"] == [f"q1-{i}".encode() for i in range(n)]
    assert by_topic["Custom/q0/status"] == [f"q0-{i}".encode() for i in range(n0)]
    assert by_topic["Custom/q2/status"] == [f"q2-{i}".encode() for i in range(10)]
    assert qos == {"KeeperLogger": 1, "Custom/q0/status": 0, "Custom/q2/status": 2}
    assert agent.denied == []


def _client(agent: Emulator, client_id: str) -> mqtt.Client:
    """An in-process paho client, connected (the emulator must not require trust)."""
    connected = threading.Event()
    rc: list[int] = []

    def on_connect(_c, _u, _f, reason, _p=None):
        rc.append(reason.value)
        connected.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set_context(ssl.create_default_context(cafile=str(agent.ca_bundle)))
    client.on_connect = on_connect
    client.connect("127.0.0.1", agent.broker.port)
    client.loop_start()
    assert connected.wait(10)
    client.user_data_set(rc[0])
    return client


def _subscribe(client: mqtt.Client, topic_filter: str) -> int:
    done = threading.Event()
    granted: list[int] = []

    def on_subscribe(_c, _u, _mid, codes, _p=None):
        granted.extend(code.value for code in codes)
        done.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic_filter, qos=1)
    assert done.wait(10)
    return granted[0]


@pytest.mark.parametrize("qos", [1, 2])
def test_a_burst_reaches_subscribers_although_its_publisher_disconnects_at_once(qos: int) -> None:
    """What a task publishes just before it disconnects reaches other subscribers, in order
    (amqtt's own delivery loop drops a client's queued publishes at DISCONNECT)."""
    n = 300
    with Emulator(require_trusted_mqtt=False) as agent:
        agent.add_job(
            job_data(
                "fan-job",
                mqttTopics={
                    "allowedPublications": ["Custom/fan"],
                    "allowedSubscriptions": ["Custom/fan"],
                },
            )
        )
        received: list[bytes] = []
        cond = threading.Condition()

        def on_message(_c, _u, msg):
            with cond:
                received.append(msg.payload)
                cond.notify_all()

        sub = _client(agent, "fan-job_Sub")
        sub.on_message = on_message
        try:
            assert _subscribe(sub, "Custom/fan") == 1
            pub = _client(agent, "fan-job_Pub")
            infos = [pub.publish("Custom/fan", f"m{i}", qos=qos) for i in range(n)]
            for info in infos:
                info.wait_for_publish(30)
            pub.disconnect()
            pub.loop_stop()
            with cond:
                cond.wait_for(lambda: len(received) >= n, timeout=30)
                got = list(received)
        finally:
            sub.disconnect()
            sub.loop_stop()
        recorded = [m.payload for m in agent.messages]
    assert got == [f"m{i}".encode() for i in range(n)]
    assert recorded == got


def test_subscription_permissions_use_the_shared_matcher() -> None:
    """A leading wildcard entry does not reach '$' topics, an explicit '$' entry does, and a
    malformed entry grants nothing."""
    entries = ["+/run", "$SYS/broker/+", "x/#/y"]
    with Emulator(require_trusted_mqtt=False) as agent:
        agent.add_job(
            job_data(
                "sub-job", mqttTopics={"allowedPublications": [], "allowedSubscriptions": entries}
            )
        )
        client = _client(agent, "sub-job_Sub")
        try:
            wanted = ["Commands/run", "$SYS/run", "$SYS/broker/uptime", "x/a/y"]
            granted = {f: _subscribe(client, f) for f in wanted}
        finally:
            client.disconnect()
            client.loop_stop()
        denied = [(d.action, d.topic) for d in agent.denied]
    assert granted == {"Commands/run": 1, "$SYS/run": 128, "$SYS/broker/uptime": 1, "x/a/y": 128}
    assert denied == [("subscribe", "$SYS/run"), ("subscribe", "x/a/y")]


def test_publish_to_a_dollar_topic_is_denied_and_closes_the_connection() -> None:
    """amqtt treats a publish to a '$' topic as a protocol error and ends the connection;
    the emulator reports it as DENIED, and the client's next connection is served again."""
    with Emulator(require_trusted_mqtt=False) as agent:
        agent.add_job(
            job_data("dollar-job", mqttTopics={"allowedPublications": ["KeeperLogger", "$x/y"]})
        )
        client = _client(agent, "dollar-job_D")
        dropped, reconnected = threading.Event(), threading.Event()
        client.on_disconnect = lambda *_a: dropped.set()
        client.on_connect = lambda *_a: reconnected.set()
        try:
            client.publish("KeeperLogger", b"before", qos=1).wait_for_publish(10)
            client.publish("$x/y", b"d", qos=1)
            assert dropped.wait(10)
            assert reconnected.wait(30)  # paho reconnects by itself
            client.publish("KeeperLogger", b"after", qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        messages = [(m.topic, m.payload) for m in agent.messages]
        denied = agent.denied
    assert messages == [("KeeperLogger", b"before"), ("KeeperLogger", b"after")]
    assert [(d.action, d.topic) for d in denied] == [("publish", "$x/y")]
    assert "reserved for the broker" in denied[0].reason


def test_client_id_check_refuses_with_its_reason() -> None:
    """BrokerPolicy.client_id_check: a stricter client-id format, its refusal reported."""
    with Emulator(require_trusted_mqtt=False) as agent:
        agent.add_job(job_data("fmt-job"))
        seen: list[tuple[str, str, str | None]] = []

        def exact_format(client_id: str, job_id: str, job_name: str | None, _pid: int | None):
            seen.append((client_id, job_id, job_name))
            return None if client_id == f"{job_id}_{job_name}" else "expected '{job_id}_{name}'"

        agent.broker.policy.client_id_check = exact_format
        good = _client(agent, "fmt-job_Probe job")
        bad = _client(agent, "fmt-job_12345")
        for client in (good, bad):
            client.disconnect()
            client.loop_stop()
        denied = agent.denied
    assert (good.user_data_get(), bad.user_data_get()) == (0, 135)  # 135: "Not authorized"
    assert seen == [
        ("fmt-job_Probe job", "fmt-job", "Probe job"),
        ("fmt-job_12345", "fmt-job", "Probe job"),
    ]
    assert [(d.action, d.client_id, d.reason) for d in denied] == [
        ("connect", "fmt-job_12345", "expected '{job_id}_{name}'")
    ]


def test_embedded_broker_port_in_use_is_one_clear_error() -> None:
    """A fixed broker port that is taken fails the start with the address in the message."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(EmulatorError, match=f"cannot listen on 127.0.0.1:{port}"):
            Emulator(broker_port=port).__enter__()


def test_the_emulator_reaches_amqtt_only_through_public_names() -> None:
    """No underscore attribute of another object is read, no amqtt class but the plugin bases
    is subclassed, and no private amqtt method is overridden (so an amqtt release cannot
    silently change what the emulator relies on)."""
    import ast

    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    from keeper_task.emulator import broker

    tree = ast.parse(Path(broker.__file__).read_text())
    private = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []
    plugin = broker._plugin_class()
    assert [b.__name__ for b in plugin.__bases__] == ["BaseAuthPlugin", "BaseTopicPlugin"]
    overridden = [
        name
        for name in vars(plugin)
        if name.startswith("_")
        and not name.startswith("__")
        and (hasattr(BaseAuthPlugin, name) or hasattr(BaseTopicPlugin, name))
    ]
    assert overridden == []
    subclasses = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(
            "Amqtt" in ast.unparse(base) or ast.unparse(base) == "Broker" for base in node.bases
        )
    ]
    assert subclasses == []


def test_topic_matching_and_broker_spec() -> None:
    """Permission entries match exactly or as MQTT filters; --broker forms parse."""
    assert topic_allowed("KeeperLogger", ["KeeperLogger"])
    assert topic_allowed("Jobs/a/events", ["Jobs/+/events"])
    assert topic_allowed("Jobs/a/b/c", ["Jobs/#"])
    assert not topic_allowed("Jobs/+/events", ["Jobs/a/events"])
    assert not topic_allowed("KeeperLoggerX", ["KeeperLogger"])
    assert parse_broker_spec("embedded")[0] == "embedded"
    assert parse_broker_spec("127.0.0.1:1883") == ("external", "127.0.0.1", 1883, False)
    assert parse_broker_spec("mqtts://localhost:8675") == ("external", "localhost", 8675, True)
    with pytest.raises(EmulatorError):
        parse_broker_spec("nowhere")


@pytest.mark.mosquitto
@pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
    reason="mosquitto is not installed",
)
def test_mosquitto_broker_records_but_does_not_enforce(tmp_path: Path) -> None:
    """--broker mosquitto: TLS listener works, publishes are recorded, nothing is enforced
    (and a notice says so)."""
    with Emulator(broker="mosquitto") as agent:
        assert agent.broker.kind == "mosquitto" and not agent.broker.enforces
        lines = _run_probe(
            agent, tmp_path, "mq-job", "ghost_x", ["KeeperLogger", "Secret/topic"], []
        )
        assert agent.wait_for(lambda: len(agent.messages) >= 2, timeout=10)
        topics = sorted(m.topic for m in agent.messages)
        pid = agent.broker._proc.pid
    assert lines == ["connect 0"]
    assert topics == ["KeeperLogger", "Secret/topic"]
    assert agent.denied == []
    assert any("NOT enforced" in n.text for n in agent.notices)  # said loudly, up front
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
