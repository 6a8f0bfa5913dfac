"""The agent clients' wire: our transport (whole-request deadline, one stdlib error table) and
the httpx error table for a caller's own httpx transport; real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from keeper_task.agent._http import AgentHttp
from keeper_task.agent._transport import AgentTransport, ConnectFailedError
from keeper_task.errors import (
    AgentNotListeningError,
    AgentTimeoutError,
    AgentUnreachableError,
    SettingsError,
)
from keeper_task.tls import client_ssl_context
from tests.support.https import HttpsServer, Request, Response

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[HttpsServer]:
    with HttpsServer(trustme.CA()) as srv:
        srv.route("GET", r"/echo(\?.*)?", lambda r: Response(200, {"path": r.path}))
        srv.route("POST", r"/echo", lambda r: Response(201, {"body": r.json()}))
        srv.route("GET", r"/close", Response(200, {"closing": True}, {"Connection": "close"}))
        yield srv


def _client(server: HttpsServer, timeout: httpx.Timeout | float = 5.0) -> httpx.Client:
    ctx = client_ssl_context(host="127.0.0.1")
    return httpx.Client(
        base_url=server.base_url,
        transport=AgentTransport(ssl_context=ctx),
        timeout=timeout,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_requests_round_trip_and_survive_a_server_close(server: HttpsServer) -> None:
    """GET/POST round-trip; a `Connection: close` answer is followed by a fresh connection."""
    with _client(server) as client:
        assert client.get("/echo").json() == {"path": "/echo"}
        assert client.post("/echo", json={"a": 1}).status_code == 201
        assert client.get("/close").json() == {"closing": True}
        assert client.get("/echo?x=%2F").json() == {"path": "/echo?x=%2F"}
    assert [r.method for r in server.requests] == ["GET", "POST", "GET", "GET"]


def test_refused_port_is_agent_not_listening_from_the_socket_error() -> None:
    """Nothing listening: AgentNotListeningError, raised from ConnectionRefusedError."""
    port = _closed_port()
    ctx = client_ssl_context(host="127.0.0.1")
    with (
        httpx.Client(transport=AgentTransport(ssl_context=ctx)) as client,
        pytest.raises(AgentNotListeningError) as info,
    ):
        client.get(f"https://127.0.0.1:{port}/")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert f"https://127.0.0.1:{port}: connection refused" in str(info.value)
    assert info.value.exit_code == 69


def test_silent_server_is_a_timeout_within_the_request_timeout() -> None:
    """A server that accepts and never answers ends in AgentTimeoutError, within a small
    multiple of the timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        done.wait(10)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with (
            httpx.Client(transport=AgentTransport(ssl_context=None), timeout=0.3) as client,
            pytest.raises(AgentTimeoutError) as info,
        ):
            started = time.monotonic()
            try:
                client.get(f"http://127.0.0.1:{port}/")
            finally:
                elapsed = time.monotonic() - started
    finally:
        done.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert "did not finish within 0.3 s" in str(info.value)
    assert 0.3 <= elapsed < 0.3 * 10


@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers"])
def test_drip_fed_answer_ends_at_the_deadline_and_the_next_request_works(
    server: HttpsServer, drip_headers: bool
) -> None:
    """One byte per 0.1 s never trips a per-read timeout, but the whole-request deadline ends
    it; the connection is dropped and the next request gets a fresh one."""
    server.route(
        "GET", r"/drip", Response(200, {"k": "v" * 100}, drip=0.1, drip_headers=drip_headers)
    )
    timeout = 0.6
    with _client(server, timeout=timeout) as client:
        started = time.monotonic()
        with pytest.raises(AgentTimeoutError) as info:
            client.get("/drip")
        elapsed = time.monotonic() - started
        assert client.get("/echo").json() == {"path": "/echo"}
    assert timeout <= elapsed < 3 * timeout
    assert server.dripped > 0
    assert isinstance(info.value.__cause__, OSError | http.client.HTTPException)


def test_a_body_cut_short_by_the_server_is_an_error_not_a_short_body() -> None:
    """A server that promises 100 bytes and hangs up after 3: an error, never 3 bytes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with (
            httpx.Client(transport=AgentTransport(ssl_context=None), timeout=5) as client,
            pytest.raises(AgentUnreachableError, match="closed the connection") as info,
        ):
            client.get(f"http://127.0.0.1:{port}/")
    finally:
        thread.join(5)
        listener.close()
    assert isinstance(info.value.__cause__, http.client.IncompleteRead)


def test_pool_timeout_bounds_the_wait_for_the_busy_connection(server: HttpsServer) -> None:
    """A second request waiting for the one connection gives up after the pool timeout,
    while the first still holds it (the server saw only the first)."""
    release = threading.Event()
    entered = threading.Event()

    def slow(_r: Request) -> Response:
        entered.set()
        release.wait(10)
        return Response(200, {"slow": True})

    server.route("GET", r"/slow", slow)
    with _client(server, timeout=httpx.Timeout(10.0, pool=0.2)) as client:
        first: list[int] = []
        thread = threading.Thread(target=lambda: first.append(client.get("/slow").status_code))
        thread.start()
        try:
            assert entered.wait(10)
            with pytest.raises(AgentTimeoutError):
                client.get("/echo")
            assert [r.path for r in server.requests] == ["/slow"]
        finally:
            release.set()
            thread.join(10)
    assert first == [200]


def test_wrong_server_certificate_is_one_error_naming_the_ssl_reason_once(
    server: HttpsServer, tmp_path: Path
) -> None:
    """A server certificate our CA bundle does not trust fails the handshake: ConnectFailedError
    from ssl.SSLCertVerificationError, whose reason the message says once."""
    other = trustme.CA()
    bundle = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(bundle))
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=bundle)
    with (
        httpx.Client(transport=AgentTransport(ssl_context=ctx)) as client,
        pytest.raises(ConnectFailedError) as info,
    ):
        client.get(f"{server.base_url}/echo")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert str(info.value).count("CERTIFICATE_VERIFY_FAILED") == 1


def test_a_plugin_settings_call_does_not_import_httpcore(server: HttpsServer) -> None:
    """A task's settings fetch never loads httpcore/h11/anyio (part of the transport choice)."""
    server.route("GET", r"/api/PluginSettings/KeeperPrivilegeManager", Response(200, {"a": "b"}))
    code = (
        "import json, sys\n"
        "from keeper_task import PluginSettingsClient\n"
        f"with PluginSettingsClient({server.base_url!r}) as c:\n"
        "    got = c.get_all('KeeperPrivilegeManager')\n"
        "print(json.dumps([got, sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('httpcore', 'h11', 'anyio'))]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    got, loaded = json.loads(out)
    assert got == {"a": "b"}
    assert loaded == []


def test_request_shape_on_the_wire(server: HttpsServer) -> None:
    """Headers set by httpx (Host, Content-Type, Content-Length) reach the server as sent."""
    captured: list[Request] = []
    server.route("PUT", r"/put", lambda r: (captured.append(r), Response(200, {}))[1])
    with _client(server) as client:
        client.put("/put", content=b'{"value": 1}', headers={"Content-Type": "application/json"})
    (req,) = captured
    assert req.body == b'{"value": 1}'
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Host"] == server.base_url.removeprefix("https://")


# --- the httpx table: a caller's own httpx transport -----------------------------------------


def _raising(exc: Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("raised", "expected", "words"),
    [
        (httpx.ReadTimeout("slow"), AgentTimeoutError, "did not finish within 2 s"),
        (httpx.ConnectTimeout("slow"), AgentTimeoutError, "did not finish within 2 s"),
        (httpx.ReadError("reset"), AgentUnreachableError, "closed the connection (reset)"),
        (httpx.RemoteProtocolError("bad"), AgentUnreachableError, "closed the connection"),
        (httpx.UnsupportedProtocol("ftp"), AgentUnreachableError, "failed: ftp"),
    ],
)
def test_httpx_errors_map_once_to_our_tree(
    raised: httpx.HTTPError, expected: type[Exception], words: str
) -> None:
    """Each httpx error from a caller's transport becomes one of our errors, from the original."""
    with (
        AgentHttp("https://127.0.0.1:6889", transport=_raising(raised), timeout=2.0) as http_,
        pytest.raises(expected) as info,
    ):
        http_.request("GET", "/api/x")
    assert info.value.__cause__ is raised
    assert words in str(info.value)


def test_httpx_transport_refused_is_agent_not_listening() -> None:
    """httpx's own transport on a closed port: the refusal is found behind httpx.ConnectError."""
    port = _closed_port()
    transport = httpx.HTTPTransport(verify=client_ssl_context(host="127.0.0.1"))
    with (
        AgentHttp(f"https://127.0.0.1:{port}", transport=transport) as http_,
        pytest.raises(AgentNotListeningError) as info,
    ):
        http_.request("GET", "/api/x")
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e10, True])
def test_a_timeout_out_of_range_is_a_settings_error_before_any_request(timeout: float) -> None:
    """A client timeout outside 0 < t <= 86400 (nan, inf, 1e10 ...) is refused at once (78),
    never an OverflowError from a socket or a timer later."""
    with pytest.raises(SettingsError) as info:
        AgentHttp("https://127.0.0.1:6889", timeout=timeout)
    assert info.value.exit_code == 78
    assert "0 < timeout <= 86400" in str(info.value)
