"""Tests for keeper_task.agent.jobs: the Admin-tier client over real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keeper_task.agent.jobs import JobListing, JobsClient
from keeper_task.errors import (
    AgentResponseError,
    AgentUnreachableError,
    JobNotFoundError,
    NotTrustedError,
    SettingsError,
    ValidationFailedError,
)
from keeper_task.jobs import Job, parse_job
from tests.support import jobs as support_jobs
from tests.support.https import HttpsServer, Response
from tests.support.jobs import AdminPki, FakeJobsAgent, HangUpServer, example_job

# The Admin-tier fixtures shared with the other jobs test module.
pki = support_jobs.pki
_shared_server = support_jobs._shared_server
server = support_jobs.server
agent = support_jobs.agent


@pytest.fixture
def client(server: HttpsServer, pki: AdminPki) -> Iterator[JobsClient]:
    with JobsClient(server.base_url, client_cert=pki.admin_pem, ca_bundle=pki.ca_bundle) as c:
        yield c


def test_right_client_certificate_passes_and_is_seen_by_the_server(
    client: JobsClient, agent: FakeJobsAgent, server: HttpsServer
) -> None:
    """With the admin certificate the call succeeds and the server saw that certificate."""
    assert client.list().jobs == []
    peer = server.requests[0].peercert
    assert peer is not None
    assert ("email", "deploy@example.test") in peer["subjectAltName"]


def test_separate_certificate_and_key_files_work(
    server: HttpsServer, agent: FakeJobsAgent, pki: AdminPki
) -> None:
    """--cert and --key as two files are loaded together."""
    with JobsClient(
        server.base_url,
        client_cert=pki.admin_cert,
        client_key=pki.admin_key,
        ca_bundle=pki.ca_bundle,
    ) as c:
        c.reload()
    assert agent.reloads == 1


def test_no_client_certificate_is_refused_with_a_clear_message(
    server: HttpsServer, agent: FakeJobsAgent, pki: AdminPki
) -> None:
    """Without a certificate the TLS 1.3 refusal (seen on read) says a certificate is required."""
    with (
        JobsClient(server.base_url, ca_bundle=pki.ca_bundle) as c,
        pytest.raises(NotTrustedError) as info,
    ):
        c.list()
    message = str(info.value)
    assert "requires a client certificate for the Admin tier and none was given" in message
    assert "--cert" in message
    # One mapping boundary: the stdlib's TLS alert -> our error -> the refusal explained.
    assert isinstance(info.value.__cause__, AgentUnreachableError)
    assert isinstance(info.value.__cause__.__cause__, ssl.SSLError)
    assert "CERTIFICATE_REQUIRED" in str(info.value.__cause__.__cause__)
    assert server.requests == []


def test_certificate_from_another_ca_is_refused_with_a_clear_message(
    server: HttpsServer, agent: FakeJobsAgent, pki: AdminPki
) -> None:
    """A certificate the agent does not trust is reported as a rejected client certificate."""
    c = JobsClient(server.base_url, client_cert=pki.other_pem, ca_bundle=pki.ca_bundle)
    with c, pytest.raises(NotTrustedError) as info:
        c.reload()
    assert f"rejected the client certificate {pki.other_pem}" in str(info.value)
    assert agent.reloads == 0


def test_403_says_admin_tier_refused_and_tls_worked(
    server: HttpsServer, client: JobsClient
) -> None:
    """A 403 after a good handshake names the Admin tier and says TLS worked."""
    server.route("GET", r"/api/Jobs", Response(403, {"message": "Forbidden"}))
    with pytest.raises(NotTrustedError) as info:
        client.list()
    assert "403 (TLS worked)" in str(info.value)
    assert "Admin tier" in str(info.value)
    assert info.value.status_code == 403


def test_403_without_a_certificate_says_none_was_given(pki: AdminPki) -> None:
    """An agent that only requests client certificates answers 403: the message names the fix."""
    with HttpsServer(pki.server_ca) as srv:
        srv.route("GET", r"/api/Jobs", Response(403, {"message": "Forbidden"}))
        with (
            JobsClient(srv.base_url, ca_bundle=pki.ca_bundle) as c,
            pytest.raises(NotTrustedError) as info,
        ):
            c.list()
    assert str(info.value) == (
        "the agent refused the job list with 403 (TLS worked): the Admin tier needs a client "
        "certificate and none was given; pass --cert/--key (or KEEPER_ADMIN_CERT/KEEPER_ADMIN_KEY)"
    )
    assert info.value.status_code == 403


def test_silent_hang_up_after_the_handshake_is_a_refused_certificate(pki: AdminPki) -> None:
    """A server that drops the connection without a TLS alert is reported as a refused cert."""
    with HangUpServer(pki.server_ca) as srv:
        c = JobsClient(srv.base_url, client_cert=pki.other_pem, ca_bundle=pki.ca_bundle)
        with c, pytest.raises(NotTrustedError) as info:
            c.reload()
        assert srv.handled.acquire(timeout=5)
        with (
            JobsClient(srv.base_url, ca_bundle=pki.ca_bundle) as bare,
            pytest.raises(NotTrustedError) as bare_info,
        ):
            bare.list()
    assert str(info.value) == (
        f"the agent at {srv.base_url} hung up without answering right after the TLS handshake: "
        f"it most likely rejected the client certificate {pki.other_pem}; use the admin "
        "certificate issued for this agent (issued by a CA the agent trusts, not expired)"
    )
    assert isinstance(info.value.__cause__, AgentUnreachableError)
    assert isinstance(info.value.__cause__.__cause__, http.client.RemoteDisconnected)
    assert "requires a client certificate for the Admin tier and none was given" in str(
        bare_info.value
    )


def test_every_endpoint_sends_the_documented_request(
    client: JobsClient, agent: FakeJobsAgent, server: HttpsServer
) -> None:
    """Method, path and body of all nine endpoints match the HTTP reference."""
    job = example_job("a-job")
    client.create(job)
    listing = client.list()
    got = client.get("a-job")
    client.update("a-job", job)
    report = client.validate(job)
    client.trigger("a-job", {"user": "alice", "n": 1})
    client.trigger("a-job")
    client.run("a-job")
    client.reload()
    client.delete("a-job")
    seen = [(r.method, r.path, r.json()) for r in server.requests]
    assert seen == [
        ("POST", "/api/Jobs", job),
        ("GET", "/api/Jobs", None),
        ("GET", "/api/Jobs/a-job", None),
        ("PUT", "/api/Jobs/a-job", job),
        ("POST", "/api/Jobs/validate", job),
        ("POST", "/api/Jobs/a-job/trigger", {"user": "alice", "n": 1}),
        ("POST", "/api/Jobs/a-job/trigger", {}),
        ("POST", "/api/Jobs/a-job/run", None),
        ("POST", "/api/Jobs/reload", None),
        ("DELETE", "/api/Jobs/a-job", None),
    ]
    assert server.requests[0].headers["Content-Type"] == "application/json"
    assert isinstance(listing, JobListing)
    assert listing.ids == ["a-job"] and listing.count == 1 and listing.message == "ok"
    assert listing.jobs[0].enabled is True
    assert isinstance(got, Job) and got.to_json_dict() == job
    assert report.valid and report.job_id == "a-job"
    assert agent.triggered == [("a-job", {"user": "alice", "n": 1}), ("a-job", {}), ("a-job", None)]
    assert agent.jobs == {}


def test_job_model_is_sent_with_the_authors_keys(
    client: JobsClient, agent: FakeJobsAgent, server: HttpsServer
) -> None:
    """A Job is sent as its round-trip JSON (ExecutionType casing, unknown keys)."""
    data = example_job("k")
    data["futureKey"] = [1]
    client.create(parse_job(json.dumps(data)))
    assert server.requests[-1].json() == data


@pytest.mark.parametrize(
    ("job_id", "encoded"),
    [("my job", "my%20job"), ("a/b", "a%2Fb"), ("ü?#", "%C3%BC%3F%23")],
)
def test_job_ids_are_url_encoded(
    client: JobsClient, agent: FakeJobsAgent, server: HttpsServer, job_id: str, encoded: str
) -> None:
    """Ids with spaces, slashes or reserved characters stay one encoded path segment."""
    agent.jobs[job_id] = example_job(job_id)
    assert client.get(job_id).id == job_id
    client.run(job_id)
    assert [r.path for r in server.requests] == [
        f"/api/Jobs/{encoded}",
        f"/api/Jobs/{encoded}/run",
    ]


def test_put_sends_the_body_as_given_and_the_url_id_wins(
    client: JobsClient, agent: FakeJobsAgent, server: HttpsServer
) -> None:
    """The client does not rewrite the body's id; the agent applies the URL id."""
    agent.jobs["target"] = example_job("target")
    client.update("target", example_job("other"))
    assert server.requests[-1].json()["id"] == "other"
    assert agent.jobs["target"]["id"] == "target"


def test_404_says_the_job_is_unknown(client: JobsClient, agent: FakeJobsAgent) -> None:
    """Every per-job endpoint turns 404 into JobNotFoundError with a hint."""
    for call in (
        lambda: client.get("ghost"),
        lambda: client.update("ghost", example_job("ghost")),
        lambda: client.delete("ghost"),
        lambda: client.trigger("ghost"),
        lambda: client.run("ghost"),
    ):
        with pytest.raises(JobNotFoundError) as info:
            call()
        assert str(info.value) == (
            "job 'ghost' is unknown to the agent; `keeper-task job list` shows what exists"
        )
        assert info.value.status_code == 404


def test_400_carries_the_agents_errors_array(client: JobsClient, agent: FakeJobsAgent) -> None:
    """A rejected create shows every error the agent listed."""
    bad = example_job("x")
    del bad["name"]
    bad["tasks"] = []
    with pytest.raises(ValidationFailedError) as info:
        client.create(bad)
    assert info.value.errors == ["name is missing", "tasks is empty; a job needs at least one task"]
    assert "name is missing; tasks is empty" in str(info.value)


def test_trigger_of_disabled_job_is_a_400(client: JobsClient, agent: FakeJobsAgent) -> None:
    """The agent's 400 for a disabled job reaches the caller with its message."""
    agent.jobs["off"] = example_job("off", enabled=False)
    with pytest.raises(ValidationFailedError, match="Job off is disabled"):
        client.trigger("off")


def test_validate_returns_the_agents_report(client: JobsClient, server: HttpsServer) -> None:
    """/validate answers become a ValidationReport, and a 400 becomes an invalid one."""
    server.route(
        "POST",
        r"/api/Jobs/validate",
        Response(
            200, {"valid": False, "errors": ["Binary not found"], "warnings": ["w"], "jobId": "j"}
        ),
    )
    report = client.validate(example_job("j"))
    assert (report.valid, report.errors, report.warnings, report.job_id) == (
        False,
        ["Binary not found"],
        ["w"],
        "j",
    )
    server.route("POST", r"/api/Jobs/validate", Response(400, {"errors": ["Malformed"]}))
    report = client.validate(example_job("j"))
    assert not report.valid and report.errors == ["Malformed"] and report.job_id == "j"


def test_unexpected_bodies_are_agent_response_errors(
    client: JobsClient, server: HttpsServer
) -> None:
    """A list that is not an object, or a job that is not a job, is a clear error."""
    server.route("GET", r"/api/Jobs", Response(200, "not json"))
    with pytest.raises(AgentResponseError, match="not valid JSON"):
        client.list()
    server.route("GET", r"/api/Jobs/x", Response(200, [1]))
    with pytest.raises(AgentResponseError, match="must be a JSON object"):
        client.get("x")


def test_empty_success_bodies_return_none(client: JobsClient, server: HttpsServer) -> None:
    """An empty 200 body is fine for write endpoints."""
    server.route("POST", r"/api/Jobs/reload", Response(200, None))
    assert client.reload() is None


def test_from_env_reads_the_documented_variables(
    server: HttpsServer, agent: FakeJobsAgent, pki: AdminPki
) -> None:
    """KEEPER_AGENT_URL, KEEPER_ADMIN_CERT/KEY and KEEPER_CA_BUNDLE configure the client."""
    env = {
        "KEEPER_AGENT_URL": server.base_url,
        "KEEPER_ADMIN_CERT": str(pki.admin_cert),
        "KEEPER_ADMIN_KEY": str(pki.admin_key),
        "KEEPER_CA_BUNDLE": str(pki.ca_bundle),
        "KEEPER_ADMIN_KEY_PASSWORD": "",
    }
    with JobsClient.from_env(env) as c:
        c.reload()
    assert agent.reloads == 1
    with JobsClient.from_env({"KEEPER_AGENT_URL": "https://127.0.0.1:1"}, url=server.base_url) as c:
        assert c.base_url == server.base_url


def test_encrypted_key_uses_the_password(
    tmp_path: Path, server: HttpsServer, pki: AdminPki
) -> None:
    """An encrypted key loads with KEEPER_ADMIN_KEY_PASSWORD and fails clearly without it."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.admin_key.read_bytes(), password=None)
    encrypted = tmp_path / "enc-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    FakeJobsAgent(server)
    env = {
        "KEEPER_AGENT_URL": server.base_url,
        "KEEPER_ADMIN_CERT": str(pki.admin_cert),
        "KEEPER_ADMIN_KEY": str(encrypted),
        "KEEPER_CA_BUNDLE": str(pki.ca_bundle),
    }
    with JobsClient.from_env({**env, "KEEPER_ADMIN_KEY_PASSWORD": "s3cret"}) as c:
        assert c.list().jobs == []
    with pytest.raises(SettingsError, match="cannot load client certificate"):
        JobsClient.from_env({**env, "KEEPER_ADMIN_KEY_PASSWORD": "wrong"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "http://127.0.0.1:6888"}, "needs an https:// URL"),
        ({"client_key": "k.pem"}, "client key was given without a client certificate"),
        ({"client_cert": "/missing/cert.pem"}, "cannot load client certificate"),
        ({"base_url": "https://agent.example.com"}, "refusing unverified TLS"),
    ],
)
def test_bad_settings_fail_before_any_request(kwargs: dict, message: str) -> None:
    """Wrong URLs and credential files are SettingsError with the fix in the message."""
    with pytest.raises(SettingsError, match=message):
        JobsClient(**kwargs)


def test_unreachable_agent_is_not_blamed_on_the_certificate(pki: AdminPki) -> None:
    """A refused connection stays AgentUnreachableError (no certificate hint)."""
    with HttpsServer(pki.server_ca) as srv:
        url = srv.base_url  # a port that is closed once the server is gone
    c = JobsClient(url, client_cert=pki.admin_pem, ca_bundle=pki.ca_bundle)
    with c, pytest.raises(AgentUnreachableError, match="cannot connect to the agent") as info:
        c.list()
    assert not isinstance(info.value, NotTrustedError)


def test_mock_transport_seam() -> None:
    """A transport can replace the network for unit tests of callers."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"jobs": ["a", {"Id": "b", "Enabled": False}], "count": 2})

    transport = httpx.MockTransport(handler)
    with JobsClient(transport=transport) as c:
        listing = c.list()
    assert listing.ids == ["a", "b"] and listing.jobs[1].enabled is False
    assert str(seen[0].url) == "https://127.0.0.1:6889/api/Jobs"
