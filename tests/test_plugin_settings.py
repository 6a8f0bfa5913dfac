"""Tests of PluginSettingsClient against a real HTTPS server on 127.0.0.1 (trustme certs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from structlog.testing import capture_logs

from keeper_task.agent.plugin_settings import PluginSettingsClient
from keeper_task.agent.retry import RetryPolicy, set_testing
from keeper_task.agent_settings import AgentSettings
from keeper_task.errors import (
    AgentNotListeningError,
    AgentResponseError,
    AgentTimeoutError,
    AgentUnreachableError,
    NotTrustedError,
    PluginNotFoundError,
    RequestRejectedError,
    SettingsError,
    ValidationFailedError,
)
from keeper_task.exit_codes import ExitCode
from keeper_task.tls import client_ssl_context
from tests.support.https import HttpsServer, Response
from tests.support.plugin_agent import PluginSettingsAgent

SECRET = "s3cr3t-value-never-logged"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    with set_testing(True):
        yield


@pytest.fixture(scope="module")
def server(ca: trustme.CA) -> Iterator[HttpsServer]:
    # One server per module: stopping one takes up to 0.5 s (serve_forever's poll interval).
    with HttpsServer(ca) as srv:
        yield srv


@pytest.fixture
def agent(server: HttpsServer) -> Iterator[PluginSettingsAgent]:
    server.routes.clear()
    server.requests.clear()
    fake = PluginSettingsAgent(
        server,
        {
            "KeeperPrivilegeManager": {
                "broker.host": "127.0.0.1",
                "broker.port": "8675",
                "api.token": SECRET,
            },
            "My Plugin/x": {"mode": "fast", "my setting": "on"},
        },
    )
    try:
        yield fake
    finally:
        fake.release.set()


@pytest.fixture
def client(agent: PluginSettingsAgent) -> Iterator[PluginSettingsClient]:
    with PluginSettingsClient(agent.server.base_url, retry=RetryPolicy(budget=5.0)) as c:
        yield c


def retry_events(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "agent.retry"]


# --- the six endpoints ------------------------------------------------------------------------


def test_get_all_returns_the_flat_string_map(agent, client):
    """get_all GETs /api/PluginSettings/{plugin} and returns the flat map of strings."""
    settings = client.get_all("KeeperPrivilegeManager")
    assert settings == {"broker.host": "127.0.0.1", "broker.port": "8675", "api.token": SECRET}
    assert [(r.method, r.path) for r in agent.requests] == [
        ("GET", "/api/PluginSettings/KeeperPrivilegeManager")
    ]


def test_get_all_feeds_agent_settings(agent, client):
    """The fetched map builds the typed view: broker port as int, unknown keys kept."""
    view = AgentSettings.from_map(client.get_all("KeeperPrivilegeManager"))
    assert (view.broker_host, view.broker_port) == ("127.0.0.1", 8675)
    assert view.get("api.token") == SECRET


def test_get_all_encodes_a_plugin_name_with_space_and_slash(agent, client):
    """Plugin names are one URL-encoded path segment: a space and a slash stay inside it."""
    assert client.get_all("My Plugin/x") == {"mode": "fast", "my setting": "on"}
    assert agent.requests[-1].path == "/api/PluginSettings/My%20Plugin%2Fx"


def test_get_all_converts_scalars_to_strings_and_drops_nulls(agent, client):
    """Numbers and booleans become their JSON text; a null value counts as not set."""
    agent.plugins["Typed"] = {"port": 8675, "tls": True, "ratio": 0.5, "unset": None}
    assert client.get_all("Typed") == {"port": "8675", "tls": "true", "ratio": "0.5"}


@pytest.mark.parametrize("body", [["a", "b"], b'"text"', 42])
def test_get_all_rejects_a_body_that_is_not_an_object(agent, client, body):
    """A JSON body other than an object is an AgentResponseError, and is not retried."""
    agent.fail(200, body=body)
    with pytest.raises(AgentResponseError, match="not the documented flat object"):
        client.get_all("KeeperPrivilegeManager")
    assert len(agent.requests) == 1


def test_get_all_rejects_a_nested_value_naming_the_key(agent, client):
    """A nested object value makes the map not flat: the error names the key, not the value."""
    agent.plugins["Nested"] = {"ok": "1", "deep": {"inner": SECRET}}
    with pytest.raises(AgentResponseError, match="key 'deep' holds a JSON object") as info:
        client.get_all("Nested")
    assert SECRET not in str(info.value)


def test_get_one_setting_encodes_both_segments(agent, client):
    """get GETs /api/PluginSettings/{plugin}/{setting} with both names URL-encoded."""
    assert client.get("My Plugin/x", "my setting") == "on"
    assert agent.requests[-1].method == "GET"
    assert agent.requests[-1].path == "/api/PluginSettings/My%20Plugin%2Fx/my%20setting"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (Response(200, b'"8675"'), "8675"),
        (Response(200, b"8675"), 8675),
        (Response(200, {"value": "8675"}), "8675"),
        (Response(200, {"Value": "8675", "key": "broker.port"}), "8675"),
        (Response(200, {"broker.port": "8675"}), "8675"),
        (Response(200, "8675"), "8675"),  # text/plain
        (Response(200, b"plain", headers={"Content-Type": "text/plain; charset=utf-8"}), "plain"),
        (Response(200, b"not json", headers={"Content-Type": ""}), "not json"),
        (Response(200, {"other": 1, "shape": 2}), {"other": 1, "shape": 2}),
    ],
)
def test_get_one_setting_accepts_each_plausible_response_shape(agent, client, response, expected):
    """The undocumented single-setting answer is read as scalar, {"value": ...} or text."""
    agent.setting_response = response
    assert client.get("KeeperPrivilegeManager", "broker.port") == expected


def test_get_one_setting_with_malformed_json_is_a_response_error(agent, client):
    """A JSON content type with a malformed body raises AgentResponseError, not retried."""
    agent.setting_response = Response(
        200, b'{"value": ', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(AgentResponseError, match="not valid JSON"):
        client.get("KeeperPrivilegeManager", "broker.port")
    assert len(agent.requests) == 1


def test_get_unknown_setting_is_not_found(agent, client):
    """A 404 on a single setting says the plugin or the setting does not exist."""
    with pytest.raises(PluginNotFoundError, match="setting 'nope' of plugin"):
        client.get("KeeperPrivilegeManager", "nope")


def test_put_sends_the_default_value_body(agent, client):
    """put PUTs JSON {"value": v} to /api/PluginSettings/{plugin}/{setting}."""
    client.put("My Plugin/x", "my setting", "off")
    req = agent.requests[-1]
    assert (req.method, req.path) == ("PUT", "/api/PluginSettings/My%20Plugin%2Fx/my%20setting")
    assert req.headers["Content-Type"] == "application/json"
    assert req.json() == {"value": "off"}
    assert agent.plugins["My Plugin/x"]["my setting"] == "off"


def test_put_body_shape_is_configurable(agent):
    """value_body builds another PluginSettingValue shape when an agent needs one."""
    with PluginSettingsClient(
        agent.server.base_url, value_body=lambda v: {"Value": v, "Type": "bool"}
    ) as c:
        c.put("KeeperPrivilegeManager", "feature.x", True)
    assert agent.puts == [("KeeperPrivilegeManager", "feature.x", {"Value": True, "Type": "bool"})]


def test_put_of_a_value_json_cannot_encode_is_a_type_error(agent, client):
    """A value that is not JSON-encodable fails before any request is sent."""
    with pytest.raises(TypeError, match="setting 'x' cannot be sent as JSON"):
        client.put("KeeperPrivilegeManager", "x", object())
    assert agent.requests == []


def test_put_rejected_with_400_is_a_validation_error_not_retried(agent, client):
    """A 400 on PUT is ValidationFailedError carrying the agent's errors, sent once; it ends
    a task with 70 (a request the agent rejects), never 69 ("agent unreachable")."""
    agent.fail(400, body={"errors": ["value must be a number"]})
    with pytest.raises(ValidationFailedError, match="value must be a number") as info:
        client.put("KeeperPrivilegeManager", "broker.port", "x")
    assert info.value.errors == ["value must be a number"]
    assert len(agent.requests) == 1
    assert info.value.exit_code == ExitCode.UNCAUGHT_EXCEPTION == 70


def test_revert_posts_to_the_plugin_revert_path(agent, client):
    """revert POSTs /api/PluginSettings/{plugin}/revert with no body."""
    client.revert("My Plugin/x")
    req = agent.requests[-1]
    assert (req.method, req.path, req.body) == (
        "POST",
        "/api/PluginSettings/My%20Plugin%2Fx/revert",
        b"",
    )
    assert agent.reverts == ["My Plugin/x"]


def test_revert_of_an_unknown_plugin_is_plugin_not_found(agent, client):
    """A 404 on revert is PluginNotFoundError like every plugin-level endpoint."""
    with pytest.raises(PluginNotFoundError, match="plugin 'Ghost' not found"):
        client.revert("Ghost")


def test_revert_all_posts_to_revert_all(agent, client):
    """revert_all POSTs /api/PluginSettings/revert-all."""
    client.revert_all()
    assert [(r.method, r.path) for r in agent.requests] == [
        ("POST", "/api/PluginSettings/revert-all")
    ]
    assert agent.reverts == ["*"]


def test_status_returns_the_parsed_json(agent, client):
    """status GETs /api/PluginSettings/{plugin}/status and returns its JSON unchanged."""
    agent.status_body = {"changed": True, "hash": "d41d8c", "files": ["a.json"]}
    assert client.status("My Plugin/x") == {"changed": True, "hash": "d41d8c", "files": ["a.json"]}
    assert agent.requests[-1].path == "/api/PluginSettings/My%20Plugin%2Fx/status"


def test_empty_plugin_name_is_refused_before_any_request(agent, client):
    """An empty plugin name is a SettingsError, not a request to the collection URL."""
    with pytest.raises(SettingsError, match="plugin name must be a non-empty string"):
        client.get_all("")
    assert agent.requests == []


# --- retry --------------------------------------------------------------------------------------


def test_startup_403_is_retried_then_succeeds_with_one_log_event_per_retry(agent, client):
    """403 for the first 3 requests, then 200: the call succeeds and logs 3 agent.retry events."""
    agent.fail(403, count=3)
    with capture_logs() as logs:
        settings = client.get_all("KeeperPrivilegeManager")
    assert settings["broker.port"] == "8675"
    assert len(agent.requests) == 4
    events = retry_events(logs)
    assert [e["attempt"] for e in events] == [1, 2, 3]
    assert all(e["log_level"] == "warning" for e in events)
    assert all(e["status"] == 403 for e in events)
    assert all(e["path"] == "/api/PluginSettings/KeeperPrivilegeManager" for e in events)
    assert all(0 <= e["delay"] <= 5.0 for e in events)
    assert SECRET not in repr(logs)


def test_403_forever_ends_in_not_trusted_after_the_budget(agent):
    """403 forever: past the budget, NotTrustedError (exit 77) says 'not launched by the agent'."""
    agent.fail(403)
    with (
        PluginSettingsClient(agent.server.base_url) as c,
        capture_logs() as logs,
        pytest.raises(NotTrustedError) as info,
    ):
        c.get_all("KeeperPrivilegeManager")
    attempts = len(agent.requests)
    assert attempts > 1
    assert len(retry_events(logs)) == attempts - 1
    message = str(info.value)
    assert "not launched by the agent" in message
    assert f"on {attempts} attempts over " in message
    assert info.value.exit_code == ExitCode.NOT_TRUSTED == 77
    assert info.value.status_code == 403
    assert isinstance(info.value.__cause__, NotTrustedError)


def test_403_after_the_process_was_trusted_is_not_retried(agent, client):
    """Once the agent answered, a 403 means a wrong tier (e.g. PUT on Admin), so no retry."""
    client.get_all("KeeperPrivilegeManager")
    agent.fail(403)
    with pytest.raises(NotTrustedError, match="Plugin tier"):
        client.put("KeeperPrivilegeManager", "x", "1")
    assert [r.method for r in agent.requests] == ["GET", "PUT"]


def test_404_is_plugin_not_found_and_not_retried(agent, client):
    """A 404 is PluginNotFoundError with the exact-name hint, exit 68, after one request."""
    with capture_logs() as logs, pytest.raises(PluginNotFoundError) as info:
        client.get_all("Ghost")
    assert str(info.value) == (
        "plugin 'Ghost' not found: no plugin of that name is registered with the agent; "
        "the name must match exactly"
    )
    assert info.value.exit_code == ExitCode.PLUGIN_NOT_FOUND
    assert len(agent.requests) == 1
    assert retry_events(logs) == []


@pytest.mark.parametrize(
    ("status", "error"), [(400, ValidationFailedError), (401, RequestRejectedError)]
)
def test_400_and_401_are_not_retried_and_exit_70(agent, client, status, error):
    """400 and 401 fail on the first request (waiting cannot fix them) and map to exit 70:
    the request is at fault, not the agent's availability (69)."""
    agent.fail(status)
    with pytest.raises(error) as info:
        client.get_all("KeeperPrivilegeManager")
    assert len(agent.requests) == 1
    assert info.value.exit_code == ExitCode.UNCAUGHT_EXCEPTION == 70
    assert info.value.status_code == status


def test_500_is_retried_then_succeeds(agent, client):
    """A 500 followed by 200 succeeds after one logged retry with status 500."""
    agent.fail(500, count=1)
    with capture_logs() as logs:
        assert client.status("KeeperPrivilegeManager") == {"changed": False, "hash": "abc123"}
    assert len(agent.requests) == 2
    assert [e["status"] for e in retry_events(logs)] == [500]


def test_5xx_forever_ends_in_agent_unreachable_with_attempt_count(agent, client):
    """5xx on every attempt gives AgentUnreachableError saying how many attempts were made."""
    agent.fail(503)
    with pytest.raises(AgentUnreachableError, match="gave up after") as info:
        client.revert_all()
    assert len(agent.requests) > 1
    assert info.value.status_code == 503


def test_malformed_json_is_a_response_error_and_not_retried(agent, client):
    """Malformed JSON is AgentResponseError after one request, and the body is not quoted."""
    agent.fail(200, body=b'{"broker.port": "8675", "api.token": "' + SECRET.encode())
    with capture_logs() as logs, pytest.raises(AgentResponseError, match="not valid JSON") as info:
        client.get_all("KeeperPrivilegeManager")
    assert len(agent.requests) == 1
    assert retry_events(logs) == []
    assert SECRET not in str(info.value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_gets_the_short_budget_then_one_line():
    """Nothing listening: retried only for refused_budget (not the 30 s budget), then one
    line naming the port and Settings:KestrelHttpsPort, exit 69; attempts = warnings + 1."""
    port = closed_port()
    policy = RetryPolicy(budget=30.0, refused_budget=0.5)
    with (
        set_testing(False),
        PluginSettingsClient(f"https://127.0.0.1:{port}", retry=policy) as c,
        capture_logs() as logs,
        pytest.raises(AgentNotListeningError) as info,
    ):
        started = time.monotonic()
        try:
            c.get_all("KeeperPrivilegeManager")
        finally:
            elapsed = time.monotonic() - started
    events = retry_events(logs)
    message = str(info.value)
    assert message.startswith(
        f"nothing listens on 127.0.0.1:{port} — is this running under the agent? the port is "
        "Settings:KestrelHttpsPort"
    )
    assert "\n" not in message
    assert f"refused on {len(events) + 1} attempts" in message
    assert len(events) >= 1
    assert all(e["error"] == "AgentNotListeningError" for e in events)
    assert info.value.exit_code == ExitCode.AGENT_UNREACHABLE == 69
    # Never before the refused budget is spent; far below the 30 s budget.
    assert policy.refused_budget <= elapsed < 10 * policy.refused_budget


def test_5xx_keeps_the_whole_budget_when_refused_budget_is_short(agent):
    """The short refused budget does not cut a 503 short: it is retried for the whole budget."""
    agent.fail(503)
    policy = RetryPolicy(budget=1.0, refused_budget=0.05)
    with (
        set_testing(False),
        PluginSettingsClient(agent.server.base_url, timeout=2.0, retry=policy) as c,
        pytest.raises(AgentUnreachableError) as info,
    ):
        started = time.monotonic()
        try:
            c.get_all("KeeperPrivilegeManager")
        finally:
            elapsed = time.monotonic() - started
    assert f"gave up after {len(agent.requests)} attempts" in str(info.value)
    assert elapsed >= policy.budget  # never gives up while budget is left
    assert elapsed < policy.budget + 2.0  # at most one request timeout past it


@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers"])
def test_a_drip_fed_answer_is_bounded_by_the_request_timeout(agent, drip_headers):
    """An agent that drips its answer one byte per 0.25 s cannot stretch a request past
    --http-timeout (one deadline for connect, TLS, headers and body), nor the call past the
    budget plus one request timeout."""
    timeout, budget = 1.0, 3.0
    agent.server.dripped = 0
    agent.server.route(
        "GET",
        r"/api/PluginSettings/Dripping",
        Response(200, {"k": "v" * 200}, drip=0.25, drip_headers=drip_headers),
    )
    policy = RetryPolicy(budget=budget)
    with (
        set_testing(False),
        PluginSettingsClient(agent.server.base_url, timeout=timeout, retry=policy) as c,
        capture_logs() as logs,
        pytest.raises(AgentTimeoutError) as info,
    ):
        started = time.monotonic()
        try:
            c.get_all("Dripping")
        finally:
            elapsed = time.monotonic() - started
    attempts = len(agent.requests)
    assert attempts == len(retry_events(logs)) + 1 >= 2
    assert f"gave up after {attempts} attempts" in str(info.value)
    assert "did not finish within 1 s" in str(info.value)
    assert info.value.exit_code == ExitCode.AGENT_UNREACHABLE
    assert budget <= elapsed <= budget + 2 * timeout
    assert agent.server.dripped > 0  # the server did drip (the fault really happened)


def test_403_forever_with_a_short_budget_is_77_with_every_attempt_counted(agent):
    """403 forever, 1 s budget, real sleeping: exit 77 once the budget is spent (not before,
    not more than one request timeout after), and the message counts what the server saw."""
    agent.fail(403)
    policy = RetryPolicy(budget=1.0)
    with (
        set_testing(False),
        PluginSettingsClient(agent.server.base_url, timeout=2.0, retry=policy) as c,
        capture_logs() as logs,
        pytest.raises(NotTrustedError) as info,
    ):
        started = time.monotonic()
        try:
            c.get_all("KeeperPrivilegeManager")
        finally:
            elapsed = time.monotonic() - started
    attempts = len(agent.requests)
    assert attempts == len(retry_events(logs)) + 1 >= 2
    assert f"403 on {attempts} attempts over " in str(info.value)
    assert info.value.exit_code == ExitCode.NOT_TRUSTED == 77
    assert policy.budget <= elapsed < policy.budget + 2.0


def test_timeouts_are_retried_then_agent_unreachable(agent):
    """A request that times out is retried inside the budget, then AgentTimeoutError (69)."""
    agent.hang()
    with (
        PluginSettingsClient(
            agent.server.base_url, timeout=0.2, retry=RetryPolicy(budget=0.8)
        ) as c,
        capture_logs() as logs,
        pytest.raises(AgentTimeoutError, match=r"did not finish within 0\.2 s") as info,
    ):
        c.get_all("KeeperPrivilegeManager")
    assert len(retry_events(logs)) >= 1
    assert len(agent.requests) == len(retry_events(logs)) + 1
    assert info.value.exit_code == ExitCode.AGENT_UNREACHABLE


def test_zero_budget_disables_retrying(agent):
    """RetryPolicy(budget=0) makes exactly one attempt."""
    agent.fail(403)
    with (
        PluginSettingsClient(agent.server.base_url, retry=RetryPolicy(budget=0)) as c,
        pytest.raises(NotTrustedError, match="not launched by the agent"),
    ):
        c.get_all("KeeperPrivilegeManager")
    assert len(agent.requests) == 1


# --- TLS ------------------------------------------------------------------------------------------


def test_certificate_from_another_ca_fails_tls_and_is_not_retried(agent, tmp_path: Path):
    """A CA bundle that does not vouch for the server gives AgentUnreachableError about TLS."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=other)
    with (
        PluginSettingsClient(agent.server.base_url, ssl_context=ctx) as c,
        capture_logs() as logs,
        pytest.raises(AgentUnreachableError) as info,
    ):
        c.get_all("KeeperPrivilegeManager")
    message = str(info.value)
    assert "TLS certificate" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert retry_events(logs) == []
    assert agent.requests == []


def test_the_right_ca_bundle_verifies_the_server(agent, tmp_path: Path):
    """With the server's CA bundle, verified TLS (hostname checked) succeeds."""
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=agent.server.write_ca(tmp_path))
    with PluginSettingsClient(agent.server.base_url, ssl_context=ctx) as c:
        assert c.get_all("My Plugin/x")["mode"] == "fast"


def test_default_context_is_unverified_tls_on_loopback(agent):
    """Without ssl_context the loopback policy connects to a self-signed server."""
    with PluginSettingsClient(agent.server.base_url) as c:
        assert c.get("My Plugin/x", "mode") == "fast"


# --- the same bounds through a real task process --------------------------------------------

_TASK = """
from keeper_task import Task, TaskContext


class Probe(Task):
    def run(self, ctx: TaskContext) -> None:
        print("RUN")


Probe.main()
"""


def _run_task(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / "probe_task.py"
    script.write_text(_TASK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["PYTHONPATH"] = str(ROOT)
    env["KEEPER_TASK_LOG_FORMAT"] = "json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "--no-mqtt", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return proc, time.monotonic() - started


def _retries(stderr: str) -> int:
    return stderr.count('"agent.retry"')


def test_task_with_a_drip_feeding_agent_gives_up_within_its_timeouts(agent, tmp_path: Path):
    """--trust-timeout 3 --http-timeout 1 against an agent dripping one byte per 0.25 s: exit
    69 within a small multiple of the configured timeouts (not half a minute), every attempt
    counted by the server and named in the message."""
    agent.server.dripped = 0
    agent.server.route(
        "GET",
        r"/api/PluginSettings/KeeperPrivilegeManager",
        Response(200, {"broker.host": "127.0.0.1", "x": "v" * 200}, drip=0.25),
    )
    trust, http = 3.0, 1.0
    proc, elapsed = _run_task(
        tmp_path,
        f"--keeper-api-base={agent.server.base_url}",
        f"--trust-timeout={trust}",
        f"--http-timeout={http}",
    )
    attempts = len(agent.requests)
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, proc.stderr
    assert attempts == _retries(proc.stderr) + 1 >= 2
    assert f"gave up after {attempts} attempts" in proc.stderr
    assert "RUN" not in proc.stdout
    assert elapsed < 2 * (trust + 2 * http)  # the process start included


def test_task_with_nothing_listening_says_so_after_the_short_budget(tmp_path: Path):
    """A port where nothing listens: retried for --connect-retry-timeout only (not the 30 s
    budget), then exit 69 with the one line naming the port; attempts = warnings + 1."""
    port = closed_port()
    refused = 0.5
    proc, elapsed = _run_task(
        tmp_path,
        f"--keeper-api-base=https://127.0.0.1:{port}",
        f"--connect-retry-timeout={refused}",
    )
    assert proc.returncode == ExitCode.AGENT_UNREACHABLE, proc.stderr
    line = (
        f"nothing listens on 127.0.0.1:{port} — is this running under the agent? the port is "
        "Settings:KestrelHttpsPort"
    )
    assert line in proc.stderr
    attempts = _retries(proc.stderr) + 1
    assert attempts >= 2
    assert f"connection refused on {attempts} attempts" in proc.stderr
    assert elapsed < 20 * refused  # the process start included; the default budget is 30 s


def test_task_refused_by_403_forever_exits_77_counting_the_servers_requests(agent, tmp_path: Path):
    """403 forever with a 1 s budget: exit 77, and the attempts the message names are the
    requests the server counted (and the warnings logged + 1)."""
    agent.fail(403)
    proc, _elapsed = _run_task(
        tmp_path, f"--keeper-api-base={agent.server.base_url}", "--trust-timeout=1"
    )
    attempts = len(agent.requests)
    assert proc.returncode == ExitCode.NOT_TRUSTED == 77, proc.stderr
    assert attempts == _retries(proc.stderr) + 1 >= 2
    assert f"403 on {attempts} attempts over " in proc.stderr
