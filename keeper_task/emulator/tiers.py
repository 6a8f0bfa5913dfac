"""Who may call what: the agent's authorization tiers, reproduced.

* **Public**: anyone on loopback.
* **Plugin**: a process the emulator launched (a job task) or one of its descendants (a
  PyInstaller onefile binary re-executes itself as a child), once registered. Registration
  lands ``register_delay`` seconds after the launch, reproducing the agent's startup 403.
  The caller is identified from its loopback socket: the peer's port is looked up among the
  TCP connections of the registered PIDs and their descendants only (cheap: a handful of
  processes), never by scanning every process.
* **Admin**: a client certificate issued by the emulator's admin CA. TLS accepts any client
  certificate (:mod:`keeper_task.emulator.tls_front`) and checks it against the admin CA; a
  missing or foreign certificate gets 403 on this tier only.

``trust_pids`` adds processes trusted as if launched (the test process itself, for tasks run
in-process by :mod:`keeper_task.testing`). It is empty unless a caller sets it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

__all__ = ["FORBIDDEN_MESSAGES", "ProcessRegistry", "Tier"]


class Tier(str, enum.Enum):
    """The agent's authorization tiers."""

    PUBLIC = "Public"
    PLUGIN = "Plugin"
    ADMIN = "Admin"


#: The 403 body's message per required tier: the agent's documented meaning.
FORBIDDEN_MESSAGES = {
    Tier.PLUGIN: (
        "Process is not Plugin-authenticated: it was not started by the agent, or it has not "
        "yet been registered in the launched-process registry. Retry on startup."
    ),
    Tier.ADMIN: (
        "Admin credentials not provided or not accepted: present a client certificate issued "
        "by the agent's admin CA."
    ),
}


@dataclass
class _Launched:
    job_id: str
    registered_at: float  # time.monotonic() when the registration lands


class ProcessRegistry:
    """The launched-process registry plus explicitly trusted PIDs.

    Args:
        trust_pids: PIDs trusted as if launched by the emulator (never set by default).
    """

    def __init__(self, trust_pids: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self._launched: dict[int, _Launched] = {}
        self._trusted: dict[int, int] = {}  # pid -> reference count
        for pid in trust_pids:
            self._trusted[pid] = self._trusted.get(pid, 0) + 1

    def register(self, pid: int, job_id: str, *, delay: float = 0.0) -> None:
        """Register a launched PID; it is trusted once ``delay`` seconds have passed."""
        with self._lock:
            self._launched[pid] = _Launched(job_id, time.monotonic() + max(0.0, delay))

    def unregister(self, pid: int) -> None:
        """Forget a launched PID (its process ended)."""
        with self._lock:
            self._launched.pop(pid, None)

    @contextmanager
    def trusting(self, pid: int) -> Iterator[None]:
        """Trust ``pid`` (for example ``os.getpid()``) inside the ``with`` block."""
        with self._lock:
            self._trusted[pid] = self._trusted.get(pid, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._trusted.get(pid, 1) - 1
                if left <= 0:
                    self._trusted.pop(pid, None)
                else:
                    self._trusted[pid] = left

    def job_of(self, pid: int) -> str | None:
        """The job id a launched PID belongs to."""
        with self._lock:
            entry = self._launched.get(pid)
            return entry.job_id if entry else None

    def _roots(self) -> tuple[list[int], list[int]]:
        """(registered roots, roots still inside their registration delay)."""
        now = time.monotonic()
        with self._lock:
            ready = [p for p, e in self._launched.items() if e.registered_at <= now]
            pending = [p for p, e in self._launched.items() if e.registered_at > now]
            ready.extend(self._trusted)
        return ready, pending

    def identify(self, peer_port: int, local_port: int) -> tuple[int | None, bool]:
        """Find the process behind a loopback connection.

        Args:
            peer_port: The client's source port.
            local_port: The server port it connected to.

        Returns:
            ``(pid, trusted)``: the PID among launched/trusted processes and their
            descendants that owns the client socket (None when it is none of them), and
            whether that PID is registered (False during the registration delay).
        """
        ready, pending = self._roots()
        for roots, trusted in ((ready, True), (pending, False)):
            for pid in _with_descendants(roots):
                if _owns_connection(pid, peer_port, local_port):
                    return pid, trusted
        return None, False


def _with_descendants(roots: Iterable[int]) -> list[int]:
    seen: list[int] = []
    for root in roots:
        if root in seen:
            continue
        seen.append(root)
        try:
            children = psutil.Process(root).children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seen.extend(c.pid for c in children if c.pid not in seen)
    return seen


def _owns_connection(pid: int, peer_port: int, local_port: int) -> bool:
    """Whether ``pid`` holds the client end of the loopback connection peer_port->local_port."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    for conn in conns:
        if not conn.laddr or not conn.raddr:
            continue
        if conn.laddr.port == peer_port and conn.raddr.port == local_port:
            return True
    return False
