"""The emulator held against the agent's HTTP reference, section by section.

Each test names the reference's section and runs its documented requests and failures over
real HTTPS (httpx, and curl where the reference shows curl), asserting the documented status
and body shape. Where the reference is silent the emulator follows ASP.NET Core's defaults
(case-insensitive routes, optional trailing slash, 415 for a body not declared JSON); the
README's "What the agent does not document" table lists those choices.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keeper_task.emulator import Emulator
from tests.support.emulator import job_data

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    root = tmp_path_factory.mktemp("agent")
    binary = root / "Jobs" / "bin" / "probe" / "probe"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    (root / "Plugins").mkdir()
    (root / "Plugins" / "MyBridge.json").write_text(
        json.dumps({"id": "MyBridge", "settings": {"poll": {"seconds": 5}, "note": None}})
    )
    with Emulator(jobs_dir=root / "Jobs", http_port=0) as agent:
        yield agent


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate and key from a CA the emulator does not know."""
    directory = tmp_path_factory.mktemp("foreign")
    leaf = trustme.CA().issue_cert("intruder")
    cert, key = directory / "other.pem", directory / "other-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture
def admin(emu: Emulator) -> Iterator[httpx.Client]:
    with emu.http_client(admin=True) as client:
        yield client


@pytest.fixture
def plugin(emu: Emulator) -> Iterator[httpx.Client]:
    with emu.trusting(), emu.http_client() as client:
        yield client


@pytest.fixture
def anonymous(emu: Emulator) -> Iterator[httpx.Client]:
    with emu.http_client() as client:
        yield client


def curl(emu: Emulator, *args: str, cert: tuple[Path, Path] | None = None) -> tuple[int, Any]:
    """Run curl against the emulator; return (HTTP status, parsed JSON body or text)."""
    assert CURL is not None
    creds = ["--cacert", str(emu.ca_bundle)]
    if cert is not None:
        creds += ["--cert", str(cert[0]), "--key", str(cert[1])]
    out = subprocess.run(
        [CURL, "-sS", "-w", "\n%{http_code}", *creds, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    body, _, status = out.stdout.rpartition("\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return int(status), body


def admin_creds(emu: Emulator) -> tuple[Path, Path]:
    return emu.admin_cert, emu.admin_key


def assert_400(response: httpx.Response, *needles: str) -> dict[str, Any]:
    """The one 400 shape: {valid: false, errors: [str...], warnings: [...], jobId}."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"valid", "errors", "warnings", "jobId"}, body
    assert body["valid"] is False and isinstance(body["warnings"], list)
    assert body["errors"] and all(isinstance(e, str) for e in body["errors"]), body
    for needle in needles:
        assert any(needle in e for e in body["errors"]), (needle, body["errors"])
    return body


def assert_403(response: httpx.Response, tier: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["requiredTier"] == tier and body["error"] == "Forbidden"
    assert isinstance(body["message"], str) and body["message"]


# == Base URL and TLS ========================================================================


def test_base_url_is_https_on_loopback_with_a_verifiable_certificate(emu: Emulator) -> None:
    """https://127.0.0.1:{port}; the CA bundle verifies the certificate; /health answers."""
    assert emu.base_url == f"https://127.0.0.1:{emu.port}"
    with emu.http_client() as client:
        assert client.get("/health").status_code == 200
    strict = ssl.create_default_context()  # the system store does not know the local CA
    with (
        httpx.Client(verify=strict, trust_env=False) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(emu.base_url + "/health")


def test_http_port_redirects_to_https_and_serves_nothing(emu: Emulator) -> None:
    """The HTTP port (6888 on the agent) is not for sensitive calls: every request gets a
    307 to the same path on HTTPS, and no job or setting is served over plain HTTP."""
    assert emu.http_port is not None
    with httpx.Client(trust_env=False) as client:
        response = client.get(f"http://127.0.0.1:{emu.http_port}/api/Jobs?x=1")
    assert response.status_code == 307
    assert response.headers["Location"] == f"{emu.base_url}/api/Jobs?x=1"
    assert "jobs" not in response.json()


@needs_curl
def test_curl_with_a_foreign_client_certificate_gets_403_not_a_dropped_connection(
    emu: Emulator, foreign: tuple[Path, Path]
) -> None:
    """A client certificate from another CA: the Admin tier answers the documented 403
    with the tier in the body; /health and the Plugin tier still answer that client."""
    status, body = curl(emu, f"{emu.base_url}/api/Jobs", cert=foreign)
    assert status == 403 and body["requiredTier"] == "Admin"
    assert "not issued by the agent's admin CA" in body["message"]
    assert curl(emu, f"{emu.base_url}/health", cert=foreign) == (200, {"status": "Healthy"})
    status, body = curl(emu, f"{emu.base_url}/api/PluginSettings/MyBridge", cert=foreign)
    assert status == 403 and body["requiredTier"] == "Plugin"  # a shell, not a launched task


@needs_curl
def test_curl_without_the_ca_bundle_fails_verification(emu: Emulator) -> None:
    """The certificate is locally generated: curl refuses it without the exported bundle."""
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-sS", f"{emu.base_url}/health"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 60  # curl: peer certificate cannot be authenticated


# == Authorization tiers =====================================================================


def test_tiers_are_separate_callers(
    emu: Emulator, admin: httpx.Client, anonymous: httpx.Client
) -> None:
    """Admin credentials do not open the Plugin tier, a plain caller gets neither, and a
    trusted process does not open the Admin tier: 403 after a working TLS handshake."""
    assert_403(admin.get("/api/PluginSettings/KeeperPrivilegeManager"), "Plugin")
    refused = anonymous.get("/api/PluginSettings/KeeperPrivilegeManager")
    assert_403(refused, "Plugin")
    assert "Retry on startup" in refused.json()["message"]  # the documented advice
    assert_403(anonymous.get("/api/Jobs"), "Admin")
    with emu.trusting():
        assert anonymous.get("/api/PluginSettings/KeeperPrivilegeManager").status_code == 200
        assert_403(anonymous.post("/api/Jobs/reload"), "Admin")


# == Plugin Settings API =====================================================================


def test_plugin_settings_endpoints(plugin: httpx.Client, emu: Emulator) -> None:
    """All six endpoints with their documented statuses and shapes."""
    merged = plugin.get("/api/PluginSettings/KeeperPrivilegeManager")
    assert merged.status_code == 200
    body = merged.json()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in body.items())
    assert body["broker.host"] == "127.0.0.1" and body["broker.port"] == str(emu.broker.port)
    mine = plugin.get("/api/PluginSettings/MyBridge").json()
    assert mine == {"poll.seconds": "5"}  # a null on disk is "not set"
    one = plugin.get("/api/PluginSettings/MyBridge/poll.seconds")
    assert (one.status_code, one.json()) == (200, "5")
    put = plugin.put("/api/PluginSettings/MyBridge/poll.seconds", json={"value": "30"})
    assert put.status_code == 200
    assert plugin.get("/api/PluginSettings/MyBridge/poll.seconds").json() == "30"
    status = plugin.get("/api/PluginSettings/MyBridge/status")
    assert status.status_code == 200 and status.json()["changed"] is True
    assert plugin.post("/api/PluginSettings/MyBridge/revert").status_code == 200
    assert plugin.get("/api/PluginSettings/MyBridge/poll.seconds").json() == "5"
    assert plugin.post("/api/PluginSettings/revert-all").status_code == 200


def test_plugin_settings_common_failures(plugin: httpx.Client) -> None:
    """404: the plugin name is not in the registry, for every endpoint that takes one (the
    403 is in test_tiers_are_separate_callers); a value that is not a scalar is 400."""
    base = "/api/PluginSettings/NoSuchPlugin"
    for response in (
        plugin.get(base),
        plugin.get(f"{base}/k"),
        plugin.put(f"{base}/k", json={"value": "v"}),
        plugin.post(f"{base}/revert"),
        plugin.get(f"{base}/status"),
    ):
        assert response.status_code == 404, response.request.url
        assert "NoSuchPlugin" in response.json()["message"]
    assert_400(plugin.put("/api/PluginSettings/MyBridge/k", json={"value": [1]}), "value")


# == Job Management API ======================================================================


def test_job_management_endpoints(admin: httpx.Client, emu: Emulator) -> None:
    """list, get, create, update (URL id wins), validate (saves nothing), trigger ({} or a
    context object or no body), run, reload, delete; each with its documented answer."""
    checked = admin.post("/api/Jobs/validate", json=job_data("conf-validate"))
    assert checked.status_code == 200
    assert set(checked.json()) == {"valid", "errors", "warnings", "jobId"}
    assert checked.json()["valid"] is True and checked.json()["jobId"] == "conf-validate"
    assert not (emu.jobs_dir / "conf-validate.json").exists()

    assert admin.post("/api/Jobs", json=job_data("conf-job")).status_code == 200
    listed = admin.get("/api/Jobs").json()
    assert set(listed) >= {"jobs", "count", "message"} and listed["count"] == len(listed["jobs"])
    assert "conf-job" in {j["id"] for j in listed["jobs"]}
    assert admin.get("/api/Jobs/conf-job").json()["id"] == "conf-job"

    renamed = job_data("another-id", name="Renamed")
    assert admin.put("/api/Jobs/conf-job", json=renamed).status_code == 200
    assert admin.get("/api/Jobs/conf-job").json()["name"] == "Renamed"
    assert admin.get("/api/Jobs/another-id").status_code == 404

    before = len(emu.runs)
    for kwargs in ({"json": {}}, {"json": {"user": "alice"}}, {}):
        assert admin.post("/api/Jobs/conf-job/trigger", **kwargs).status_code == 200
    assert admin.post("/api/Jobs/conf-job/run").status_code == 200
    runs = emu.runs[before:]
    assert [r.trigger for r in runs] == ["trigger", "trigger", "trigger", "run"]
    assert runs[1].context == {"user": "alice"}
    assert all(r.done.wait(30) and r.exit_code == 0 for r in runs)

    assert admin.post("/api/Jobs/reload").status_code == 200
    assert admin.delete("/api/Jobs/conf-job").status_code == 200
    assert admin.get("/api/Jobs/conf-job").status_code == 404


def test_job_management_documented_failures(admin: httpx.Client, emu: Emulator) -> None:
    """400 for a missing binary, malformed JSON, a missing field (an errors array); 400 for
    run/trigger of a disabled job; 404 for unknown ids on get, put, delete, trigger, run."""
    missing_binary = job_data("conf-nobin")
    missing_binary["tasks"][0]["command"] = "not-deployed"
    assert_400(admin.post("/api/Jobs", json=missing_binary), "not found")
    assert_400(admin.post("/api/Jobs", content=b'{"id": ', headers=JSON), "malformed JSON")
    no_name = job_data("conf-noname")
    del no_name["name"]
    assert_400(admin.post("/api/Jobs", json=no_name), "name is missing")
    # /validate: the same validation, answered 200 for a job that parses...
    assert admin.post("/api/Jobs/validate", json=no_name).json()["valid"] is False
    # ...and 400 for a body that does not (model binding fails before validation runs).
    assert_400(admin.post("/api/Jobs/validate", content=b"{", headers=JSON), "malformed JSON")

    assert admin.post("/api/Jobs", json=job_data("conf-off", enabled=False)).status_code == 200
    assert_400(admin.post("/api/Jobs/conf-off/run"), "disabled")
    assert_400(admin.post("/api/Jobs/conf-off/trigger", json={}), "disabled")
    for response in (
        admin.get("/api/Jobs/conf-ghost"),
        admin.put("/api/Jobs/conf-ghost", json=job_data("conf-ghost")),
        admin.delete("/api/Jobs/conf-ghost"),
        admin.post("/api/Jobs/conf-ghost/trigger", json={}),
        admin.post("/api/Jobs/conf-ghost/run"),
    ):
        assert response.status_code == 404, response.request.url
        assert "GET /api/Jobs lists jobs" in response.json()["message"]


def test_os_filter_excluding_this_host_skips_the_binary_check(admin: httpx.Client) -> None:
    """The reference: if osFilter excludes the current OS, binary existence is not checked."""
    job = job_data("conf-other-os", osFilter={"windows": True, "linux": False, "macOS": False})
    job["tasks"][0]["command"] = "not-deployed"
    assert admin.post("/api/Jobs", json=job).status_code == 200


def test_binary_must_exist_at_the_executable_path_in_the_job(admin: httpx.Client) -> None:
    """Jobs/bin/probe/probe exists, but the job names another path: 400 (binary not found)."""
    job = job_data("conf-exe-path")
    job["tasks"][0]["executablePath"] = "/nowhere/probe"
    assert_400(admin.post("/api/Jobs", json=job), "not found at /nowhere/probe")


@needs_curl
def test_curl_examples_of_the_reference(emu: Emulator, tmp_path: Path) -> None:
    """List, create (-d @file with a JSON Content-Type), delete, as the reference's curl."""
    creds = admin_creds(emu)
    job = tmp_path / "conf-curl.json"
    job.write_text(json.dumps(job_data("conf-curl")))
    status, body = curl(emu, f"{emu.base_url}/api/Jobs", cert=creds)
    assert status == 200 and {"jobs", "count", "message"} <= set(body)
    status, body = curl(
        emu,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        f"@{job}",
        f"{emu.base_url}/api/Jobs",
        cert=creds,
    )
    assert status == 200 and body["jobId"] == "conf-curl"
    status, body = curl(emu, "-X", "DELETE", f"{emu.base_url}/api/Jobs/conf-curl", cert=creds)
    assert status == 200


# == {jobId} format ==========================================================================


def test_job_ids_are_url_encoded_hyphens_allowed_underscores_refused(admin: httpx.Client) -> None:
    """A percent-encoded id segment names the same job; an underscore id is refused (400)."""
    assert admin.post("/api/Jobs", json=job_data("conf-hyphen-id")).status_code == 200
    assert admin.get("/api/Jobs/conf%2Dhyphen%2Did").json()["id"] == "conf-hyphen-id"
    assert_400(admin.post("/api/Jobs", json=job_data("conf_underscore")), "underscore")


@pytest.mark.parametrize(
    ("job_id", "reason"),
    [
        ("x" * 300, "300 bytes long"),
        ("conf\u0000nul", "cannot be in a file name"),
        ("..", "is not a file name"),
        ('a:b*c<d>|e"', "cannot be in a file name"),
        ("CON", "reserved Windows device name"),
        ("com1", "reserved Windows device name"),
        ("conf-dot.", "ends with a dot"),
        ("conf-space ", "leading or trailing spaces"),
    ],
)
def test_ids_that_cannot_be_file_names_are_400_with_the_reason(
    admin: httpx.Client, emu: Emulator, job_id: str, reason: str
) -> None:
    """Every id that cannot be Jobs/<id>.json on Linux, macOS or Windows: 400, nothing saved."""
    before = sorted(p.name for p in emu.jobs_dir.glob("*.json"))
    assert_400(admin.post("/api/Jobs", json=job_data(job_id)), reason)
    assert sorted(p.name for p in emu.jobs_dir.glob("*.json")) == before


def test_case_only_duplicate_id_is_400(admin: httpx.Client) -> None:
    """CONF-CASE beside conf-case would be one file on Windows and macOS: 400."""
    assert admin.post("/api/Jobs", json=job_data("conf-case")).status_code == 200
    assert_400(admin.post("/api/Jobs", json=job_data("CONF-CASE")), "differs only in letter case")
    assert admin.post("/api/Jobs", json=job_data("conf-case")).status_code == 200  # an update


# == ASP.NET defaults where the reference is silent ==========================================


def test_routes_are_case_insensitive_and_accept_a_trailing_slash(
    admin: httpx.Client, plugin: httpx.Client
) -> None:
    """ASP.NET routing: /API/JOBS/ is /api/Jobs; parameter segments keep their case."""
    assert admin.get("/API/JOBS/").json()["count"] >= 0
    assert admin.post("/api/jobs/VALIDATE/", json=job_data("x")).json()["jobId"] == "x"
    assert plugin.get("/api/pluginsettings/MyBridge/STATUS").status_code == 200
    assert plugin.get("/api/PluginSettings/mybridge").status_code == 404  # a name, not a route


def test_a_body_not_declared_json_is_415(admin: httpx.Client) -> None:
    """ASP.NET [ApiController]: a body with another (or no) Content-Type is 415."""
    raw = json.dumps(job_data("conf-media")).encode()
    for headers in ({"Content-Type": "text/plain"}, {}):
        response = admin.post("/api/Jobs", content=raw, headers=headers)
        assert response.status_code == 415
        assert "application/json" in response.json()["message"]
    assert admin.get("/api/Jobs/conf-media").status_code == 404


def test_trigger_body_null_is_no_context_and_non_objects_are_400(admin: httpx.Client) -> None:
    """null binds to "no context"; an array or a scalar is not a key-value object: 400."""
    assert admin.post("/api/Jobs", json=job_data("conf-trigger")).status_code == 200
    null = admin.post("/api/Jobs/conf-trigger/trigger", content=b"null", headers=JSON)
    assert null.status_code == 200
    for body in (b"[]", b"[1]", b"3", b'"x"'):
        response = admin.post("/api/Jobs/conf-trigger/trigger", content=body, headers=JSON)
        assert_400(response, "JSON object of event context")


# == Hostile input: never a 500 ==============================================================

# Any text, plus the characters file systems and UTF-8 choke on (surrogates, NUL, dots).
_ids = st.text(min_size=1, max_size=300) | st.text(
    alphabet=st.sampled_from(["\ud800", "\udfff", "\x00", ".", "_", " ", "C", "O", "N"]),
    min_size=1,
    max_size=8,
)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _ids,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(job_id=_ids, body=_json_values, raw=st.binary(max_size=200))
def test_no_input_gives_a_500(
    admin: httpx.Client, emu: Emulator, job_id: str, body: Any, raw: bytes
) -> None:
    """Any id (in the URL and in the body), any JSON body and any bytes: a JSON answer
    below 500 from every job endpoint."""
    segment = "/api/Jobs/" + _encode(job_id)
    data = job_data("x")
    data["id"] = job_id
    responses = [
        admin.post("/api/Jobs", content=_ascii_json(data), headers=JSON),
        admin.post("/api/Jobs/validate", content=_ascii_json(data), headers=JSON),
        admin.post("/api/Jobs", content=_ascii_json(body), headers=JSON),
        admin.post("/api/Jobs", content=raw, headers=JSON),
        admin.post("/api/Jobs/validate", content=raw, headers=JSON),
        admin.get(segment),
        admin.put(segment, content=_ascii_json(data), headers=JSON),
        admin.post(segment + "/trigger", content=raw, headers=JSON),
        admin.delete(segment),
    ]
    for response in responses:
        assert response.status_code < 500, (response.request.url, response.text)
        response.json()  # always JSON
    for job in emu.jobs():  # whatever was accepted is deleted again
        if job.id and job.id != "x" and not job.id.startswith("conf"):
            emu.delete_job(job.id)


@settings(max_examples=40, deadline=None)
@given(
    name=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~",
        min_size=1,
        max_size=20,
    ),
    value=st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=40
    ).map(str.strip),  # h11 refuses surrounding whitespace before sending
)
def test_no_header_gives_a_500(emu: Emulator, name: str, value: str) -> None:
    """Any extra header (Content-Type, Content-Length excluded) on a create: below 500."""
    if name.lower() in {"content-length", "transfer-encoding", "host", "connection"}:
        return
    with emu.http_client(admin=True) as client:
        response = client.post(
            "/api/Jobs/validate", content=b"{}", headers={"Content-Type": value, name: value}
        )
    assert response.status_code < 500, response.text


def _ascii_json(value: Any) -> bytes:
    """JSON with \\u escapes, so lone surrogates reach the server as a client may send them."""
    return json.dumps(value).encode("ascii")


def _encode(text: str) -> str:
    from urllib.parse import quote

    return quote(text.encode("utf-8", "surrogatepass"), safe="")


# == Choices where the reference is silent (README table) ====================================


def test_numeric_execution_type_and_path_only_commands_are_refused(admin: httpx.Client) -> None:
    """ExecutionType 0 is not one of the names; a command found only on PATH (sh) is not a
    deployed binary."""
    numeric = job_data("conf-numeric")
    numeric["tasks"][0]["ExecutionType"] = 0
    assert_400(admin.post("/api/Jobs", json=numeric), "executionType must be a string")
    on_path = job_data("conf-on-path")
    on_path["tasks"][0]["command"] = "sh"
    assert shutil.which("sh") is not None
    assert_400(admin.post("/api/Jobs", json=on_path), "binary for command 'sh' not found")


def test_json_media_types_accepted(admin: httpx.Client) -> None:
    """text/json and a +json suffix count as JSON, as for ASP.NET's JSON formatter."""
    raw = json.dumps(job_data("conf-media-ok")).encode()
    for media in ("text/json", "application/vnd.keeper+json", "application/json; charset=utf-8"):
        response = admin.post("/api/Jobs/validate", content=raw, headers={"Content-Type": media})
        assert response.status_code == 200, (media, response.text)


def test_reload_skips_bad_files_with_200_and_says_why(admin: httpx.Client, emu: Emulator) -> None:
    """A file whose id is not its name, and a case-only duplicate, are skipped; 200."""
    (emu.jobs_dir / "conf-misnamed.json").write_text(json.dumps(job_data("conf-other")))
    (emu.jobs_dir / "conf-dup.json").write_text(json.dumps(job_data("conf-dup")))
    (emu.jobs_dir / "CONF-DUP.json").write_text(json.dumps(job_data("CONF-DUP")))
    try:
        response = admin.post("/api/Jobs/reload")
        assert response.status_code == 200
        errors = response.json()["errors"]
        assert any(
            "conf-misnamed.json" in e and "does not match the file name" in e for e in errors
        )
        assert any("differs only in letter case" in e for e in errors), errors
        ids = {j["id"] for j in admin.get("/api/Jobs").json()["jobs"]}
        assert "conf-other" not in ids and len(ids & {"conf-dup", "CONF-DUP"}) == 1
    finally:
        for name in ("conf-misnamed.json", "conf-dup.json", "CONF-DUP.json"):
            (emu.jobs_dir / name).unlink()
        admin.post("/api/Jobs/reload")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=_ids, setting=_ids, body=_json_values, raw=st.binary(max_size=200))
def test_no_plugin_settings_input_gives_a_500(
    plugin: httpx.Client, name: str, setting: str, body: Any, raw: bytes
) -> None:
    """Any plugin name, setting name, JSON value or bytes: a JSON answer below 500."""
    base = f"/api/PluginSettings/{_encode(name)}"
    mine = f"/api/PluginSettings/MyBridge/{_encode(setting)}"
    responses = [
        plugin.get(base),
        plugin.get(f"{base}/{_encode(setting)}"),
        plugin.put(mine, content=_ascii_json(body), headers=JSON),
        plugin.put(mine, content=raw, headers=JSON),
        plugin.get(mine),
        plugin.post(f"{base}/revert"),
    ]
    for response in responses:
        assert response.status_code < 500, (response.request.url, response.text)
        response.json()
    plugin.post("/api/PluginSettings/MyBridge/revert")
