"""The wire under the agent clients: one small HTTP/1.1 transport with a whole-request deadline.

Why our own transport and not ``httpx.HTTPTransport`` (decided by measurement and by what the
timeout must mean; ``benchmarks/cold_start.py`` runs the hello task both ways in one run):

* **The timeout bounds the whole request.** ``--http-timeout`` is one monotonic deadline for
  connect + TLS handshake + request + headers + the whole body. httpcore's timeouts apply
  per socket operation, so an agent that drips its answer one byte at a time never trips
  them; this transport owns its socket and shuts it down when the deadline passes, whatever
  the request is blocked in. httpx's own transport has no public way to do that.
* **One error boundary.** Socket, :mod:`ssl` and :mod:`http.client` errors are mapped here,
  by one table (:data:`_ERRORS`), straight into :mod:`keeper_task.errors`, each re-raised
  ``from`` the original. (An httpx transport passed in by a caller, ``MockTransport`` for
  example, raises httpx errors; :mod:`keeper_task.agent._http` maps those with its own table.)
* **Start-up cost.** httpcore, h11 and anyio are never imported. Measured on the shared
  2-core machine (``benchmarks/cold_start.py``, 31 rounds, load average ~4): building
  ``httpx.HTTPTransport`` costs 22 ms (median; 17 ms at best) in a process that has already
  imported keeper-task, ours 0 ms; the whole task start on httpx's transport (row ``a2``) was
  60-65 ms slower than on ours (median of per-round differences, two runs). Never slower, so
  the deadline above decides.

httpx's ``Timeout`` is honoured as follows: the request's deadline is the largest of its
connect/read/write values; each phase is also capped by its own value; ``pool`` bounds the
wait for the (single, keep-alive) connection another thread is using.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
from typing import Any

import httpx

from keeper_task.errors import AgentNotListeningError, AgentTimeoutError, AgentUnreachableError
from keeper_task.signals import start_shielded

__all__ = [
    "AgentTransport",
    "ConnectFailedError",
    "ConnectionDroppedError",
    "agent_error",
]


class ConnectFailedError(AgentUnreachableError):
    """The TCP connection or the TLS handshake failed (other than refused or timed out)."""


class ConnectionDroppedError(AgentUnreachableError):
    """The agent closed or reset the connection after it was set up, before answering."""


# --- one error table ----------------------------------------------------------------------

#: What each kind of failure is called, and the class raised for it.
_KINDS: dict[str, type[AgentUnreachableError]] = {
    "timeout": AgentTimeoutError,
    "refused": AgentNotListeningError,
    "certificate": ConnectFailedError,
    "connect": ConnectFailedError,
    "dropped": ConnectionDroppedError,
}

#: stdlib error raised in a phase -> kind; first match wins (``None`` matches any phase).
_ERRORS: tuple[tuple[type[BaseException], str | None, str], ...] = (
    (TimeoutError, None, "timeout"),
    (ConnectionRefusedError, "connect", "refused"),
    (ssl.SSLCertVerificationError, "connect", "certificate"),
    (OSError, "connect", "connect"),
    (http.client.HTTPException, None, "dropped"),
    (OSError, None, "dropped"),
)


def agent_error(
    kind: str, *, method: str, url: str, reason: str, timeout: float | None
) -> AgentUnreachableError:
    """Build the error for a failure ``kind`` (both error tables end here)."""
    origin = _origin_text(url)
    messages = {
        "timeout": f"{method} {url} timed out: it did not finish within {timeout or 0:g} s "
        "(connect, TLS, headers and whole body; --http-timeout); is the agent running and "
        "listening there?",
        "refused": f"cannot connect to the agent at {origin}: connection refused; check the "
        "port (Settings:KestrelHttpsPort) and that the agent service runs",
        "certificate": f"TLS certificate of the agent at {origin} was not accepted ({reason}); "
        "pass the CA bundle your administrator exported (--ca-bundle), or none to use "
        "unverified TLS on loopback",
        "connect": f"cannot connect to the agent at {origin}: {reason}; check the port "
        "(Settings:KestrelHttpsPort) and that the agent service runs",
        "dropped": f"the agent at {origin} closed the connection ({reason}); if this is an "
        "Admin-tier call, the client certificate was probably rejected",
    }
    return _KINDS[kind](messages[kind], url=url)


def _kind_of(exc: BaseException, phase: str) -> str:
    for exc_type, where, kind in _ERRORS:
        if isinstance(exc, exc_type) and where in (None, phase):
            return kind
    return "dropped"


# --- the whole-request deadline -------------------------------------------------------------


class _Deadline:
    """One monotonic deadline; when it passes, the watched connection is shut down.

    ``shutdown()`` from another thread wakes a ``recv``/``send``/handshake blocked in this
    one (``close()`` would not), so no phase can outlive the deadline by more than the
    watchdog thread's wake-up latency.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self.expired = False
        self.phase = "pool"  # where the request is: pool, connect, write, read
        self._lock = threading.Lock()
        self._guard: socket.socket | None = None
        self._timer: threading.Timer | None = None

    def left(self, cap: float | None = None) -> float | None:
        """Seconds left, capped at ``cap``; raises ``TimeoutError`` once nothing is left."""
        if self.end is None:
            return cap
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("deadline passed")
        return left if cap is None else min(cap, left)

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down when the deadline passes."""
        if self.end is None:
            return
        # A duplicate descriptor of the same connection (SSLSocket has no dup()): a TLS wrap
        # replaces the socket object, but shutting down any descriptor ends the connection.
        self._guard = socket.fromfd(sock.fileno(), sock.family, sock.type)
        self._timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._fire)
        self._timer.daemon = True
        start_shielded(self._timer)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._guard is not None:
                # Already closed by the server: the blocked call returns anyway.
                with contextlib.suppress(OSError):
                    self._guard.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        """Stop watching (the request ended)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._guard is not None:
                self._guard.close()
                self._guard = None


# --- the transport ------------------------------------------------------------------------


class AgentTransport(httpx.BaseTransport):
    """One keep-alive HTTPS (or HTTP) connection per origin; requests are serialised.

    Args:
        ssl_context: The context for ``https`` URLs (our TLS policy; never certifi).
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; return the whole response, or raise a mapped agent error."""
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        phases = [timeouts.get(k) for k in ("connect", "write", "read")]
        deadline = _Deadline(max((t for t in phases if t is not None), default=None))
        try:
            self._acquire(deadline, timeouts.get("pool"))
            try:
                return self._exchange(request, deadline, timeouts)
            except BaseException:
                self._drop()  # the connection's state is unknown: never reuse it
                raise
            finally:
                self._lock.release()
        except (OSError, http.client.HTTPException) as exc:
            kind = "timeout" if deadline.expired else _kind_of(exc, deadline.phase)
            raise agent_error(
                kind,
                method=request.method,
                url=str(request.url),
                reason=_text(exc),
                timeout=deadline.seconds,
            ) from exc
        finally:
            deadline.cancel()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()

    # --- steps ------------------------------------------------------------------------------

    def _acquire(self, deadline: _Deadline, pool: float | None) -> None:
        wait = deadline.left(pool)
        if not self._lock.acquire(timeout=-1 if wait is None else wait):
            raise TimeoutError("waited too long for the connection another request is using")

    def _exchange(
        self, request: httpx.Request, deadline: _Deadline, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        url = request.url
        body = request.read()
        deadline.phase = "connect"
        conn, sock = self._connection(url, deadline, timeouts.get("connect"))
        deadline.phase = "write"
        try:
            sock.settimeout(deadline.left(timeouts.get("write")))
            target = url.raw_path.decode("ascii")
            conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.raw:
                conn.putheader(name.decode("latin-1"), value.decode("latin-1"))
            conn.endheaders(body or None)
        except OSError as exc:
            # The server may have refused us and closed first (a TLS 1.3 client-certificate
            # check ends with an alert after the handshake): its reason is on the read side.
            alert = _pending_error(sock, deadline)
            if alert is None:
                raise
            raise alert from exc
        deadline.phase = "read"
        sock.settimeout(deadline.left(timeouts.get("read")))
        response = conn.getresponse()
        content = _read_body(response, sock, deadline, timeouts.get("read"))
        if response.will_close:
            self._drop()
        return httpx.Response(
            status_code=response.status,
            headers=response.getheaders(),
            content=content,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": response.reason.encode("latin-1", "replace"),
            },
        )

    def _connection(
        self, url: httpx.URL, deadline: _Deadline, connect_timeout: float | None
    ) -> tuple[http.client.HTTPConnection, socket.socket]:
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        if self._conn is not None and (origin != self._origin or _stale(self._conn)):
            self._drop()
        if self._conn is not None and self._conn.sock is not None:
            deadline.watch(self._conn.sock)
            return self._conn, self._conn.sock
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=deadline.left(connect_timeout))
        try:
            deadline.watch(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                context = self._ssl_context or ssl.create_default_context()
                sock.settimeout(deadline.left(connect_timeout))
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn = http.client.HTTPConnection(host, port)
        conn.sock = sock
        self._conn, self._origin = conn, origin
        return conn, sock

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._origin = None


def _read_body(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    deadline: _Deadline,
    read_timeout: float | None,
) -> bytes:
    """Read the whole body, one socket read at a time, each bounded by what is left."""
    chunks: list[bytes] = []
    while True:
        sock.settimeout(deadline.left(read_timeout))
        chunk = response.read1(65536)
        if chunk:
            chunks.append(chunk)
            continue
        # An end of data is only the end of the body if all of it came: the deadline's
        # shutdown, or a server hanging up mid-body, also reads as end of data.
        if deadline.expired:
            raise TimeoutError("the deadline passed while the body was read")
        if response.length:
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        response.close()  # marks the exchange finished, so the connection can be reused
        return b"".join(chunks)


def _stale(conn: http.client.HTTPConnection) -> bool:
    """True when the idle connection was closed by the server (readable means EOF here)."""
    sock: Any = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _pending_error(sock: socket.socket, deadline: _Deadline) -> OSError | None:
    """Read what the server sent before it closed; return the error that reading raises."""
    try:
        sock.settimeout(deadline.left(1.0))
        sock.recv(1)
    except OSError as exc:  # ssl.SSLError is an OSError
        return exc
    return None


def _origin_text(url: str) -> str:
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        # str() of an SSLError already carries "[SSL: REASON]"; add it only when missing.
        text = str(exc)
        return text if exc.reason in text else f"[SSL: {exc.reason}] {text}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
