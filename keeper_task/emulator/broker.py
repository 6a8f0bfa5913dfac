"""The emulator's MQTT broker: embedded amqtt (enforcing), mosquitto, or an external one.

**Embedded (default).** amqtt in the emulator's event loop, TLS on 127.0.0.1 with a
certificate from the emulator's CA, MQTT 3.1.1. It enforces what the agent's broker enforces:

* the client id is split on ``_``; its first segment must be a known, enabled job, otherwise
  the connection is refused (CONNACK "not authorized"); :attr:`BrokerPolicy.client_id_check`
  adds a stricter client-id rule when one is configured;
* the connecting process must be launched by the emulator (or a descendant, or explicitly
  trusted), like the agent's process trust (``require_trusted``, on by default);
* a publish outside the job's ``mqttTopics.allowedPublications`` and a subscription outside
  ``allowedSubscriptions`` are dropped with the connection kept, as the agent does (here
  the publish is still acknowledged and the subscription gets SUBACK 0x80), and, unlike the
  agent, recorded as :class:`DeniedOperation` and reported loudly.

Entries in the job's lists are MQTT topic filters, matched by :mod:`keeper_task.topics` (the
same matcher the task runtime uses): ``+``/``#`` are wildcards, a leading wildcard does not
reach ``$`` topics, a malformed entry grants nothing. The agent's rule for wildcards in job
permissions is undocumented.

Where amqtt itself decides, the emulator reports what happens instead of hiding it: a
publish to a ``$`` topic (or, from a raw client, to an invalid topic name) is a protocol
error for amqtt, which ends the connection; the publish (and any the client had already
sent on that connection) is recorded as denied. The agent's behaviour there is unknown.

The rules run in an amqtt plugin that uses amqtt's public plugin interface only
(authentication, topic filtering, packet and client events, ``BrokerContext``); see
:func:`_plugin_class` for why it forwards accepted publishes itself.

**mosquitto** (``--broker mosquitto``): spawned with a generated config (TLS listener on
127.0.0.1 with the emulator's certificate, anonymous access) and stopped by PID. It speaks
MQTT 3.1.1 and 5. It does **not** enforce client ids or topic permissions: mosquitto's ACL
patterns can substitute the whole client id but not one ``_``-separated segment of it. Every
publish is still recorded, through a subscriber on ``#`` (without the publisher's client id).

**External** (``--broker HOST:PORT``, ``mqtts://HOST:PORT`` for TLS): nothing is enforced or
started; publishes are recorded through a subscriber on ``#`` when it can connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from keeper_task.emulator.errors import EmulatorError
from keeper_task.emulator.records import BrokerMessage, DeniedOperation, Recorder
from keeper_task.emulator.tiers import ProcessRegistry
from keeper_task.topics import topic_allowed

if TYPE_CHECKING:
    from keeper_task.emulator.state import EmulatorState
    from keeper_task.jobs import Job

__all__ = [
    "Broker",
    "BrokerPolicy",
    "ClientIdCheck",
    "EmbeddedBroker",
    "ExternalBroker",
    "MosquittoBroker",
    "job_id_of_client",
    "parse_broker_spec",
    "topic_allowed",
]

# amqtt logs each refused client as a warning; keep that out of a bare terminal (lastResort)
# without touching logging configured by the application.
logging.getLogger("amqtt").addHandler(logging.NullHandler())
logging.getLogger("transitions").addHandler(logging.NullHandler())

RECORDER_CLIENT_ID = "keeper-task-emulator-recorder"

#: An extra client-id rule: ``(client_id, job_id, job_name, pid)`` -> why refused, or None.
ClientIdCheck = Callable[[str, str, str | None, int | None], str | None]


def job_id_of_client(client_id: str | None) -> str | None:
    """The job id the agent's broker reads from a client id: its first ``_`` segment."""
    if not client_id:
        return None
    return client_id.split("_", 1)[0] or None


def parse_broker_spec(spec: str) -> tuple[str, str | None, int | None, bool]:
    """Parse ``--broker``: ``embedded``, ``mosquitto``, ``HOST:PORT``, ``mqtts://HOST:PORT``.

    Returns:
        ``(kind, host, port, tls)`` with kind ``embedded``, ``mosquitto`` or ``external``.

    Raises:
        EmulatorError: Not one of those forms.
    """
    text = spec.strip()
    if text in ("embedded", "amqtt"):
        return "embedded", None, None, True
    if text == "mosquitto":
        return "mosquitto", None, None, True
    tls = False
    for prefix, is_tls in (
        ("mqtts://", True),
        ("ssl://", True),
        ("mqtt://", False),
        ("tcp://", False),
    ):
        if text.startswith(prefix):
            text, tls = text[len(prefix) :], is_tls
            break
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise EmulatorError(
            f"--broker {spec!r}: expected 'embedded', 'mosquitto', HOST:PORT or mqtts://HOST:PORT"
        )
    return "external", host, int(port_text), tls


class Broker(Protocol):
    """What the emulator needs from a broker."""

    kind: str
    host: str
    port: int
    tls: bool
    enforces: bool

    async def start(self) -> None:
        """Start (or restart) listening on ``host:port``."""

    async def stop(self) -> None:
        """Stop; connected clients are disconnected."""

    @property
    def running(self) -> bool:
        """Whether the broker is serving."""

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish from the agent's side (as the agent itself, no permission check)."""

    async def drain(self, timeout: float) -> None:
        """Wait until in-flight messages of disconnected clients are recorded."""


class BrokerPolicy:
    """The agent's broker rules, decided here and applied by the embedded broker's plugin.

    Every decision that refuses something is recorded as a :class:`DeniedOperation` (shown
    as a ``DENIED`` line by ``keeper-task dev``); every accepted publish as a
    :class:`BrokerMessage`.

    Args:
        job_lookup: Returns the job with that id, or None.
        registry: The launched-process registry (process trust).
        recorder: Where denials and messages are recorded.
        require_trusted: Refuse connections from processes the emulator did not launch.
        client_id_check: An extra client-id rule for behaviours the agent might have (its
            client-id format is not documented): ``(client_id, job_id, job_name, pid)``
            returns why the connection is refused, or None to accept. It runs after the job
            id (the first ``_`` segment) was found to name a known, enabled job.
    """

    def __init__(
        self,
        job_lookup: Callable[[str], Job | None],
        registry: ProcessRegistry,
        recorder: Recorder,
        *,
        require_trusted: bool = True,
        client_id_check: ClientIdCheck | None = None,
    ) -> None:
        self.job_lookup = job_lookup
        self.registry = registry
        self.recorder = recorder
        self.require_trusted = require_trusted
        self.local_port = 0
        #: Optional client-id rule (``client_id, job_id, job_name, pid -> why refused``), set
        #: from :class:`~keeper_task.emulator.behaviour.AgentBehaviour`.
        self.client_id_check: ClientIdCheck | None = client_id_check
        #: Accepted connections: client id -> the PID behind it (None when not looked up).
        self.connected: dict[str, int | None] = {}

    def deny(
        self, action: str, client_id: str | None, job_id: str | None, topic: str | None, why: str
    ) -> None:
        """Record a refused operation (``connect``, ``publish`` or ``subscribe``)."""
        self.recorder.add(DeniedOperation(action, client_id, job_id, topic, why))

    def authenticate(self, client_id: str | None, peer_port: int | None) -> bool:
        """Decide a CONNECT: known enabled job in the client id, trusted process."""
        job_id = job_id_of_client(client_id)
        job = self.job_lookup(job_id) if job_id else None
        if job is None:
            self.deny(
                "connect",
                client_id,
                None,
                None,
                f"the client id's first '_' segment {job_id!r} is not a known job id "
                "(the agent reads the job id from the client id, split on '_')",
            )
            return False
        if not job.enabled:
            self.deny("connect", client_id, job_id, None, f"job {job_id!r} is disabled")
            return False
        pid: int | None = None
        if self.client_id_check is not None and client_id is not None and job_id is not None:
            pid = self.registry.identify(peer_port, self.local_port)[0] if peer_port else None
            why = self.client_id_check(client_id, job_id, job.name, pid)
            if why is not None:
                self.deny("connect", client_id, job_id, None, why)
                return False
        if self.require_trusted:
            pid, trusted = (
                self.registry.identify(peer_port, self.local_port) if peer_port else (None, False)
            )
            if not trusted:
                why = (
                    f"process {pid} is launched but not registered yet (registration delay)"
                    if pid is not None
                    else "the connecting process was not launched by the agent"
                )
                self.deny("connect", client_id, job_id, None, why)
                return False
        if client_id:
            self.connected[client_id] = pid
        return True

    def refusal(self, client_id: str | None, topic: str, action: str) -> str | None:
        """Why a publish or subscribe is outside the job's ``mqttTopics`` (None: allowed).

        Pure: records nothing (see :meth:`allow` and :meth:`received`).
        """
        job_id = job_id_of_client(client_id)
        job = self.job_lookup(job_id) if job_id else None
        if job is None:
            return "the client id names no known job"
        topics = job.mqtt_topics
        if action == "publish":
            allowed = list(topics.allowed_publications) if topics else []
            field_name = "allowedPublications"
        else:
            allowed = list(topics.allowed_subscriptions) if topics else []
            field_name = "allowedSubscriptions"
        if topic_allowed(topic, allowed):
            return None
        return (
            f"{topic!r} is not in mqttTopics.{field_name} of job {job_id!r}; the agent drops "
            "it silently"
        )

    def allow(self, client_id: str | None, topic: str, action: str) -> bool:
        """Decide a publish or subscribe against the job's ``mqttTopics``; record a denial."""
        why = self.refusal(client_id, topic, action)
        if why is None:
            return True
        self.deny(action, client_id, job_id_of_client(client_id), topic, why)
        return False

    def received(
        self, client_id: str | None, topic: str, payload: bytes, qos: int, retain: bool
    ) -> bool:
        """Record a PUBLISH the broker received from a client: accepted or denied.

        Returns:
            Whether it was accepted.
        """
        if not self.allow(client_id, topic, "publish"):
            return False
        self.record(client_id, topic, payload, qos, retain)
        return True

    def record(
        self, client_id: str | None, topic: str, payload: bytes, qos: int, retain: bool
    ) -> None:
        """Record an accepted publish."""
        self.recorder.add(
            BrokerMessage(
                topic, bytes(payload), client_id, job_id_of_client(client_id), qos, retain
            )
        )


# --- embedded amqtt --------------------------------------------------------------------------

# amqtt loads plugins by dotted path; the class is built on first use (amqtt is imported only
# when an embedded broker starts) and bound to this module name.
_PLUGIN_NAME = "KeeperBrokerPlugin"
_PLUGIN_PATH = f"{__name__}.{_PLUGIN_NAME}"


class _PluginLink:
    """Hands the policy to the plugin amqtt instantiates, and the plugin back to us."""

    def __init__(self, policy: BrokerPolicy) -> None:
        self.policy = policy
        self.plugin: Any = None


def _plugin_class() -> type[Any]:
    """Build (once) the amqtt plugin that applies :class:`BrokerPolicy` through public hooks.

    * ``authenticate`` decides each CONNECT (CONNACK "not authorized" when refused);
    * ``topic_filtering`` decides each SUBSCRIBE (SUBACK 0x80 when refused);
    * ``on_mqtt_packet_received`` takes each PUBLISH as amqtt reads it (QoS 2: at its
      PUBREL), decides it, records it (accepted or denied) and forwards an accepted one
      through the documented ``BrokerContext.broadcast_message``/``retain_message``; amqtt's
      own PUBLISH filter is answered False so nothing is forwarded twice. A denied publish
      is dropped silently: the client got its PUBACK and keeps its connection.

    Why the plugin forwards publishes itself: amqtt 0.12 acknowledges a QoS 1/2 publish as
    soon as it queues it, and when the client disconnects its delivery loop stops and drops
    what is still queued (measured: 70-120 of a 300-message QoS 1 burst never reached a
    subscriber, nor amqtt's own message events). The agent's broker delivers them; taking
    each publish as it is read makes recording and forwarding independent of that loop.
    amqtt logs each publish at INFO as "not allowed to publish" as a consequence.
    """
    cls = globals().get(_PLUGIN_NAME)
    if cls is not None:
        return cls  # type: ignore[no-any-return]

    from dataclasses import dataclass

    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    class KeeperBrokerPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
        """Applies the emulator's :class:`BrokerPolicy` (see :func:`_plugin_class`)."""

        @dataclass
        class Config:
            link: Any = None

        def __init__(self, context: Any) -> None:
            super().__init__(context)
            link = self.config.link
            if not isinstance(link, _PluginLink):
                raise TypeError("KeeperBrokerPlugin needs its 'link' configuration")
            link.plugin = self
            self.policy = link.policy
            self.hooks = _PolicyHooks(link.policy, self.context)
            # Set at each client disconnect (EmbeddedBroker.drain waits on it).
            self.disconnects = asyncio.Event()

        async def authenticate(self, *, session: Any) -> bool | None:
            return self.policy.authenticate(session.client_id, session.remote_port)

        async def topic_filtering(
            self, *, session: Any = None, topic: str | None = None, action: Any = None
        ) -> bool | None:
            return self.hooks.topic_allowed(session, topic, action)

        async def on_mqtt_packet_received(self, *, packet: Any, session: Any = None) -> None:
            await self.hooks.packet_received(packet, session)

        async def on_broker_client_connected(self, *, client_id: str, **_kw: Any) -> None:
            self.hooks.client_connected(client_id)

        async def on_broker_client_disconnected(self, *, client_id: str, **_kw: Any) -> None:
            self.hooks.client_disconnected(client_id)
            self.disconnects.set()

    KeeperBrokerPlugin.__module__ = __name__
    KeeperBrokerPlugin.__qualname__ = _PLUGIN_NAME
    globals()[_PLUGIN_NAME] = KeeperBrokerPlugin
    return KeeperBrokerPlugin


class _PolicyHooks:
    """What the broker plugin does with each amqtt event (see :func:`_plugin_class`).

    Kept out of the plugin class because that class is built only when amqtt is imported and
    must subclass amqtt's plugin bases alone; amqtt names are imported where they are used.
    """

    def __init__(self, policy: BrokerPolicy, context: Any) -> None:
        self.policy = policy
        # amqtt's BrokerContext: forwards accepted publishes (broadcast_message/retain_message).
        self.context = context
        # QoS 2 publishes wait for their PUBREL: (client id, packet id) -> PUBLISH.
        self.pending: dict[tuple[str, int], Any] = {}
        # Connections amqtt ends after a publish it treats as a protocol error; packets
        # already read from them are not served (cleared when the client reconnects).
        self.stopped: dict[str, str] = {}

    def topic_allowed(self, session: Any, topic: str | None, action: Any) -> bool:
        """amqtt's topic filter: SUBSCRIBE by the policy; PUBLISH never (forwarded here)."""
        from amqtt.contexts import Action

        if action == Action.RECEIVE:
            return True  # delivery to a subscriber: its SUBSCRIBE was checked
        if session is None or topic is None:
            return False
        if action == Action.PUBLISH:
            # Already decided, recorded and forwarded by packet_received: amqtt must not
            # forward it a second time.
            return False
        return self.policy.allow(session.client_id, topic, "subscribe")

    async def packet_received(self, packet: Any, session: Any) -> None:
        """Take a PUBLISH as amqtt reads it (QoS 2: at its PUBREL)."""
        from amqtt.mqtt.publish import PublishPacket
        from amqtt.mqtt.pubrel import PubrelPacket

        client_id = getattr(session, "client_id", None)
        if client_id is None:
            return  # CONNECT, before the session exists
        if isinstance(packet, PublishPacket):
            if packet.qos == 2:
                self.pending[(client_id, packet.packet_id)] = packet
            elif not (packet.qos == 0 and packet.dup_flag):  # amqtt ignores those
                await self.arrived(client_id, packet)
        elif isinstance(packet, PubrelPacket):
            publish = self.pending.pop((client_id, packet.packet_id), None)
            if publish is not None:
                await self.arrived(client_id, publish)

    def client_connected(self, client_id: str) -> None:
        """A (re)connected client starts on a fresh connection."""
        self.stopped.pop(client_id, None)

    def client_disconnected(self, client_id: str) -> None:
        """Forget the client's unreleased QoS 2 publishes and its connection."""
        for key in [k for k in self.pending if k[0] == client_id]:
            del self.pending[key]
        self.policy.connected.pop(client_id, None)

    async def arrived(self, client_id: str, packet: Any) -> None:
        """Decide, record and (when accepted) forward one PUBLISH."""
        topic = packet.topic_name or ""
        job_id = job_id_of_client(client_id)
        if client_id in self.stopped:
            self.policy.deny(
                "publish",
                client_id,
                job_id,
                topic,
                "sent on a connection the broker was closing since "
                f"{self.stopped[client_id]} (the client must reconnect)",
            )
            return
        problem = _protocol_problem(topic)
        if problem is not None:
            self.stopped[client_id] = f"its publish to {topic!r}"
            self.policy.deny("publish", client_id, job_id, topic, problem)
            return
        data = bytes(packet.data or b"")
        qos, retain = int(packet.qos or 0), bool(packet.retain_flag)
        if not self.policy.received(client_id, topic, data, qos, retain):
            return
        # As amqtt would: to each subscriber at its subscription's QoS, then retained.
        await self.context.broadcast_message(topic, data)
        if retain:
            await self.context.retain_message(topic, data, qos)


def _protocol_problem(topic: str) -> str | None:
    """Why amqtt treats a PUBLISH to ``topic`` as a protocol error (None: it does not)."""
    # amqtt's own checks (MQTT 4.7.3-1, 3.3.2-2, 4.7.2-1), mirrored: they run before any
    # plugin is asked and end amqtt's handling of the connection.
    if not topic or "+" in topic or "#" in topic:
        return (
            f"{topic!r} is not a valid topic name (empty, or with '+'/'#'); the broker closes "
            "the connection"
        )
    if topic.startswith("$"):
        return (
            "topics starting with '$' are reserved for the broker (MQTT 4.7.2); the broker "
            "closes the connection"
        )
    return None


class EmbeddedBroker:
    """amqtt on 127.0.0.1 with TLS, enforcing the agent's rules (see the module docstring).

    The emulator listens itself (asyncio TLS server) and hands each connection to amqtt
    through its documented embedding API (an ``external`` listener and
    ``Broker.external_connected``). Owning the sockets gives the bound port without asking
    amqtt, and a stop that cannot hang: every client connection is closed first (amqtt sees
    the end of stream), then amqtt shuts down. Stopping amqtt with clients still attached
    can wait until they disconnect by themselves: it cancels each client's reader, and on
    Python before 3.12 ``asyncio.wait_for`` swallows a cancellation that arrives while a
    packet is being read.
    """

    kind = "embedded"
    enforces = True

    def __init__(self, state: EmulatorState, policy: BrokerPolicy, *, port: int = 0) -> None:
        self.state = state
        self.policy = policy
        self.host = "127.0.0.1"
        self.port = port
        self.tls = True
        self._broker: Any = None
        self._link: _PluginLink | None = None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        from amqtt.broker import Broker as AmqttBroker

        certfile, keyfile = self.state.broker_cert_files()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile)
        _plugin_class()
        link = _PluginLink(self.policy)
        config = {
            # No socket of amqtt's own: connections come through external_connected().
            "listeners": {"default": {"type": "external"}},
            "timeout_disconnect_delay": 2,
            # Only this plugin: no anonymous access, no $SYS publisher, no packet logger.
            "plugins": {_PLUGIN_PATH: {"link": link}},
        }
        try:
            broker = AmqttBroker(config, plugin_namespace=__name__)
            await broker.start()
        except Exception as exc:  # amqtt wraps start failures in BrokerError/PluginError
            raise EmulatorError(f"embedded MQTT broker cannot start: {_root(exc)}") from exc
        if link.plugin is None:  # amqtt did not load it: nothing would be enforced
            await broker.shutdown()
            raise EmulatorError("embedded MQTT broker: amqtt did not load the emulator's plugin")
        try:
            server = await asyncio.start_server(
                self._serve_with(broker), self.host, self.port, ssl=ctx
            )
        except OSError as exc:
            await broker.shutdown()
            raise EmulatorError(
                f"embedded MQTT broker cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        # A restart reuses the port: clients reconnect to the address they were given.
        self.port = int(server.sockets[0].getsockname()[1])
        self.policy.local_port = self.port
        self._broker, self._link, self._server = broker, link, server

    def _serve_with(self, broker: Any) -> Callable[..., Any]:
        from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections[task] = writer
            try:
                await broker.external_connected(
                    StreamReaderAdapter(reader), StreamWriterAdapter(writer), "default"
                )
            except OSError:
                pass  # a connection error ends this client; the socket is closed below
            finally:
                self._connections.pop(task, None)
                writer.close()

        return serve

    async def stop(self) -> None:
        broker, server = self._broker, self._server
        self._broker, self._link, self._server = None, None, None
        if server is not None:
            server.close()
        # Close every client connection first, then wait (bounded) for amqtt to see each end
        # of stream, so that its shutdown has no reader left to cancel (see class docstring).
        connections = dict(self._connections)
        for writer in connections.values():
            writer.close()
        if connections:
            await asyncio.wait(connections, timeout=5.0)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()
        self.policy.connected.clear()  # every connection is gone, whatever amqtt reported

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        link = self._link
        if self._broker is None or link is None:
            raise EmulatorError("the embedded broker is stopped")
        self.policy.record(None, topic, payload, qos, False)
        await link.plugin.context.broadcast_message(topic, payload, qos)

    async def drain(self, timeout: float) -> None:
        """Wait until what exited clients sent is read and recorded (at most ``timeout`` s).

        Each PUBLISH is recorded by a plugin event amqtt schedules when it reads the packet,
        before it sends the PUBACK: waiting for amqtt's scheduled plugin events covers all a
        client saw acknowledged. A client whose process has exited may still have unread
        packets (QoS 0 needs no acknowledgement) until amqtt reads its end of stream, so
        connections of exited processes are waited for too.
        """
        broker, link = self._broker, self._link
        if broker is None or link is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            link.plugin.disconnects.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    broker.plugins_manager.wait_fired_events(),
                    timeout=max(0.0, deadline - loop.time()),
                )
            exited = [
                cid
                for cid, pid in list(self.policy.connected.items())
                if pid is not None and not _alive(pid)
            ]
            remaining = deadline - loop.time()
            if not exited or remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.plugin.disconnects.wait(), timeout=remaining)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


# --- subscriber used to record publishes on brokers that do not tell us -----------------


class _RecordingSubscriber:
    """A paho client subscribed to ``#`` that records every message it sees."""

    def __init__(
        self, host: str, port: int, tls_context: ssl.SSLContext | None, policy: BrokerPolicy
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._ready = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=RECORDER_CLIENT_ID, clean_session=True
        )
        if tls_context is not None:
            self._client.tls_set_context(tls_context)

        def on_connect(client: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            if not rc.is_failure:
                client.subscribe("#", qos=1)

        def on_subscribe(*_a: Any) -> None:
            self._ready.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            policy.record(None, msg.topic, msg.payload, msg.qos, bool(msg.retain))

        self._client.on_connect = on_connect
        self._client.on_subscribe = on_subscribe
        self._client.on_message = on_message
        self.host, self.port = host, port

    def start(self, timeout: float = 5.0) -> bool:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError:
            return False
        self._client.loop_start()
        return self._ready.wait(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


class MosquittoBroker:
    """mosquitto spawned with a generated TLS config; stopped by PID (see module docstring)."""

    kind = "mosquitto"
    enforces = False

    def __init__(self, state: EmulatorState, policy: BrokerPolicy, *, port: int = 0) -> None:
        self.state = state
        self.policy = policy
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.tls = True
        self.binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        self._proc: asyncio.subprocess.Process | None = None
        self._recorder: _RecordingSubscriber | None = None
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        if self.running:
            return
        if self.binary is None:
            raise EmulatorError(
                "--broker mosquitto: mosquitto is not installed (apt-get install mosquitto); "
                "use the embedded broker instead"
            )
        certfile, keyfile = self.state.broker_cert_files()
        conf = self.state.root / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    "# generated by keeper-task dev: TLS on loopback, anonymous",
                    "per_listener_settings false",
                    "allow_anonymous true",
                    "persistence false",
                    # Started as root, mosquitto drops to user "mosquitto", which cannot read
                    # the (private) state directory: stay the user we are.
                    f"user {_user_name()}",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    # Without it a small CONNACK/PUBACK waits ~40 ms for a delayed ACK.
                    "set_tcp_nodelay true",
                    f"listener {self.port} 127.0.0.1",
                    f"cafile {self.state.ca_bundle}",
                    f"certfile {certfile}",
                    f"keyfile {keyfile}",
                    "require_certificate false",
                    "",
                ]
            )
        )
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "-c",
            str(conf),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._proc = proc
        lines: list[str] = []
        stderr = proc.stderr
        assert stderr is not None

        async def read_banner() -> None:
            while True:
                raw = await stderr.readline()
                if not raw:
                    return
                line = raw.decode(errors="replace").strip()
                lines.append(line)
                if "mosquitto version" in line and " running" in line:
                    return

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(read_banner(), timeout=10)
        if proc.returncode is not None or not lines or "running" not in lines[-1]:
            await self.stop()
            detail = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "")
            raise EmulatorError(
                f"mosquitto did not start on 127.0.0.1:{self.port}: {detail or 'no output'}"
            )
        # Keep reading stderr so mosquitto never blocks on a full pipe.
        self._drain_task = asyncio.get_running_loop().create_task(_discard(stderr))
        ctx = ssl.create_default_context(cafile=str(self.state.ca_bundle))
        ctx.check_hostname = False
        recorder = _RecordingSubscriber(self.host, self.port, ctx, self.policy)
        if await asyncio.to_thread(recorder.start):
            self._recorder = recorder
        else:
            recorder.stop()

    async def stop(self) -> None:
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            await asyncio.to_thread(recorder.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        await asyncio.to_thread(
            _publish_once, self.host, self.port, self._tls_ctx(), topic, payload, qos
        )

    def _tls_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.state.ca_bundle))
        ctx.check_hostname = False
        return ctx

    async def drain(self, timeout: float) -> None:
        return None


class ExternalBroker:
    """A broker the emulator neither starts nor controls (see the module docstring)."""

    kind = "external"
    enforces = False

    def __init__(self, host: str, port: int, *, tls: bool, policy: BrokerPolicy) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.policy = policy
        self._recorder: _RecordingSubscriber | None = None
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def _tls_ctx(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        from keeper_task.tls import client_ssl_context

        return client_ssl_context(host=self.host)

    async def start(self) -> None:
        self._running = True
        recorder = _RecordingSubscriber(self.host, self.port, self._tls_ctx(), self.policy)
        if await asyncio.to_thread(recorder.start):
            self._recorder = recorder
        else:
            recorder.stop()

    async def stop(self) -> None:
        self._running = False
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            await asyncio.to_thread(recorder.stop)

    @property
    def recording(self) -> bool:
        """Whether publishes are being recorded (the recorder could connect)."""
        return self._recorder is not None

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        await asyncio.to_thread(
            _publish_once, self.host, self.port, self._tls_ctx(), topic, payload, qos
        )

    async def drain(self, timeout: float) -> None:
        return None


def _publish_once(  # noqa: PLR0917 - called through asyncio.to_thread(*args)
    host: str, port: int, ctx: ssl.SSLContext | None, topic: str, payload: bytes, qos: int
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="keeper-task-emulator-agent")
    if ctx is not None:
        client.tls_set_context(ctx)
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=5)
    except (OSError, RuntimeError, ValueError) as exc:
        raise EmulatorError(f"cannot publish to {host}:{port}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


async def _discard(stream: asyncio.StreamReader) -> None:
    with contextlib.suppress(Exception):
        while await stream.readline():
            pass


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "mosquitto"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _root(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
