"""The emulator's HTTPS API over real sockets: endpoints, status codes, tiers."""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
import trustme

from keeper_task.emulator import Emulator
from tests.support.emulator import job_data, write_job


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("agent")
    (root / "Jobs" / "bin" / "probe").mkdir(parents=True)
    binary = root / "Jobs" / "bin" / "probe" / "probe"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    (root / "Plugins").mkdir()
    (root / "Plugins" / "MyBridge.json").write_text(
        json.dumps({"id": "MyBridge", "settings": {"poll": {"seconds": 5}, "enabled": True}})
    )
    write_job(root / "Jobs", job_data("on-disk"))
    with Emulator(jobs_dir=root / "Jobs", settings={"custom.flag": True}) as agent:
        yield agent


@pytest.fixture
def admin(emu: Emulator):
    with emu.http_client(admin=True) as client:
        yield client


@pytest.fixture
def plugin(emu: Emulator):
    # This test process is trusted explicitly, as an in-process task would be.
    with emu.trusting(), emu.http_client() as client:
        yield client


def test_public_endpoints_answer_anyone(emu: Emulator) -> None:
    """/health, / and /api/system/status need no tier and report the broker."""
    with emu.http_client() as client:
        assert client.get("/health").json() == {"status": "Healthy"}
        assert client.get("/").status_code == 200
        status = client.get("/api/system/status").json()
    assert status["broker"]["port"] == emu.broker.port
    assert status["broker"]["enforced"] is True


def test_untrusted_process_gets_403_on_plugin_settings(emu: Emulator) -> None:
    """A process the emulator did not launch is refused the Plugin tier with the agent's meaning."""
    with emu.http_client() as client:
        response = client.get("/api/PluginSettings/KeeperPrivilegeManager")
    assert response.status_code == 403
    assert response.json()["requiredTier"] == "Plugin"
    assert "not Plugin-authenticated" in response.json()["message"]
    assert emu.requests[-1].status == 403


def test_admin_cert_does_not_grant_plugin_tier(emu: Emulator, admin: httpx.Client) -> None:
    """The Admin client certificate is for job management only, not Plugin Settings."""
    assert admin.get("/api/PluginSettings/KeeperPrivilegeManager").status_code == 403


def test_merged_settings_hold_the_broker_and_policy_values(
    emu: Emulator, plugin: httpx.Client
) -> None:
    """GET merged settings: flat strings with broker.host/port/tls and --setting values."""
    body = plugin.get("/api/PluginSettings/KeeperPrivilegeManager").json()
    assert body["broker.host"] == "127.0.0.1"
    assert body["broker.port"] == str(emu.broker.port)
    assert body["broker.tls"] == "true"
    assert body["custom.flag"] == "true"
    assert all(isinstance(v, str) for v in body.values())


def test_single_setting_put_revert_and_status(plugin: httpx.Client) -> None:
    """PUT changes one value ({"value"} or bare scalar), status flags it, revert restores disk."""
    base = "/api/PluginSettings/MyBridge"
    assert plugin.get(base).json() == {"poll.seconds": "5", "enabled": "true"}
    assert plugin.get(f"{base}/poll.seconds").json() == "5"
    assert plugin.put(f"{base}/poll.seconds", json={"value": 30}).status_code == 200
    json_type = {"Content-Type": "application/json"}
    assert plugin.put(f"{base}/mode", content=b'"fast"', headers=json_type).status_code == 200
    # ASP.NET [ApiController]: a body not declared as JSON is 415, and nothing changes.
    refused = plugin.put(f"{base}/mode", content=b'"slow"')
    assert refused.status_code == 415 and "application/json" in refused.json()["message"]
    assert plugin.get(f"{base}/mode").json() == "fast"
    assert plugin.get(f"{base}/poll.seconds").json() == "30"
    status = plugin.get(f"{base}/status").json()
    assert status["changed"] is True and set(status["changedKeys"]) == {"poll.seconds", "mode"}
    assert plugin.post(f"{base}/revert").status_code == 200
    assert plugin.get(f"{base}/poll.seconds").json() == "5"
    assert plugin.get(f"{base}/mode").status_code == 404
    assert plugin.get(f"{base}/status").json()["changed"] is False
    assert plugin.put(f"{base}/x", json={"value": [1]}).status_code == 400


def test_revert_all_keeps_policy_and_drops_puts(plugin: httpx.Client) -> None:
    """revert-all re-imports every plugin from disk; --setting policy values survive it."""
    kpm = "/api/PluginSettings/KeeperPrivilegeManager"
    plugin.put(f"{kpm}/custom.flag", json={"value": False})
    assert plugin.get(f"{kpm}/custom.flag").json() == "false"
    assert plugin.post("/api/PluginSettings/revert-all").status_code == 200
    assert plugin.get(f"{kpm}/custom.flag").json() == "true"


def test_unknown_plugin_is_404(plugin: httpx.Client) -> None:
    """Every Plugin Settings endpoint answers 404 for a plugin not in the registry."""
    base = "/api/PluginSettings/NoSuchPlugin"
    assert plugin.get(base).status_code == 404
    assert plugin.get(f"{base}/k").status_code == 404
    assert plugin.put(f"{base}/k", json={"value": 1}).status_code == 404
    assert plugin.post(f"{base}/revert").status_code == 404
    assert plugin.get(f"{base}/status").status_code == 404


def test_jobs_need_the_admin_certificate(emu: Emulator) -> None:
    """Without a client certificate every /api/Jobs endpoint answers 403 (Admin tier)."""
    with emu.http_client() as client:
        response = client.get("/api/Jobs")
        assert client.post("/api/Jobs/reload").status_code == 403
    assert response.status_code == 403
    assert response.json()["requiredTier"] == "Admin"


def test_certificate_from_another_ca_gets_403_with_the_tier(emu: Emulator, tmp_path) -> None:
    """A client certificate from another CA completes TLS and gets the documented 403."""
    other = trustme.CA().issue_cert("intruder")
    ctx = ssl.create_default_context(cafile=str(emu.ca_bundle))
    other.configure_cert(ctx)
    with httpx.Client(verify=ctx, trust_env=False) as client:
        refused = client.get(emu.base_url + "/api/Jobs")
        health = client.get(emu.base_url + "/health")
    assert refused.status_code == 403
    assert refused.json()["requiredTier"] == "Admin"
    assert "not issued by the agent's admin CA" in refused.json()["message"]
    assert health.status_code == 200
    assert [(r.path, r.status, r.caller) for r in emu.requests[-2:]] == [
        ("/api/Jobs", 403, "foreign certificate"),
        ("/health", 200, "foreign certificate"),
    ]


def test_job_crud_flow(emu: Emulator, admin: httpx.Client) -> None:
    """List, create, get, update (URL id wins), delete; 404 for unknown ids."""
    listed = admin.get("/api/Jobs").json()
    assert listed["count"] == len(listed["jobs"]) and "on-disk" in {j["id"] for j in listed["jobs"]}
    created = admin.post("/api/Jobs", json=job_data("crud-job"))
    assert created.status_code == 200, created.text
    assert (emu.jobs_dir / "crud-job.json").is_file()
    assert admin.get("/api/Jobs/crud-job").json()["name"] == "Probe job"
    updated = admin.put("/api/Jobs/crud-job", json=job_data("other-id", name="Renamed"))
    assert updated.status_code == 200, updated.text
    assert admin.get("/api/Jobs/crud-job").json()["name"] == "Renamed"
    assert admin.get("/api/Jobs/other-id").status_code == 404
    assert admin.put("/api/Jobs/missing", json=job_data("missing")).status_code == 404
    assert admin.delete("/api/Jobs/crud-job").status_code == 200
    assert admin.delete("/api/Jobs/crud-job").status_code == 404
    assert not (emu.jobs_dir / "crud-job.json").exists()


def test_create_rejects_invalid_jobs_with_errors(admin: httpx.Client) -> None:
    """400 with an errors array: missing binary, underscore id, malformed JSON."""
    no_binary = job_data("no-binary")
    no_binary["tasks"][0]["command"] = "absent"
    response = admin.post("/api/Jobs", json=no_binary)
    assert response.status_code == 400 and response.json()["errors"]
    assert admin.post("/api/Jobs", json=job_data("bad_id")).status_code == 400
    malformed = admin.post(
        "/api/Jobs", content=b'{"id": ', headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["errors"]


def test_validate_saves_nothing(emu: Emulator, admin: httpx.Client) -> None:
    """/validate answers 200 with valid/errors/warnings/jobId and writes no file."""
    good = admin.post("/api/Jobs/validate", json=job_data("val-job")).json()
    assert good["valid"] is True and good["jobId"] == "val-job"
    bad = admin.post("/api/Jobs/validate", json=job_data("val_job")).json()
    assert bad["valid"] is False and bad["errors"]
    assert not (emu.jobs_dir / "val-job.json").exists()


def test_trigger_and_run_launch_and_refuse_disabled(emu: Emulator, admin: httpx.Client) -> None:
    """trigger/run start an async run (context recorded); a disabled job answers 400."""
    admin.post("/api/Jobs", json=job_data("trig-job"))
    response = admin.post("/api/Jobs/trig-job/trigger", json={"reason": "test"})
    assert response.status_code == 200, response.text
    run = next(r for r in emu.runs if r.run_id == response.json()["runId"])
    assert run.done.wait(20)
    assert run.context == {"reason": "test"} and run.exit_code == 0
    assert admin.post("/api/Jobs/trig-job/run").status_code == 200
    assert admin.post("/api/Jobs/trig-job/trigger", json=[1]).status_code == 400
    admin.post("/api/Jobs", json=job_data("off-job", enabled=False))
    assert admin.post("/api/Jobs/off-job/trigger", json={}).status_code == 400
    assert admin.post("/api/Jobs/off-job/run").status_code == 400
    assert admin.post("/api/Jobs/none-such/run").status_code == 404


def test_reload_rereads_the_directory(emu: Emulator, admin: httpx.Client) -> None:
    """Files placed in Jobs/ appear after reload; a file whose name is not its id is skipped."""
    write_job(emu.jobs_dir, job_data("dropped-in"))
    (emu.jobs_dir / "wrong-name.json").write_text(json.dumps(job_data("right-name")))
    body = admin.post("/api/Jobs/reload").json()
    assert admin.get("/api/Jobs/dropped-in").status_code == 200
    assert any("wrong-name" in e for e in body["errors"])
    (emu.jobs_dir / "wrong-name.json").unlink()


def test_api_and_broker_listen_on_loopback_only(emu: Emulator) -> None:
    """The HTTPS API and the broker bind 127.0.0.1 only: another address of this host is
    refused at the TCP level, so nothing off loopback is ever served."""
    import os
    import socket

    import psutil

    ports = {emu.port, emu.broker.port}
    listening = [
        c
        for c in psutil.Process(os.getpid()).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    assert {c.laddr.port for c in listening} == ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    others = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not others:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((others[0], port), timeout=5).close()
