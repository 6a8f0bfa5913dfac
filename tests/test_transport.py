"""The stdlib httpx transport used for the agent's API: keep-alive, errors, import cost."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from keeper_task.agent._transport import StdlibTransport
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


def _client(server: HttpsServer, **kw: float) -> httpx.Client:
    ctx = client_ssl_context(host="127.0.0.1")
    return httpx.Client(
        base_url=server.base_url,
        transport=StdlibTransport(ssl_context=ctx),
        timeout=httpx.Timeout(kw.get("timeout", 5.0)),
    )


def test_requests_round_trip_and_survive_a_server_close(server: HttpsServer) -> None:
    """GET/POST round-trip; a `Connection: close` answer is followed by a fresh connection."""
    with _client(server) as client:
        assert client.get("/echo").json() == {"path": "/echo"}
        assert client.post("/echo", json={"a": 1}).status_code == 201
        assert client.get("/close").json() == {"closing": True}
        assert client.get("/echo?x=%2F").json() == {"path": "/echo?x=%2F"}
    assert [r.method for r in server.requests] == ["GET", "POST", "GET", "GET"]


def test_refused_port_is_a_connect_error() -> None:
    """Nothing listening: httpx.ConnectError, as with httpx's own transport."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = client_ssl_context(host="127.0.0.1")
    with (
        httpx.Client(transport=StdlibTransport(ssl_context=ctx)) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(f"https://127.0.0.1:{port}/")


def test_silent_server_is_a_read_timeout() -> None:
    """A server that accepts and never answers ends in httpx.ReadTimeout within the timeout."""
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
            httpx.Client(transport=StdlibTransport(ssl_context=None), timeout=0.3) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.get(f"http://127.0.0.1:{port}/")
    finally:
        done.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_wrong_server_certificate_is_a_connect_error_carrying_the_ssl_error(
    server: HttpsServer, tmp_path: Path
) -> None:
    """A server certificate our CA bundle does not trust fails the handshake: ConnectError
    chained to ssl.SSLCertVerificationError (what the error mapping looks for)."""
    other = trustme.CA()
    bundle = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(bundle))
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=bundle)
    with (
        httpx.Client(transport=StdlibTransport(ssl_context=ctx)) as client,
        pytest.raises(httpx.ConnectError) as info,
    ):
        client.get(f"{server.base_url}/echo")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


def test_a_plugin_settings_call_does_not_import_httpcore(server: HttpsServer) -> None:
    """The point of the transport: a task's settings fetch never loads httpcore/h11/anyio."""
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
