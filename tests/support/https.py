"""A real HTTPS server on 127.0.0.1 with throwaway certificates, for client tests.

Routes are plain functions; every request is recorded. With ``client_ca`` the server requires
a client certificate issued by that CA (mutual TLS, like the agent's Admin tier).
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peercert: dict[str, Any] | None
    match: re.Match[str] | None = None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes/str sent as is
    headers: dict[str, str] = field(default_factory=dict)
    #: Fault: send one byte every ``drip`` seconds (the body; with ``drip_headers`` the
    #: status line and headers too) until done, the client hangs up, or the server stops.
    drip: float | None = None
    drip_headers: bool = False


Handler = Callable[[Request], Response]


class HttpsServer:
    """Threaded HTTPS server; use as a context manager.

    Attributes:
        base_url: ``https://127.0.0.1:<port>``.
        requests: Every request received, in order.
    """

    def __init__(
        self,
        ca: trustme.CA,
        *,
        client_ca: trustme.CA | None = None,
        hostnames: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        self.ca = ca
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self.dripped = 0  # bytes sent by dripping responses
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*hostnames).configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._server = _OwnedServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.base_url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def route(self, method: str, pattern: str, handler: Handler | Response) -> None:
        """Add a route; ``pattern`` is a regex matched against the whole path."""
        h: Handler = handler if callable(handler) else (lambda _r, _resp=handler: _resp)
        self.routes.insert(0, (method.upper(), re.compile(pattern), h))

    def _dispatch(self, req: Request) -> Response:
        for method, pattern, handler in self.routes:
            m = pattern.fullmatch(req.path)
            if m and method == req.method:
                req.match = m
                return handler(req)
        return Response(404, {"error": "no route"})

    def write_ca(self, directory: Path) -> Path:
        path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def __enter__(self) -> HttpsServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if exc_type is None and self._server.errors:
            raise self._server.errors[0]  # a bug in a test's route fails that test


class _OwnedServer(ThreadingHTTPServer):
    owner: HttpsServer
    errors: list[BaseException]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client going away mid-request is routine here; anything else is kept.

        socketserver would print every handler exception to stderr — often after the test's
        output capture ended — so a client that gives up (a timeout under test, a task that
        was killed) showed as a stray "Exception occurred during processing of request".
        """
        exc = sys.exc_info()[1]
        if exc is None or isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            return
        self.errors.append(exc)


def _encode(payload: Any) -> tuple[bytes, str]:
    """The body bytes and their content type."""
    if isinstance(payload, bytes):
        return payload, "application/json"
    if isinstance(payload, str):
        return payload.encode(), "text/plain"
    if payload is None:
        return b"", "application/json"
    return json.dumps(payload).encode(), "application/json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle on, the body waits for a delayed ACK.
    disable_nagle_algorithm = True
    server: _OwnedServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        outer = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        sock = self.connection
        peercert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        req = Request(self.command, self.path, dict(self.headers), body, peercert)
        with outer._lock:
            outer.requests.append(req)
        resp = outer._dispatch(req)
        data, ctype = _encode(resp.body)
        if resp.drip is not None:
            self._drip(resp, data, ctype)
            return
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.headers.get("Content-Type", ctype))
        self.send_header("Content-Length", str(len(data)))
        for k, v in resp.headers.items():
            if k != "Content-Type":
                self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _drip(self, resp: Response, data: bytes, ctype: str) -> None:
        outer = self.server.owner
        head = (
            f"HTTP/1.1 {resp.status} Dripping\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        slow = head + data if resp.drip_headers else data
        self.close_connection = True
        try:
            if not resp.drip_headers:
                self.wfile.write(head)
            for i in range(len(slow)):
                if outer.stopping.wait(resp.drip or 0.0):
                    return
                self.wfile.write(slow[i : i + 1])
                with outer._lock:
                    outer.dripped += 1
        except OSError:
            return  # the client gave up: what the fault is there to provoke

    do_GET = do_POST = do_PUT = do_DELETE = _handle
