"""The MQTT client toward the agent's broker: the one paho-mqtt boundary.

:class:`MqttClient` wraps ``paho.mqtt.client.Client`` (paho-mqtt 2.x, ``VERSION2`` callbacks,
MQTT 3.1.1, clean session), only through paho's public API, and maps every paho error and
return code to :mod:`keeper_task.errors` (``raise ... from`` the original):

* ``connect()`` blocks until the broker's CONNACK, within ``connect_timeout`` for TCP, TLS and
  CONNACK together, and sets ``TCP_NODELAY`` on the socket from paho's ``on_socket_open`` hook
  (paho does not: a QoS 1 ack then takes ~44 ms instead of ~1 ms). A refused connection, a
  timeout, a TLS failure or a CONNACK refusal is a
  :class:`~keeper_task.errors.BrokerUnavailableError`.
* ``publish()`` is thread-safe and does not block unless ``wait=True``. A topic outside
  ``allowed_publications`` raises :class:`~keeper_task.errors.TopicNotDeclaredError` at once:
  the agent's broker would drop it silently.
* ``disconnect()`` flushes unacknowledged messages within a bounded time, sends a clean
  DISCONNECT, stops the network thread and returns exactly how many messages were lost.

Threads. One network thread of ours drives paho with its external-loop API (the way aiomqtt
does): ``select()`` on ``socket()``, then ``loop_read()``, ``loop_write()`` when
``want_write()``, ``loop_misc()``, and ``reconnect()`` after a lost connection (paho's default
back-off: 1 s doubling to 120 s). Every paho call after ``connect()`` runs on that thread.
``publish()`` only appends the message to a queue (one atomic ``deque.append``) and wakes the
thread, which hands queued messages to paho's ``publish()``:

* Exact bookkeeping under asynchronous exceptions. A signal or the task's deadline raised in
  the publishing thread lands either before the append (nothing published, nothing counted)
  or after it (sent, and counted until acknowledged); it can never interrupt paho halfway, as
  only the main thread runs signal handlers and the deadline targets the task's thread.
  Unacknowledged = queued + handed to paho and not yet acknowledged (``on_publish``), so a
  flush never waits for a message that does not exist and never misses one that does.
* Throughput. A burst of publishes costs one wake-up of the network thread (a byte on a
  socketpair, written only when none is pending) instead of one per publish, as paho's own
  ``loop_start()`` thread would; setting ``on_socket_register_write`` makes paho queue
  packets for our loop instead of writing from the caller. Measured with
  ``benchmarks/log_throughput.py`` (``ctx.log`` -> KeeperLogger vs a raw paho loop, median of
  5 rounds): 0.77-0.84 this way, 0.67-0.80 on paho's ``loop_start()`` thread (goal >= 0.7).
  ``tests/test_mqtt.py::test_paho_external_loop_contract`` fails if a paho release changes
  what this relies on.

paho keeps at most ``max_inflight_messages`` unacknowledged publishes on the wire (default 20)
and queues the rest; each PUBACK then scans the whole in-flight table to pick the next queued
message. We default to no in-flight limit (``max_inflight=0``), so a burst of 10,000 QoS 1
messages goes out at once and acks are matched in O(1). MQTT packet ids are 16-bit, so at
most 65,535 messages can be unacknowledged; ``max_queued`` (default 50,000) turns a longer
backlog (a broker that stopped acking) into a :class:`~keeper_task.errors.PublishError`
instead of unbounded memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import select
import socket
import ssl
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

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
from keeper_task.signals import start_shielded
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


#: Longest single wait handed to threading or select(), which refuse more than
#: threading.TIMEOUT_MAX; a monotonic deadline keeps longer waits exact.
_MAX_WAIT = 3600.0
#: The network loop's select() timeout: keepalive (loop_misc) runs at least this often.
_TICK = 1.0
#: Reconnect back-off, paho's defaults for its own loop.
_RECONNECT_MIN = 1.0
_RECONNECT_MAX = 120.0
#: Time the stopping network thread has to write DISCONNECT before it closes the socket.
_STOP_GRACE = 2.0
#: MQTT limits: 16-bit packet ids, and the largest remaining length of a packet.
_MAX_MID = 65_535
_MAX_PAYLOAD = 268_435_455


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
        logger: Object with ``info``/``warning``/``error`` methods (a structlog logger) for
            connection events; ``None`` for silence.
        publish_timeout: Default seconds for ``publish(wait=True)``.
        max_inflight: paho's in-flight window; 0 means unlimited (see module docstring).
        max_queued: Most unacknowledged messages kept before publish raises PublishError
            (at most 65,535: MQTT packet ids are 16-bit).
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
        self._topics_ok: set[str] = set()
        self._log = logger
        self._tls = ssl_context is not None
        self._max_queued = max(1, min(max_queued, _MAX_MID))

        # Publish bookkeeping (see the module docstring): a message is counted from the one
        # append to _outbox until the network thread settles it; nothing else changes it.
        self._outbox: deque[_Outgoing] = deque()
        self._in_hand = 0  # 1 while the network thread hands one message to paho
        self._inflight: dict[int, _Outgoing] = {}  # paho mid -> message, network thread only
        self._failed = 0  # refused or dropped after publish() returned; network thread only
        self._lost = 0  # what the last disconnect() counted
        self._calls: deque[Callable[[], None]] = deque()  # paho calls run by the network thread

        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._open = False  # between a successful connect() and disconnect()
        self._established = False  # a CONNACK accepted us; later losses are reconnected
        self._connack = threading.Event()
        self._connack_rc: ReasonCode | None = None
        self._subs: dict[str, int] = {}
        self._suback: dict[int, tuple[threading.Event, list[ReasonCode]]] = {}

        self._thread: threading.Thread | None = None
        self._loop_ident: int | None = None
        self._stop = threading.Event()
        self._closed = threading.Event()  # disconnect() counted what was left
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._wake_pending = False
        self._reconnect_delay = 0.0

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.max_inflight_messages_set(max_inflight)
        client.connect_timeout = min(connect_timeout, _MAX_WAIT)
        client.suppress_exceptions = True  # a failing user callback must not kill the loop
        if ssl_context is not None:
            # paho checks the host name itself unless the context does; a context without
            # hostname checking (the loopback policy) must not be second-guessed.
            client.tls_set_context(ssl_context)
        client.on_socket_open = self._on_socket_open
        # Setting this hook is what makes paho queue packets for our loop instead of writing
        # them from the calling thread; it also wakes the loop for packets paho queues itself.
        client.on_socket_register_write = self._on_register_write
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
        # Read in the order a message moves (outbox -> in hand -> in flight): a message
        # moving while we read is counted twice at worst, never missed.
        return len(self._outbox) + self._in_hand + len(self._inflight)

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS."""
        return self._tls

    # -- connect / disconnect ---------------------------------------------------------------

    def connect(self) -> None:
        """Connect and wait for the broker's CONNACK, then keep the connection in a thread.

        Raises:
            BrokerUnavailableError: Refused, timed out, TLS failure, or CONNACK refusal.
        """
        if self._open:
            return
        where = f"{'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.port}"
        deadline = time.monotonic() + max(0.0, self.connect_timeout)
        self._reset_session()
        try:
            self._client.connect(self.host, self.port, keepalive=self.keepalive)
        except BaseException as exc:
            self._close_socket()
            self._close_wake()
            self._raise_connect_error(exc, where)
        self._start_loop()
        try:
            got_connack = _wait(self._connack, deadline - time.monotonic())
        except BaseException:
            # A signal or the task's deadline while waiting: stop the network thread and socket.
            self._stop_loop()
            raise
        self._check_connack(got_connack, where)
        with self._lock:
            self._open = True
        if self._log is not None:
            self._log.info(
                "mqtt.connected",
                host=self.host,
                port=self.port,
                tls=self._tls,
                client_id=self.client_id,
            )

    def _reset_session(self) -> None:
        self._connack.clear()
        self._connack_rc = None
        self._established = False
        self._stop.clear()
        self._closed.clear()
        # A previous session's leftovers were counted by its disconnect(); paho may still
        # resend them, and their acks are then ignored.
        self._inflight.clear()
        self._in_hand = self._failed = self._lost = 0
        self._reconnect_delay = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False

    def _raise_connect_error(self, exc: BaseException, where: str) -> NoReturn:
        """Map what paho's connect() raised (TCP connect and TLS handshake) to our errors."""
        if isinstance(exc, ssl.SSLError):
            raise BrokerUnavailableError(
                f"TLS handshake with the MQTT broker at {where} failed ({_reason(exc)}); "
                "check the CA bundle, or whether the broker speaks TLS on this port"
            ) from exc
        if isinstance(exc, TimeoutError):
            raise BrokerUnavailableError(
                f"MQTT broker at {where} did not answer within {self.connect_timeout:g}s; "
                "check broker.host/broker.port and that the agent is running"
            ) from exc
        if isinstance(exc, (OSError, ValueError, OverflowError)):
            raise BrokerUnavailableError(
                f"cannot connect to the MQTT broker at {where} ({_reason(exc)}); "
                "check broker.host/broker.port and that the agent is running"
            ) from exc
        raise exc

    def _check_connack(self, got_connack: bool, where: str) -> None:
        """Raise unless the broker accepted us; the network thread is stopped then."""
        rc = self._connack_rc
        if not got_connack or rc is None:
            self._stop_loop()
            if not got_connack:
                raise BrokerUnavailableError(
                    f"MQTT broker at {where} sent no CONNACK within {self.connect_timeout:g}s; "
                    "is this port an MQTT broker?"
                )
            raise BrokerUnavailableError(
                f"MQTT broker at {where} closed the connection before its CONNACK; "
                "is this port an MQTT broker?"
            )
        if rc.is_failure:
            self._stop_loop()
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

    def flush(self, timeout: float) -> int:
        """Wait until every publish is acknowledged, at most ``timeout`` seconds.

        Any ``timeout`` is accepted (``inf`` waits as long as the connection can deliver);
        it ends early when nothing can be delivered any more.

        Returns:
            The number of messages still unacknowledged (0 when all were acked).
        """
        if threading.get_ident() == self._loop_ident:
            return self.unacked  # on the network thread (a subscription callback): can't wait
        deadline = time.monotonic() + max(0.0, timeout)
        with self._drained:
            while self.unacked > 0 and self._thread is not None and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._drained.wait(min(remaining, _MAX_WAIT))
            return self.unacked

    def disconnect(self, timeout: float = 5.0) -> int:
        """Flush (bounded by ``timeout``), send DISCONNECT and stop the network thread.

        Idempotent; safe to call when ``connect()`` failed or was never called.

        Returns:
            How many messages were lost: never acknowledged by the broker (QoS 0: never
            written), including any the connection dropped after ``publish()`` returned.
        """
        with self._lock:
            if not self._open:
                return self._lost
            # From here publish() raises: nothing new may slip in behind the flush.
            self._open = False
        try:
            self.flush(timeout)
        finally:
            # Also when a second signal interrupts the flush: the count stays exact.
            self._stop_loop()
            # Still queued: never handed to paho. Counted as lost, one by one, so that a
            # publisher racing with this learns whether its message was counted.
            unsent = 0
            while self._outbox:
                item = self._outbox.popleft()
                item.error = "the client disconnected before it was sent"
                if item.done is not None:
                    item.done.set()
                unsent += 1
            lost = self._lost = unsent + self._in_hand + len(self._inflight) + self._failed
            self._closed.set()
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

        The message is queued for the network thread in one atomic step: an exception
        raised asynchronously in the caller (a signal, the task's deadline) either comes
        before it (nothing was published or counted) or after it (the message is sent and
        counted in :attr:`unacked` until the broker acknowledged it).

        Args:
            topic: Topic name (no wildcards).
            payload: Bytes, text (UTF-8) or a JSON-serialisable dict/list.
            qos: 0, 1 or 2.
            retain: Ask the broker to retain the message.
            wait: Block until the broker acknowledged it (QoS>0) or it was written (QoS 0).
            timeout: Seconds for ``wait`` (default ``publish_timeout``).

        Raises:
            TopicNotDeclaredError: The topic is not in ``allowed_publications``.
            BrokerUnavailableError: Not connected (before ``connect()``/after
                ``disconnect()``), or QoS 0 while the connection is down (not queued).
            PublishError: Invalid topic/QoS/payload, queue full, no ack within ``timeout``,
                or ``wait=True`` on the network thread (in a subscription callback).
        """
        if not self.is_allowed(topic):
            raise TopicNotDeclaredError(
                f"topic {topic!r} is not declared: add it to mqttTopics.allowedPublications "
                "of the job (the broker would drop it silently)"
            )
        data = _encode(topic, payload)
        self._check_can_publish(topic, qos, len(data), wait)
        item = _Outgoing(topic, data, qos, retain, threading.Event() if wait else None)
        if not self._open or self._loop_ident is None:
            raise BrokerUnavailableError(
                f"cannot publish to {topic!r}: the MQTT client is not connected"
            )
        # No lock on this path: an exception raised asynchronously while one is held could
        # leave it held. The append is the one step that publishes (see the docstring).
        self._outbox.append(item)
        if not self._open:
            self._published_late(item)
        self._wake()
        if item.done is not None:
            limit = self.publish_timeout if timeout is None else timeout
            if not _wait(item.done, limit):
                what = "written" if qos == 0 else "acknowledged"
                raise PublishError(f"publish to {topic!r} was not {what} within {limit:g}s")
            if item.error is not None:
                raise PublishError(f"publish to {topic!r} failed: {item.error}")

    def _check_can_publish(self, topic: str, qos: int, size: int, wait: bool) -> None:
        if topic not in self._topics_ok:
            _check_topic(topic)
            if len(self._topics_ok) < 4096:
                self._topics_ok.add(topic)
        _check_publish(topic, qos, size)
        if wait and threading.get_ident() == self._loop_ident:
            raise PublishError(
                f"cannot wait for the publish to {topic!r} in a subscription callback: it "
                "runs on the network thread that would receive the ack; use wait=False"
            )
        if qos == 0 and self._open and not self._client.is_connected():
            raise BrokerUnavailableError(
                f"cannot publish to {topic!r}: the connection to the broker is down and "
                "QoS 0 messages are not queued",
                rc=int(MQTTErrorCode.MQTT_ERR_NO_CONN),
            )
        waiting = self.unacked
        if waiting >= self._max_queued:
            raise PublishError(
                f"cannot publish to {topic!r}: {waiting} messages are waiting for the "
                "broker's ack (queue full); is the broker stalled?",
                rc=int(MQTTErrorCode.MQTT_ERR_QUEUE_SIZE),
            )

    def _published_late(self, item: _Outgoing) -> None:
        """disconnect() began between publish()'s check and its append: settle the message.

        Raises:
            BrokerUnavailableError: The message was not sent (and says whether
                ``disconnect()`` counted it as lost).
        """
        if threading.get_ident() != self._loop_ident:
            _wait(self._closed, math.inf)  # disconnect() has counted what is queued
            if item.info is not None:
                return  # handed to paho before the stop: sent, or counted as lost
            if item.error is not None:
                raise BrokerUnavailableError(
                    f"cannot publish to {item.topic!r}: {item.error}; counted as lost"
                )
        # Not counted (or, on the network thread, not counted yet): take it back.
        with contextlib.suppress(ValueError):
            self._outbox.remove(item)
        raise BrokerUnavailableError(
            f"cannot publish to {item.topic!r}: the MQTT client is not connected"
        )

    def subscribe(
        self,
        topic: str,
        callback: Callable[[str, bytes], None],
        *,
        qos: int = 1,
        timeout: float | None = None,
    ) -> None:
        """Subscribe and wait for the broker's SUBACK; re-subscribed after a reconnect.

        ``callback(topic, payload)`` runs on the network thread; an exception in it is
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
        done = threading.Event()
        codes: list[ReasonCode] = []
        failure: list[MqttError] = []

        def send() -> None:  # on the network thread: the SUBACK cannot overtake it
            self._send_subscribe(topic, qos, done, codes, failure)

        self._calls.append(send)
        self._wake()
        limit = self.publish_timeout if timeout is None else timeout
        if not _wait(done, limit):
            raise MqttError(f"broker did not acknowledge the subscription to {topic!r}")
        if failure:
            raise failure[0]
        if codes and codes[0].is_failure:
            raise MqttError(
                f"broker refused the subscription to {topic!r} ({codes[0].getName()}): "
                "declare it in mqttTopics.allowedSubscriptions",
                rc=codes[0].value,
            )

    def _send_subscribe(
        self,
        topic: str,
        qos: int,
        done: threading.Event,
        codes: list[ReasonCode],
        failure: list[MqttError],
    ) -> None:
        try:
            rc, mid = self._client.subscribe(topic, qos=qos)
        except ValueError as exc:
            failure.append(MqttError(f"cannot subscribe to {topic!r}: {exc}"))
            done.set()
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            failure.append(
                BrokerUnavailableError(
                    f"cannot subscribe to {topic!r}: {paho.error_string(rc)}", rc=int(rc)
                )
            )
            done.set()
            return
        self._suback[mid] = (done, codes)

    # -- the network thread -----------------------------------------------------------------

    def _start_loop(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"keeper-task-mqtt-{self.client_id}", daemon=True
        )
        self._thread = thread
        start_shielded(thread)

    def _stop_loop(self) -> None:
        """Stop the network thread: DISCONNECT is sent if the connection is up."""
        thread = self._thread
        self._stop.set()
        self._wake(force=True)
        if thread is not None and thread.ident != threading.get_ident():
            # The thread may be inside paho's reconnect(), bounded by the connect timeout.
            thread.join(min(self.connect_timeout, _MAX_WAIT) + _STOP_GRACE + _TICK)
        self._close_socket()

    def _wake(self, *, force: bool = False) -> None:
        """Make the network thread look at its queues (at most one wake-up in flight)."""
        if self._wake_pending and not force:
            return
        if threading.get_ident() == self._loop_ident:
            return  # the loop looks at its queues before it waits again
        # Set before the send: a publisher that sees it set knows the loop will still
        # look at the outbox after its append (the loop clears it before looking).
        self._wake_pending = True
        wake_w = self._wake_w
        if wake_w is not None:
            with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
                wake_w.send(b"\0")

    def _run(self) -> None:
        """The network thread: paho driven through its external-loop API."""
        self._loop_ident = threading.get_ident()
        client = self._client
        wake_r = self._wake_r
        assert wake_r is not None
        stop_by: float | None = None
        try:
            while True:
                sock: Any = client.socket()
                if self._stop.is_set():
                    if stop_by is None:
                        stop_by = time.monotonic() + _STOP_GRACE
                        if sock is not None:
                            client.disconnect()  # paho closes the socket once it is written
                    elif time.monotonic() >= stop_by:
                        break
                if sock is None:
                    if self._stop.is_set() or not self._established:
                        break
                    self._reconnect()
                    continue
                self._step(sock, wake_r, stopping=stop_by is not None)
        except Exception as exc:
            if self._log is not None:
                self._log.error("mqtt.network_thread_failed", error=repr(exc))
        finally:
            self._loop_ident = None
            self._connack.set()  # connect() stops waiting: the connection is gone
            self._close_wake()
            with self._drained:
                self._drained.notify_all()

    def _step(self, sock: Any, wake_r: socket.socket, *, stopping: bool) -> None:
        """One loop iteration: hand over what is queued, wait for the socket, let paho work."""
        client = self._client
        if not stopping:  # once stopping, what is still queued is counted as lost
            self._move_outbox()
        tls_pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        wait = 0.0 if tls_pending or self._outbox or self._calls else _TICK
        if stopping:
            wait = 0.05
        try:
            readable, _, _ = select.select(
                [sock, wake_r], [sock] if client.want_write() else [], [], wait
            )
        except (OSError, ValueError):
            readable = [sock]  # closed under us: paho's read reports it
        # Cleared before the outbox is read: a publish after this wakes us again.
        self._wake_pending = False
        if wake_r in readable:
            with contextlib.suppress(OSError):
                wake_r.recv(4096)
            if not stopping:
                self._move_outbox()
        if sock in readable or tls_pending:
            client.loop_read()
        if client.want_write():
            client.loop_write()
        client.loop_misc()

    def _reconnect(self) -> None:
        """Wait (paho's default back-off, 1 s doubling to 120 s), then reconnect once."""
        self._reconnect_delay = min(max(2 * self._reconnect_delay, _RECONNECT_MIN), _RECONNECT_MAX)
        if self._stop.wait(self._reconnect_delay):
            return
        try:
            self._client.reconnect()
        except Exception as exc:  # refused, unreachable, TLS: try again after the back-off
            if self._log is not None:
                self._log.info("mqtt.reconnect_failed", reason=_reason(exc))
        self._settle_dropped()

    def _move_outbox(self) -> None:
        """Hand queued subscribes and publishes to paho (on the network thread)."""
        calls = self._calls
        while calls:
            calls.popleft()()
        outbox = self._outbox
        inflight = self._inflight
        publish = self._client.publish
        while outbox:
            self._in_hand = 1  # before the pop: unacked never misses the message
            item = outbox.popleft()
            try:
                info = publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            except (ValueError, TypeError) as exc:  # checked in publish(); paho may add checks
                self._in_hand = 0
                self._fail(item, str(exc))
                continue
            rc = info.rc
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                rc == MQTTErrorCode.MQTT_ERR_NO_CONN and item.qos > 0
            ):
                # QoS>0 without a connection stays queued in paho, resent after a reconnect.
                item.info = info
                inflight[info.mid] = item
                self._in_hand = 0
            else:
                self._in_hand = 0
                self._fail(item, paho.error_string(rc))

    def _settle_dropped(self) -> None:
        # paho's reconnect() discards QoS 0 packets not yet written: it sets their info's rc
        # to MQTT_ERR_CONN_LOST and calls no on_publish, so they are settled here.
        for mid, item in list(self._inflight.items()):
            info = item.info
            if item.qos == 0 and info is not None and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                del self._inflight[mid]
                self._fail(item, "the connection was lost before it was written")

    def _done(self, item: _Outgoing) -> None:
        if item.done is not None:
            item.done.set()
        if not self._inflight and not self._outbox:
            with self._drained:
                self._drained.notify_all()

    def _fail(self, item: _Outgoing, reason: str) -> None:
        self._failed += 1
        item.error = reason
        if self._log is not None:
            self._log.warning("mqtt.publish_failed", topic=item.topic, reason=reason)
        self._done(item)

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _close_socket(self) -> None:
        # After an interrupted connect or a stop that could not finish in time: paho would
        # otherwise keep the socket open until the client is garbage-collected.
        sock = self._client.socket()
        if sock is not None and (self._thread is None or not self._thread.is_alive()):
            with contextlib.suppress(OSError):
                sock.close()

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        # Called for the first connect and for every reconnect.
        # Not a TCP socket (unix/websocket wrapper): nothing to tune.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_register_write(self, _c: paho.Client, _u: Any, _sock: Any) -> None:
        self._wake()  # paho queued a packet from another thread (connect())

    def _on_connect(
        self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        self._connack_rc = rc
        if not rc.is_failure:
            self._established = True
            self._reconnect_delay = 0.0
        self._connack.set()
        if self._open and not rc.is_failure:
            # A reconnect: the clean session dropped our subscriptions.
            for topic, qos in list(self._subs.items()):
                self._client.subscribe(topic, qos=qos)
            if self._log is not None:
                self._log.info("mqtt.reconnected", host=self.host, port=self.port)

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if not self._stop.is_set() and self._open and self._log is not None:
            self._log.warning("mqtt.connection_lost", reason=rc.getName(), unacked=self.unacked)

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, _rc: Any, _props: Any) -> None:
        item = self._inflight.pop(mid, None)
        if item is not None:
            self._done(item)

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        waiter = self._suback.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(codes)
            waiter[0].set()


class _Outgoing:
    """One publish on its way: queued by any thread, handed to paho by the network thread."""

    __slots__ = ("done", "error", "info", "payload", "qos", "retain", "topic")

    def __init__(
        self, topic: str, payload: bytes, qos: int, retain: bool, done: threading.Event | None
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.done = done  # set when settled (publish(wait=True))
        self.error: str | None = None
        self.info: paho.MQTTMessageInfo | None = None


def _encode(topic: str, payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PublishError(f"payload for {topic!r} is not valid text: {exc}") from exc
    if isinstance(payload, (Mapping, list)):
        try:
            return _JSON.encode(payload).encode("utf-8")
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            raise PublishError(f"payload for {topic!r} is not JSON-serialisable: {exc}") from exc
    raise PublishError(
        f"payload for {topic!r} must be bytes, str, dict or list, not {type(payload).__name__}"
    )


def _check_topic(topic: str) -> None:
    """paho's topic checks, made in the caller's thread (paho runs on the network thread)."""
    reason = None
    if not topic:
        reason = "the topic is empty"
    elif "+" in topic or "#" in topic:
        reason = "a topic name cannot contain the wildcards '+' or '#'"
    else:
        try:
            if len(topic.encode("utf-8")) > 65535:
                reason = "the topic is longer than 65,535 bytes"
        except UnicodeEncodeError as exc:
            reason = f"the topic is not valid text ({exc})"
    if reason is not None:
        raise PublishError(f"cannot publish to {topic!r}: {reason}")


def _check_publish(topic: str, qos: int, size: int) -> None:
    reason = None
    if qos not in (0, 1, 2):
        reason = f"QoS must be 0, 1 or 2, not {qos!r}"
    elif size > _MAX_PAYLOAD:
        reason = f"the payload has {size} bytes, more than MQTT allows ({_MAX_PAYLOAD})"
    if reason is not None:
        raise PublishError(f"cannot publish to {topic!r}: {reason}")


def _wait(event: threading.Event, timeout: float) -> bool:
    """``event.wait(timeout)`` for any timeout (threading refuses more than TIMEOUT_MAX)."""
    deadline = time.monotonic() + max(0.0, timeout)
    while not event.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        event.wait(min(remaining, _MAX_WAIT))
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
