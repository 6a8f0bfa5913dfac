"""The MQTT client toward the agent's broker: the one paho-mqtt boundary.

:class:`MqttClient` wraps ``paho.mqtt.client.Client`` (paho-mqtt 2.x, ``VERSION2`` callbacks,
MQTT 3.1.1, clean session) and maps every paho error and return code to
:mod:`keeper_task.errors` (``raise ... from`` the original):

* ``connect()`` blocks until the broker's CONNACK, within ``connect_timeout`` for TCP, TLS and
  CONNACK together, and sets ``TCP_NODELAY`` on the socket (paho does not: a QoS 1 ack then
  takes ~44 ms instead of ~1 ms). A refused connection, a timeout, a TLS failure or a CONNACK
  refusal is a :class:`~keeper_task.errors.BrokerUnavailableError`.
* ``publish()`` is thread-safe and does not block unless ``wait=True``. A topic outside
  ``allowed_publications`` raises :class:`~keeper_task.errors.TopicNotDeclaredError` at once:
  the agent's broker would drop it without telling anyone.
* ``disconnect()`` flushes unacknowledged QoS 1/2 messages within a bounded time, sends a clean
  DISCONNECT, stops the network thread and returns how many messages were lost.

Throughput: paho keeps at most ``max_inflight_messages`` unacknowledged publishes on the wire
(default 20) and queues the rest; each PUBACK then scans the whole in-flight table to pick the
next queued message. We default to no in-flight limit (``max_inflight=0``), so a burst of
10,000 QoS 1 messages goes out at once and acks are matched in O(1). MQTT packet ids are
16-bit, so at most 65,535 messages can be unacknowledged; ``max_queued`` (default 50,000) turns
a longer backlog (a broker that stopped acking) into a :class:`~keeper_task.errors.PublishError`
instead of unbounded memory. The paho client underneath (``_Client``) also joins queued packets
into one socket write, reads ahead, and wakes its network thread at most once per loop
iteration instead of once per publish: the same bytes with far fewer system calls.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import string
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from keeper_task.errors import (
    BrokerUnavailableError,
    MqttError,
    PublishError,
    SettingsError,
    TopicNotDeclaredError,
)
from keeper_task.topics import topic_allowed  # the one matcher, shared with the emulator

__all__ = [
    "DEFAULT_CLIENT_ID_TEMPLATE",
    "MqttClient",
    "build_client_id",
    "topic_allowed",
]

#: The default client id template; the broker reads the job id from the first '_' segment.
DEFAULT_CLIENT_ID_TEMPLATE = "{job_id}_{job_name}"

_TEMPLATE_FIELDS = frozenset({"job_id", "job_name", "pid"})
_JOB_NAME_OK = frozenset(string.ascii_letters + string.digits + "-")

# CONNACK codes (3.1.1 numbering and the MQTT 5 reason codes paho maps them to) that mean
# "you may not connect": for the agent that is "this process is not in its trusted registry".
_NOT_AUTHORIZED = frozenset({4, 5, 134, 135})

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def build_client_id(
    template: str,
    *,
    job_id: str,
    job_name: str | None = None,
    pid: int | None = None,
) -> str:
    """Build the MQTT client id the agent's broker maps to this job.

    The broker splits the client id on ``_`` and reads the job id from it, so the first
    ``_``-separated segment of the result must be exactly ``job_id``.

    Args:
        template: ``str.format`` template with fields ``{job_id}``, ``{job_name}``, ``{pid}``.
        job_id: ``KEEPER_JOB_ID``; must be non-empty and contain no ``_``.
        job_name: ``KEEPER_JOB_NAME``; characters outside ``[A-Za-z0-9-]`` become ``-`` so they
            cannot add a segment; ``None`` becomes ``task``.
        pid: Process id for ``{pid}`` (default: this process).

    Raises:
        SettingsError: Empty job id, a job id with ``_``, an unknown template field, or a
            template whose first segment is not the job id.
    """
    if not job_id:
        raise SettingsError(
            "job id is empty: the agent sets KEEPER_JOB_ID when the job declares mqttTopics"
        )
    if "_" in job_id:
        raise SettingsError(
            f"job id {job_id!r} contains '_': the agent's broker splits client ids on '_', "
            "so it would name another job; use hyphens in the job id"
        )
    name = (
        "task"
        if job_name is None
        else "".join(c if c in _JOB_NAME_OK else "-" for c in job_name) or "task"
    )
    try:
        fields = [
            f for _lit, f, _spec, _conv in string.Formatter().parse(template) if f is not None
        ]
    except ValueError as exc:
        raise SettingsError(
            f"invalid MQTT client id template {template!r}: {exc}; "
            "use {job_id}, {job_name} and {pid} fields"
        ) from exc
    for field in fields:
        if field not in _TEMPLATE_FIELDS:
            raise SettingsError(
                f"unknown field {{{field}}} in MQTT client id template {template!r}; "
                "use {job_id}, {job_name} and {pid}"
            )
    try:
        client_id = template.format(
            job_id=job_id, job_name=name, pid=pid if pid is not None else _getpid()
        )
    except (ValueError, IndexError, KeyError) as exc:
        raise SettingsError(
            f"invalid MQTT client id template {template!r}: {exc}; "
            "use {job_id}, {job_name} and {pid} fields"
        ) from exc
    if client_id.split("_", 1)[0] != job_id:
        raise SettingsError(
            f"MQTT client id template {template!r} gives {client_id!r}, whose first "
            "'_'-separated segment is not the job id; start the template with '{job_id}_'"
        )
    return client_id


def _getpid() -> int:
    import os

    return os.getpid()


#: Most bytes joined into one socket write by :class:`_Client`.
_WRITE_COALESCE = 64 * 1024
#: Bytes read from the socket at once by :class:`_Client`.
_READ_AHEAD = 64 * 1024


class _Client(paho.Client):
    """paho's client with fewer syscalls and thread wake-ups per message; same protocol.

    paho spends most of a QoS 1 burst in system calls: a socket write per packet, three
    socket reads per PUBACK (fixed header byte, length byte, body) and, in threaded mode,
    a wake byte to its socketpair per queued packet, which also hands the GIL to the network
    thread once per message. Here:

    * a publisher writes the wake byte only when none is pending since the loop thread began
      its current iteration (packets queued before that are seen by its ``want_write()``);
    * queued packets waiting together go out in one socket write (QoS 0 publishes and
      DISCONNECT, which have side effects once written, still go one by one via paho);
    * socket reads go through a read-ahead buffer, drained completely by ``loop_read()``
      so no received packet waits for the next ``select()``; it is dropped with the socket.
    """

    _wake_pending = False
    _rbuf = b""
    _rpos = 0

    # -- wake-ups ---------------------------------------------------------------------------

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        # Cleared before want_write()/select(): anything queued after this wakes us again.
        self._wake_pending = False
        return super()._loop(timeout)

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if self._thread is None or not self._wake_pending:
            self._wake_pending = True
            return super()._packet_queue(command, packet, mid, qos, info)
        # A wake is pending: the loop thread will see this packet in its next iteration.
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- writes -----------------------------------------------------------------------------

    @staticmethod
    def _joinable(packet: Any) -> bool:
        cmd = packet["command"] & 0xF0
        return cmd != paho.DISCONNECT and not (cmd == paho.PUBLISH and packet["qos"] == 0)

    def _packet_write(self) -> MQTTErrorCode:
        out = self._out_packet  # only this (the network) thread pops; publishers append
        while len(out) > 1 and self._joinable(out[0]):
            batch = [out.popleft()]
            size = batch[0]["to_process"]
            while out and size < _WRITE_COALESCE and self._joinable(out[0]):
                batch.append(out.popleft())
                size += batch[-1]["to_process"]
            data = b"".join(p["packet"][p["pos"] :] if p["pos"] else p["packet"] for p in batch)
            try:
                written = self._sock_send(data)
            except (AttributeError, ValueError):
                out.extendleft(reversed(batch))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                out.extendleft(reversed(batch))
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                out.extendleft(reversed(batch))
                self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if written <= 0:  # nothing taken: leave the rest to paho's own loop below
                out.extendleft(reversed(batch))
                break
            done = 0
            for p in batch:
                if written < p["to_process"]:
                    break
                written -= p["to_process"]
                p["pos"] += p["to_process"]
                p["to_process"] = 0
                done += 1
            if done < len(batch):
                partial = batch[done]
                partial["pos"] += written
                partial["to_process"] -= written
                out.extendleft(reversed(batch[done:]))
        # The rest (one packet, or one with side effects) as paho does it.
        return super()._packet_write()

    # -- reads ------------------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            data = super()._sock_recv(max(bufsize, _READ_AHEAD))
            if len(data) <= bufsize:
                return data  # includes b"" (connection closed)
            buf, pos = self._rbuf, self._rpos = data, 0
        chunk = buf[pos : pos + bufsize]
        self._rpos = pos + len(chunk)
        return chunk

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # paho reads at most as many packets as messages are in flight: handle everything
        # already buffered, or it would wait for the socket to become readable again.
        while (
            rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            and self._sock is not None
            and self._rpos < len(self._rbuf)
        ):
            rc = super().loop_read(max_packets)
        return rc

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()


class MqttClient:
    """A thread-safe, blocking-connect MQTT client for the agent's broker.

    Usable on its own::

        client = MqttClient(host="127.0.0.1", port=8675, client_id="my-job_my-task",
                            ssl_context=client_ssl_context(host="127.0.0.1"))
        client.connect()
        client.publish("Jobs/my-job/events", {"status": "done"}, wait=True)
        lost = client.disconnect()

    Args:
        host: Broker host.
        port: Broker port.
        client_id: See :func:`build_client_id`.
        ssl_context: TLS context (see :func:`keeper_task.tls.client_ssl_context`); ``None``
            for plain TCP (development brokers only).
        keepalive: MQTT keepalive in seconds.
        connect_timeout: Seconds for TCP connect, TLS handshake and CONNACK together.
        allowed_publications: Topic filters this task declared in
            ``mqttTopics.allowedPublications``; ``None`` disables the check.
        logger: Object with ``info``/``warning`` methods (a structlog logger) for connection
            events; ``None`` for silence.
        publish_timeout: Default seconds for ``publish(wait=True)``.
        max_inflight: paho's in-flight window; 0 means unlimited (see module docstring).
        max_queued: Most unacknowledged messages kept before publish raises PublishError.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        ssl_context: ssl.SSLContext | None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        allowed_publications: Collection[str] | None = None,
        logger: Any = None,
        publish_timeout: float = 10.0,
        max_inflight: int = 0,
        max_queued: int = 50_000,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._allowed = None if allowed_publications is None else tuple(allowed_publications)
        self._allowed_cache: dict[str, bool] = {}
        self._log = logger
        self._tls = ssl_context is not None

        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending = 0  # publishes handed to paho and not yet acked (QoS>0) / written (QoS 0)
        # Acks for publish(wait=True), tracked here rather than through paho's
        # MQTTMessageInfo.wait_for_publish(), which raises while paho reconnects although
        # the message stays queued and is resent.
        self._waiters = 0
        self._acked_mids: set[int] = set()
        self._ack_events: dict[int, threading.Event] = {}
        self._open = False  # between a successful connect() and disconnect()
        self._closing = False
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | None = None
        self._subs: dict[str, int] = {}
        self._suback: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}

        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.max_inflight_messages_set(max_inflight)
        # paho's own queue limit is our max_queued: beyond it publish() returns QUEUE_SIZE.
        client.max_queued_messages_set(max_queued)
        client.connect_timeout = connect_timeout
        client.suppress_exceptions = True  # a failing user callback must not kill the loop
        if ssl_context is not None:
            # paho checks the host name itself unless the context does; a context without
            # hostname checking (the loopback policy) must not be second-guessed.
            client.tls_set_context(ssl_context)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client

    # -- properties -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the connection to the broker is up (False during a reconnect)."""
        return self._open and self._client.is_connected()

    @property
    def unacked(self) -> int:
        """Publishes not yet acknowledged by the broker (QoS 0: not yet written)."""
        return self._pending

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self._tls

    # -- connect / disconnect ---------------------------------------------------------------

    def connect(self) -> None:
        """Connect and wait for the broker's CONNACK, then start the network thread.

        Raises:
            BrokerUnavailableError: Refused, timed out, TLS failure, or CONNACK refusal.
        """
        if self._open:
            return
        where = f"{'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.port}"
        deadline = time.monotonic() + self.connect_timeout
        self._connack.clear()
        self._connack_rc = None
        self._closing = False
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive)
        except ssl.SSLError as exc:
            raise BrokerUnavailableError(
                f"TLS handshake with the MQTT broker at {where} failed ({_reason(exc)}); "
                "check the CA bundle, or whether the broker speaks TLS on this port"
            ) from exc
        except TimeoutError as exc:
            raise BrokerUnavailableError(
                f"MQTT broker at {where} did not answer within {self.connect_timeout:g}s; "
                "check broker.host/broker.port and that the agent is running"
            ) from exc
        except (OSError, ValueError) as exc:
            raise BrokerUnavailableError(
                f"cannot connect to the MQTT broker at {where} ({_reason(exc)}); "
                "check broker.host/broker.port and that the agent is running"
            ) from exc
        self._client.loop_start()
        remaining = max(0.0, deadline - time.monotonic())
        try:
            got_connack = self._connack.wait(remaining)
        except BaseException:
            # A signal or the task's deadline while waiting: stop paho's thread and socket.
            self._abort()
            raise
        if not got_connack:
            self._abort()
            raise BrokerUnavailableError(
                f"MQTT broker at {where} sent no CONNACK within {self.connect_timeout:g}s; "
                "is this port an MQTT broker?"
            )
        rc = self._connack_rc
        if rc is not None and rc.is_failure:
            self._abort()
            if rc.value in _NOT_AUTHORIZED:
                raise BrokerUnavailableError(
                    f"MQTT broker at {where} refused client id {self.client_id!r} "
                    f"({rc.getName()}): the agent does not trust this process; run the task "
                    "from a job the agent launched, with mqttTopics declared",
                    rc=rc.value,
                )
            raise BrokerUnavailableError(
                f"MQTT broker at {where} refused the connection ({rc.getName()})",
                rc=rc.value,
            )
        self._open = True
        if self._log is not None:
            self._log.info(
                "mqtt.connected",
                host=self.host,
                port=self.port,
                tls=self._tls,
                client_id=self.client_id,
            )

    def _abort(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def flush(self, timeout: float) -> int:
        """Wait until every publish is acknowledged, at most ``timeout`` seconds.

        Returns:
            The number of messages still unacknowledged (0 when all were acked).
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._drained:
            while self._pending > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._drained.wait(remaining)
            return self._pending

    def disconnect(self, timeout: float = 5.0) -> int:
        """Flush (bounded by ``timeout``), send DISCONNECT and stop the network thread.

        Idempotent; safe to call when ``connect()`` failed or was never called.

        Returns:
            How many messages were lost (never acknowledged by the broker).
        """
        with self._lock:
            if not self._open:
                return self._pending
            # From here publish() raises: nothing new may slip in behind the flush.
            self._open = False
        lost = self.flush(timeout)
        self._closing = True
        self._client.disconnect()
        # Joins paho's thread; bounded by its socket timeouts even if a reconnect is running.
        self._client.loop_stop()
        if lost and self._log is not None:
            self._log.warning("mqtt.messages_lost", count=lost, flush_timeout=timeout)
        return lost

    def __enter__(self) -> MqttClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    # -- publish / subscribe ----------------------------------------------------------------

    def is_allowed(self, topic: str) -> bool:
        """Return True when ``topic`` is declared (or when no allow list was given)."""
        if self._allowed is None:
            return True
        ok = self._allowed_cache.get(topic)
        if ok is None:
            ok = topic_allowed(topic, self._allowed)
            if len(self._allowed_cache) < 4096:
                self._allowed_cache[topic] = ok
        return ok

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any] | list[Any],
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish one message; dict/list payloads are sent as compact JSON.

        Args:
            topic: Topic name (no wildcards).
            payload: Bytes, text (UTF-8) or a JSON-serialisable dict/list.
            qos: 0, 1 or 2.
            retain: Ask the broker to retain the message.
            wait: Block until the broker acknowledged it (QoS>0) or it was written (QoS 0).
            timeout: Seconds for ``wait`` (default ``publish_timeout``).

        Raises:
            TopicNotDeclaredError: The topic is not in ``allowed_publications``.
            BrokerUnavailableError: Not connected (before ``connect()``/after ``disconnect()``).
            PublishError: Invalid topic/QoS/payload, queue full, or no ack within ``timeout``.
        """
        if not self.is_allowed(topic):
            raise TopicNotDeclaredError(
                f"topic {topic!r} is not declared: add it to mqttTopics.allowedPublications "
                "of the job (the broker would drop it silently)"
            )
        if isinstance(payload, bytes):
            data: bytes | str = payload
        elif isinstance(payload, str):
            data = payload
        elif isinstance(payload, (Mapping, list)):
            try:
                data = _JSON.encode(payload)
            except (TypeError, ValueError) as exc:
                raise PublishError(
                    f"payload for {topic!r} is not JSON-serialisable: {exc}"
                ) from exc
        else:
            raise PublishError(
                f"payload for {topic!r} must be bytes, str, dict or list, "
                f"not {type(payload).__name__}"
            )
        with self._lock:
            if not self._open:
                raise BrokerUnavailableError(
                    f"cannot publish to {topic!r}: the MQTT client is not connected"
                )
            self._pending += 1
            if wait:
                self._waiters += 1
        try:
            try:
                info = self._client.publish(topic, data, qos=qos, retain=retain)
            except ValueError as exc:
                self._settle()
                raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
            self._check_queued(topic, info.rc, qos)
            if wait:
                self._wait_for_ack(topic, info, qos, timeout)
        finally:
            if wait:
                with self._lock:
                    self._waiters -= 1
                    if self._waiters == 0:
                        self._acked_mids.clear()

    def _check_queued(self, topic: str, rc: MQTTErrorCode, qos: int) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
            rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        ):
            # QoS>0 with NO_CONN stays queued in paho and is resent after the reconnect.
            self._settle()
            if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                raise PublishError(
                    f"cannot publish to {topic!r}: {self._pending} messages are waiting "
                    "for the broker's ack (queue full); is the broker stalled?",
                    rc=int(rc),
                )
            raise BrokerUnavailableError(
                f"cannot publish to {topic!r}: {paho.error_string(rc)}", rc=int(rc)
            )

    def _wait_for_ack(
        self, topic: str, info: paho.MQTTMessageInfo, qos: int, timeout: float | None
    ) -> None:
        limit = self.publish_timeout if timeout is None else timeout
        if qos == 0:
            # No ack exists for QoS 0: wait until paho wrote it (it may raise while offline).
            try:
                info.wait_for_publish(limit)
            except (RuntimeError, ValueError) as exc:
                raise PublishError(f"publish to {topic!r} failed: {exc}") from exc
            if not info.is_published():
                raise PublishError(f"publish to {topic!r} was not written within {limit:g}s")
            return
        with self._lock:
            if info.mid in self._acked_mids:
                self._acked_mids.discard(info.mid)
                return
            event = self._ack_events[info.mid] = threading.Event()
        try:
            if not event.wait(limit):
                raise PublishError(f"publish to {topic!r} was not acknowledged within {limit:g}s")
        finally:
            with self._lock:
                self._ack_events.pop(info.mid, None)

    def subscribe(
        self,
        topic: str,
        callback: Callable[[str, bytes], None],
        *,
        qos: int = 1,
        timeout: float | None = None,
    ) -> None:
        """Subscribe and wait for the broker's SUBACK; re-subscribed after a reconnect.

        ``callback(topic, payload)`` runs on paho's network thread; an exception in it is
        logged and does not stop the client.

        Raises:
            BrokerUnavailableError: Not connected.
            MqttError: The broker refused the subscription or did not answer in time.
        """
        if not self._open:
            raise BrokerUnavailableError(
                f"cannot subscribe to {topic!r}: the MQTT client is not connected"
            )

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            try:
                callback(msg.topic, bytes(msg.payload))
            except Exception as exc:
                if self._log is not None:
                    self._log.error(
                        "mqtt.subscriber_callback_failed", topic=msg.topic, error=repr(exc)
                    )

        self._client.message_callback_add(topic, on_message)
        self._subs[topic] = qos
        self._subscribe_and_wait(topic, qos, self.publish_timeout if timeout is None else timeout)

    def _subscribe_and_wait(self, topic: str, qos: int, timeout: float) -> None:
        done = threading.Event()
        codes: list[ReasonCode] = []
        # Hold the lock across subscribe() so the SUBACK cannot arrive before it is awaited.
        with self._lock:
            try:
                rc, mid = self._client.subscribe(topic, qos=qos)
            except ValueError as exc:
                raise MqttError(f"cannot subscribe to {topic!r}: {exc}") from exc
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise BrokerUnavailableError(
                    f"cannot subscribe to {topic!r}: {paho.error_string(rc)}", rc=int(rc)
                )
            self._suback[mid] = (done, codes)
        if not done.wait(timeout):
            with self._lock:
                self._suback.pop(mid, None)
            raise MqttError(f"broker did not acknowledge the subscription to {topic!r}")
        if codes and codes[0].is_failure:
            raise MqttError(
                f"broker refused the subscription to {topic!r} ({codes[0].getName()}): "
                "declare it in mqttTopics.allowedSubscriptions",
                rc=codes[0].value,
            )

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _settle(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._drained.notify_all()

    def _on_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        # Called for the first connect and for every reconnect.
        # Not a TCP socket (unix/websocket wrapper): nothing to tune.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        self._connack_rc = rc
        if rc.is_failure and not self._open:
            # Ends paho's loop now instead of after its 1 s reconnect pause.
            self._closing = True
            self._client.disconnect()
        self._connack.set()
        if self._open and not rc.is_failure:
            # A reconnect: the clean session dropped our subscriptions.
            for topic, qos in self._subs.items():
                self._client.subscribe(topic, qos=qos)
            if self._log is not None:
                self._log.info("mqtt.reconnected", host=self.host, port=self.port)

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if not self._closing and self._open and self._log is not None:
            self._log.warning("mqtt.connection_lost", reason=rc.getName(), unacked=self._pending)

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, _rc: Any, _props: Any) -> None:
        # Runs under paho's message lock: never log or publish from here.
        if self._waiters:
            with self._lock:
                event = self._ack_events.get(mid)
                if event is not None:
                    event.set()
                elif self._waiters:
                    self._acked_mids.add(mid)  # acked before its waiter registered
        self._settle()

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        with self._lock:
            waiter = self._suback.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(codes)
            waiter[0].set()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
