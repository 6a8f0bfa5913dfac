"""What the emulator records: broker messages, denied operations, API requests, task output.

Every record goes through one :class:`Recorder`, which keeps it, wakes threads waiting on a
condition (:meth:`Recorder.wait_for`: tests wait on conditions, never sleep) and calls the
listeners (``keeper-task dev`` prints each record as one line).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "KEEPER_LOGGER_TOPIC",
    "BrokerMessage",
    "DeniedOperation",
    "Notice",
    "OutputLine",
    "Record",
    "Recorder",
    "RequestRecord",
]

#: The topic the agent's KeeperLogger component subscribes to.
KEEPER_LOGGER_TOPIC = "KeeperLogger"


@dataclass(frozen=True)
class BrokerMessage:
    """One publish the broker accepted.

    Attributes:
        topic: The topic.
        payload: The raw payload.
        client_id: The publisher's client id (None when the broker does not tell: mosquitto,
            external brokers).
        job_id: The job the client id names (first ``_``-separated segment), if any.
        qos: The publish QoS.
        retain: The retain flag.
        time: ``time.time()`` when recorded.
    """

    topic: str
    payload: bytes
    client_id: str | None = None
    job_id: str | None = None
    qos: int = 0
    retain: bool = False
    time: float = field(default_factory=time.time)

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (invalid bytes replaced)."""
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.payload)


@dataclass(frozen=True)
class DeniedOperation:
    """A connection, publish or subscription the broker refused.

    Attributes:
        action: ``"connect"``, ``"publish"`` or ``"subscribe"``.
        client_id: The client id.
        job_id: The job id read from the client id (None if it names no known job).
        topic: The topic or filter (None for ``connect``).
        reason: Why, in one sentence.
    """

    action: str
    client_id: str | None
    job_id: str | None
    topic: str | None
    reason: str
    time: float = field(default_factory=time.time)

    def describe(self) -> str:
        """One line for a human."""
        what = f"{self.action} to {self.topic!r}" if self.topic is not None else self.action
        return f"denied {what} by client {self.client_id!r}: {self.reason}"


@dataclass(frozen=True)
class RequestRecord:
    """One request to the emulator's HTTPS API.

    Attributes:
        method: HTTP method.
        path: The request path (no query string).
        status: The status code answered.
        tier: The tier the endpoint requires (``Public``, ``Plugin``, ``Admin``).
        caller: Who asked: ``"admin"``, ``"pid N"`` or ``"anonymous"``.
        pid: The caller's PID when it is a launched/trusted process.
        fault: The scripted fault that produced the answer, if any.
    """

    method: str
    path: str
    status: int
    tier: str
    caller: str
    pid: int | None = None
    fault: str | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class OutputLine:
    """One line a task wrote to stdout or stderr."""

    run_id: str
    task_id: str
    stream: str
    text: str
    pid: int | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Notice:
    """Something the emulator wants a human to know (an unsubstituted token, a skipped job
    file, a process a task left behind)."""

    text: str
    time: float = field(default_factory=time.time)


Record = Union[BrokerMessage, DeniedOperation, RequestRecord, OutputLine, Notice]  # noqa: UP007


class Recorder:
    """Keeps records, notifies listeners and wakes waiters. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[BrokerMessage] = []
        self.denied: list[DeniedOperation] = []
        self.requests: list[RequestRecord] = []
        self.output: list[OutputLine] = []
        self.notices: list[Notice] = []
        self._listeners: list[Callable[[Any], None]] = []

    def add_listener(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(record)`` for every new record (and for other events, such as
        run start/end); returns a function that removes it."""
        with self._cond:
            self._listeners.append(callback)

        def remove() -> None:
            with self._cond:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def add(self, record: Record) -> None:
        """Store ``record`` and notify."""
        with self._cond:
            if isinstance(record, BrokerMessage):
                self.messages.append(record)
            elif isinstance(record, DeniedOperation):
                self.denied.append(record)
            elif isinstance(record, RequestRecord):
                self.requests.append(record)
            elif isinstance(record, Notice):
                self.notices.append(record)
            else:
                self.output.append(record)
        self.emit(record)

    def emit(self, event: object) -> None:
        """Notify listeners and waiters of ``event`` without storing it."""
        with self._cond:
            listeners = list(self._listeners)
            self._cond.notify_all()
        for callback in listeners:
            callback(event)

    def notify(self) -> None:
        """Wake waiters (state changed outside the record lists)."""
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` is true or ``timeout`` seconds passed; return it."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout=timeout)

    def clear(self) -> None:
        """Forget every record."""
        with self._cond:
            self.messages.clear()
            self.denied.clear()
            self.requests.clear()
            self.output.clear()
            self.notices.clear()

    def logs(self) -> list[dict[str, Any]]:
        """Every ``KeeperLogger`` payload that parsed as a JSON object, in order."""
        with self._cond:
            messages = [m for m in self.messages if m.topic == KEEPER_LOGGER_TOPIC]
        out: list[dict[str, Any]] = []
        for message in messages:
            try:
                body = message.json()
            except ValueError:
                continue
            if isinstance(body, dict):
                out.append(body)
        return out
