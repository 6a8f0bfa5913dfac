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
from keeper_task.errors import EmulatorError
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
