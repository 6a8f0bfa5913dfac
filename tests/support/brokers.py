"""Real MQTT brokers on 127.0.0.1 for tests and benchmarks.

* :class:`AmqttBroker`: the pure-Python amqtt broker in a background thread with its own
  asyncio loop; plain TCP or TLS.
* :class:`MosquittoBroker`: ``mosquitto`` as a subprocess with a generated config on a free
  port; ready once a TCP connect succeeds; terminated by PID.
* :class:`Collector`: a raw paho subscriber (independent of the code under test) that
  records every message on a topic and can wait for N of them.
* :func:`make_ca_files`: a trustme CA plus a server certificate for 127.0.0.1/localhost.

Every broker is a context manager and exposes ``.host``, ``.port``, ``.tls``,
``.ca_pem_path`` (or None), ``.name``, ``ssl_context()`` and ``collect(topic)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trustme
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"


@dataclass(frozen=True)
class CertFiles:
    """PEM files of a throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    ca_pem: str
    cert_pem: str
    key_pem: str


def make_ca_files(directory: str | os.PathLike[str]) -> CertFiles:
    """Create a trustme CA and a server certificate in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = CertFiles(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"))
    ca.cert_pem.write_to_path(files.ca_pem)
    server.cert_chain_pems[0].write_to_path(files.cert_pem)
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(files.cert_pem, append=True)
    server.private_key_pem.write_to_path(files.key_pem)
    return files


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Collector:
    """A paho subscriber that records ``(topic, payload)`` for one topic filter.

    Use :meth:`wait_for` to block until N messages arrived (or a timeout passed).
    """

    def __init__(self, broker: BrokerBase, topic: str, *, qos: int = 1, timeout: float = 5.0):
        self.topic = topic
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"collector-{id(self):x}",
            clean_session=True,
        )
        if broker.tls:
            self._client.tls_set_context(broker.ssl_context())
        self._client.on_message = self._on_message
        connected = threading.Event()
        subscribed = threading.Event()
        self._client.on_connect = lambda *_a: connected.set()
        self._client.on_subscribe = lambda *_a: subscribed.set()
        self._client.on_socket_open = lambda _c, _u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        try:
            if not connected.wait(timeout):
                raise TimeoutError(f"collector could not connect to {broker}")
            self._client.subscribe(topic, qos=qos)
            if not subscribed.wait(timeout):
                raise TimeoutError(f"collector got no SUBACK for {topic!r}")
        except BaseException:
            self.close()
            raise

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Wait until at least ``n`` messages arrived; return all messages so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return list(self.messages)

    @property
    def payloads(self) -> list[bytes]:
        """The payloads received so far, in order."""
        with self._cond:
            return [p for _t, p in self.messages]

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BrokerBase:
    """What every test broker exposes."""

    name = "broker"
    host = HOST
    port = 0
    tls = False
    ca_pem_path: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting this broker's CA (None for plain TCP)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_pem_path)

    def collect(self, topic: str, *, qos: int = 1) -> Collector:
        """Subscribe a :class:`Collector` to ``topic`` (subscription active on return)."""
        return Collector(self, topic, qos=qos)

    def stop(self) -> None:
        """Stop the broker (subclasses)."""

    def __repr__(self) -> str:
        return f"<{self.name} {'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}>"


class AmqttBroker(BrokerBase):
    """amqtt in a daemon thread with its own event loop."""

    name = "amqtt"

    def __init__(self, *, certs: CertFiles | None = None) -> None:
        self.tls = certs is not None
        self.ca_pem_path = certs.ca_pem if certs else None
        self._certs = certs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    def start(self) -> AmqttBroker:
        """Start the broker; return once it listens."""
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO; keep test output readable.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        self.port = free_port()
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{HOST}:{self.port}"}
        if self._certs is not None:
            listener.update(ssl=True, certfile=self._certs.cert_pem, keyfile=self._certs.key_pem)
        config = {
            "listeners": {"default": listener},
            # Only anonymous auth: no $SYS publisher, no per-packet logging plugins.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="amqtt-broker", daemon=True)
        self._thread.start()

        async def _start() -> Any:
            broker = Broker(config, loop=loop)
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(_start(), loop).result(10)
        return self

    def stop(self) -> None:
        """Shut the broker down and join its thread."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(10)

        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_rest(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        loop.close()

    def __enter__(self) -> AmqttBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_mosquitto() -> str | None:
    """Return the mosquitto binary (PATH, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class MosquittoBroker(BrokerBase):
    """mosquitto as a subprocess on a free port, with a generated config."""

    name = "mosquitto"

    def __init__(
        self,
        *,
        certs: CertFiles | None = None,
        allow_anonymous: bool = True,
        binary: str | None = None,
    ) -> None:
        self.tls = certs is not None
        self.ca_pem_path = certs.ca_pem if certs else None
        self._certs = certs
        self._allow_anonymous = allow_anonymous
        self._binary = binary or find_mosquitto()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start mosquitto; return once its port accepts connections."""
        if self._binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self._dir = tempfile.TemporaryDirectory(prefix="mosquitto-")
        self.port = free_port()
        lines = [
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if self._allow_anonymous else 'false'}",
            "persistence false",
            # Defaults drop QoS 1 messages beyond 1000 queued per subscriber and keep 20 in
            # flight: a 10k burst to a collector must not be cut.
            "max_queued_messages 0",
            "max_inflight_messages 0",
            # Without it a small CONNACK/PUBACK waits ~40 ms for the client's delayed ACK.
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to user "mosquitto", who cannot read our temp files.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self._certs is not None:
            lines += [
                f"cafile {self._certs.ca_pem}",
                f"certfile {self._certs.cert_pem}",
                f"keyfile {self._certs.key_pem}",
            ]
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                pass
            try:
                # Doubles as the pause between attempts and detects an early exit.
                self._proc.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
            else:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self.stop()
                raise RuntimeError(f"mosquitto exited at start: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mosquitto did not listen on port {self.port}")
        return self

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while it runs."""
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Terminate mosquitto by PID and remove its config directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, 15)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, 9)
                    proc.wait(5)
            if proc.stderr:
                proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def silent_server(*, connack: bytes | None = None) -> Iterator[int]:
    """A raw TCP server on 127.0.0.1 that accepts connections and never speaks MQTT.

    With ``connack``, it reads the client's first bytes and answers with them (e.g. a
    CONNACK refusal ``b"\\x20\\x02\\x00\\x05"``). Yields the port.
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((HOST, 0))
    srv.listen(8)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            if connack is not None:
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(connack)

    port = int(srv.getsockname()[1])
    t = threading.Thread(target=serve, name="silent-server", daemon=True)
    t.start()
    try:
        yield port
    finally:
        stop.set()
        # Wake the blocked accept() so the thread sees ``stop``, then close everything.
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1.0):
            pass
        t.join(5)
        srv.close()
        for c in conns:
            c.close()


def _collect_main(argv: list[str]) -> int:
    """``python -m tests.support.brokers collect HOST PORT TOPIC COUNT TIMEOUT``.

    A subscriber in its own process (so it does not compete for the measuring process's
    GIL): prints ``ready`` once subscribed, then one JSON line ``{"count", "distinct"}``
    after COUNT messages or TIMEOUT seconds of silence.
    """
    import json
    import sys

    host, port, topic, count, timeout = argv[0], int(argv[1]), argv[2], int(argv[3]), float(argv[4])
    broker = BrokerBase()
    broker.host, broker.port = host, port
    col = Collector(broker, topic)
    print("ready", flush=True)
    seen = 0
    while True:
        got = len(col.wait_for(count, timeout))
        if got >= count or got == seen:
            break
        seen = got  # still receiving: keep waiting
    payloads = col.payloads
    col.close()
    sys.stdout.write(json.dumps({"count": len(payloads), "distinct": len(set(payloads))}) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 7 and sys.argv[1] == "collect":
        raise SystemExit(_collect_main(sys.argv[2:]))
    raise SystemExit("usage: python -m tests.support.brokers collect HOST PORT TOPIC COUNT TIMEOUT")
