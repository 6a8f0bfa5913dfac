"""An httpx transport over the standard library's ``http.client``, for the agent's API.

The agent's API is HTTP/1.1 on loopback, a handful of small JSON requests per run. httpx's
default transport pulls in httpcore, h11 and anyio on first use: about 15 ms of every task's
cold start (``benchmarks/cold_start.py``), while ``http.client`` is already imported by httpx
itself. Callers still use httpx (its client, request/response model, ``MockTransport``); only
the wire is different.

Errors are raised as the httpx exceptions httpcore would raise, chained ``from`` the socket or
:mod:`ssl` error, so the one error-mapping boundary (:mod:`keeper_task.agent._http`) treats
both transports alike.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
from typing import Any

import httpx

__all__ = ["StdlibTransport"]


class StdlibTransport(httpx.BaseTransport):
    """One keep-alive HTTPS (or HTTP) connection per origin, requests serialised.

    Args:
        ssl_context: The context for ``https`` URLs (our TLS policy; never certifi).
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the whole response (bodies here are small)."""
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = request.read()
        url = request.url
        target = url.raw_path.decode("ascii")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        with self._lock:
            conn = self._connection(url, timeouts.get("connect"))
            try:
                conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body or None)
            except TimeoutError as exc:
                self._drop()
                raise httpx.WriteTimeout(str(exc) or "write timed out", request=request) from exc
            except OSError as exc:
                # The server may have refused us and closed first (a TLS 1.3 client
                # certificate check ends with an alert after the handshake): its reason is
                # on the read side, so surface that rather than the broken pipe.
                alert = _pending_error(conn)
                self._drop()
                if alert is not None:
                    raise httpx.ReadError(_text(alert), request=request) from alert
                raise httpx.WriteError(_text(exc), request=request) from exc
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeouts.get("read"))
                response = conn.getresponse()
                content = response.read()
            except TimeoutError as exc:
                self._drop()
                raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
            except (http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                self._drop()
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=request
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise httpx.ReadError(_text(exc), request=request) from exc
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

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._drop()

    def _connection(self, url: httpx.URL, timeout: float | None) -> http.client.HTTPConnection:
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        conn = self._conn
        if conn is not None and (origin != self._origin or _stale(conn)):
            self._drop()
            conn = None
        if conn is not None:
            return conn
        scheme, host, port = origin
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl_context
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()  # TCP_NODELAY is set by http.client itself
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise httpx.ConnectError(_text(exc)) from exc
        self._conn, self._origin = conn, origin
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._origin = None


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


def _pending_error(conn: http.client.HTTPConnection) -> OSError | None:
    """Read what the server sent before it closed; return the error that reading raises."""
    sock: Any = conn.sock
    if sock is None:
        return None
    try:
        sock.settimeout(1.0)
        sock.recv(1)
    except OSError as exc:  # ssl.SSLError is an OSError
        return exc
    return None


def _text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"[SSL: {exc.reason}] {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
