"""The emulator's MQTT broker: embedded amqtt (enforcing), mosquitto, or an external one.

**Embedded (default).** amqtt in the emulator's event loop, TLS on 127.0.0.1 with a
certificate from the emulator's CA, MQTT 3.1.1. It enforces what the agent's broker enforces:

* the client id is split on ``_``; its first segment must be a known, enabled job, otherwise
  the connection is refused (CONNACK "not authorized");
* the connecting process must be launched by the emulator (or a descendant, or explicitly
  trusted), like the agent's process trust (``require_trusted``, on by default);
* a publish outside the job's ``mqttTopics.allowedPublications`` and a subscription outside
  ``allowedSubscriptions`` are dropped with the connection kept, as the agent does, and,
  unlike the agent, recorded as :class:`DeniedOperation` and reported loudly.

Entries with ``+``/``#`` in the job's lists are matched as MQTT filters (the agent's rule for
wildcards in job permissions is undocumented).

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

from keeper_task.emulator.records import BrokerMessage, DeniedOperation, Recorder
from keeper_task.emulator.tiers import ProcessRegistry
from keeper_task.errors import EmulatorError
from keeper_task.topics import topic_allowed

if TYPE_CHECKING:
    from keeper_task.emulator.state import EmulatorState
    from keeper_task.jobs import Job

__all__ = [
    "Broker",
    "BrokerPolicy",
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
    """The agent's broker rules, shared by the embedded broker's plugin.

    Args:
        job_lookup: Returns the job with that id, or None.
        registry: The launched-process registry (process trust).
        recorder: Where denials and messages are recorded.
        require_trusted: Refuse connections from processes the emulator did not launch.
    """

    def __init__(
        self,
        job_lookup: Callable[[str], Job | None],
        registry: ProcessRegistry,
        recorder: Recorder,
        *,
        require_trusted: bool = True,
    ) -> None:
        self.job_lookup = job_lookup
        self.registry = registry
        self.recorder = recorder
        self.require_trusted = require_trusted
        self.local_port = 0

    def _deny(
        self, action: str, client_id: str | None, job_id: str | None, topic: str | None, why: str
    ) -> None:
        self.recorder.add(DeniedOperation(action, client_id, job_id, topic, why))

    def authenticate(self, client_id: str | None, peer_port: int | None) -> bool:
        """Decide a CONNECT: known enabled job in the client id, trusted process."""
        job_id = job_id_of_client(client_id)
        job = self.job_lookup(job_id) if job_id else None
        if job is None:
            self._deny(
                "connect",
                client_id,
                None,
                None,
                f"the client id's first '_' segment {job_id!r} is not a known job id "
                "(the agent reads the job id from the client id, split on '_')",
            )
            return False
        if not job.enabled:
            self._deny("connect", client_id, job_id, None, f"job {job_id!r} is disabled")
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
                self._deny("connect", client_id, job_id, None, why)
                return False
        return True

    def allow(self, client_id: str | None, topic: str, action: str) -> bool:
        """Decide a publish or subscribe against the job's ``mqttTopics``."""
        job_id = job_id_of_client(client_id)
        job = self.job_lookup(job_id) if job_id else None
        if job is None:
            self._deny(action, client_id, job_id, topic, "the client id names no known job")
            return False
        topics = job.mqtt_topics
        if action == "publish":
            allowed = list(topics.allowed_publications) if topics else []
            field_name = "allowedPublications"
        else:
            allowed = list(topics.allowed_subscriptions) if topics else []
            field_name = "allowedSubscriptions"
        if topic_allowed(topic, allowed):
            return True
        self._deny(
            action,
            client_id,
            job_id,
            topic,
            f"{topic!r} is not in mqttTopics.{field_name} of job {job_id!r}; the agent drops "
            "it silently",
        )
        return False

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


def _plugin_class() -> type[Any]:
    """Build the amqtt plugin class lazily (amqtt is imported only when a broker starts)."""
    from amqtt.contexts import Action
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    class KeeperBrokerPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
        """Hooks amqtt's authentication and topic checks to :class:`BrokerPolicy`."""

        policy: BrokerPolicy | None = None

        async def authenticate(self, *, session: Any) -> bool | None:
            if self.policy is None:
                return False
            return self.policy.authenticate(session.client_id, session.remote_port)

        async def topic_filtering(
            self, *, session: Any = None, topic: str | None = None, action: Any = None
        ) -> bool | None:
            if self.policy is None or topic is None:
                return False
            if action == Action.RECEIVE or session is None:
                return True
            kind = "publish" if action == Action.PUBLISH else "subscribe"
            return self.policy.allow(session.client_id, topic, kind)

        async def on_broker_message_broadcast(self, *, client_id: str, message: Any) -> None:
            if self.policy is None:
                return
            packet = getattr(message, "publish_packet", None)
            retain = bool(packet is not None and packet.retain_flag)
            self.policy.record(
                client_id, message.topic, message.data or b"", message.qos or 0, retain
            )

    return KeeperBrokerPlugin


_PLUGIN_PATH = "keeper_task.emulator.broker.KeeperBrokerPlugin"


def _broker_class() -> type[Any]:
    """amqtt's Broker, fixed so a client's last messages are not lost at disconnect.

    amqtt 0.12 acknowledges a QoS 1 publish when it queues it, but its client loop stops at
    DISCONNECT and drops what is still queued: a task that publishes a burst and exits would
    lose its last log lines (measured: 1-9 of 20). The agent's broker delivers them, so the
    emulator delivers the queue before handling the disconnect.
    """
    from amqtt.broker import Broker as AmqttBroker

    class _DeliveringBroker(AmqttBroker):  # type: ignore[misc]
        async def _client_message_loop(self, client_session: Any, handler: Any) -> None:
            await super()._client_message_loop(client_session, handler)
            # After the loop: the message it was handling went first, the rest keep order.
            queue = client_session.delivered_message_queue
            loop = asyncio.get_running_loop()
            while not queue.empty():
                done = loop.create_future()
                done.set_result(queue.get_nowait())
                await self._handle_message_delivery(client_session, handler, done)

    return _DeliveringBroker


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; build the class on first access.
    if name == "KeeperBrokerPlugin":
        cls = _plugin_class()
        globals()["KeeperBrokerPlugin"] = cls
        return cls
    raise AttributeError(name)


class EmbeddedBroker:
    """amqtt on 127.0.0.1 with TLS, enforcing the agent's rules (see the module docstring)."""

    kind = "embedded"
    enforces = True

    def __init__(self, state: EmulatorState, policy: BrokerPolicy, *, port: int = 0) -> None:
        self.state = state
        self.policy = policy
        self.host = "127.0.0.1"
        self.port = port
        self.tls = True
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        certfile, keyfile = self.state.broker_cert_files()
        config = {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"127.0.0.1:{self.port}",
                    "ssl": True,
                    "certfile": str(certfile),
                    "keyfile": str(keyfile),
                }
            },
            "timeout_disconnect_delay": 2,
            "plugins": {_PLUGIN_PATH: {}},
        }
        broker = _broker_class()(config, plugin_namespace="keeper_task.emulator.broker")
        for plugin in broker.plugins_manager.plugins:
            if type(plugin).__name__ == "KeeperBrokerPlugin":
                plugin.policy = self.policy
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps every start failure in BrokerError
            raise EmulatorError(
                f"embedded MQTT broker cannot listen on 127.0.0.1:{self.port}: {_root(exc)}"
            ) from exc
        server = broker._servers["default"].instance  # amqtt exposes no public accessor
        self.port = server.sockets[0].getsockname()[1]
        self.policy.local_port = self.port
        self._broker = broker

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            with contextlib.suppress(Exception):
                await broker.shutdown()

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        if self._broker is None:
            raise EmulatorError("the embedded broker is stopped")
        self.policy.record(None, topic, payload, qos, False)
        await self._broker.internal_message_broadcast(topic, payload, qos)

    async def drain(self, timeout: float) -> None:
        broker = self._broker
        if broker is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A client that got its PUBACK and disconnected may still have messages queued in its
        # session; they are delivered (and recorded) within a few loop iterations.
        while loop.time() < deadline:
            busy = any(
                not session.delivered_message_queue.empty()
                for session, _handler in list(broker._sessions.values())
            )
            if not busy:
                break
            await asyncio.sleep(0.005)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.plugins_manager.wait_fired_events(), timeout=timeout)


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
