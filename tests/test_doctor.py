"""``keeper-task doctor`` against a live emulator: all ✓ when healthy, one ✗ per broken piece."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from keeper_task.cli import main
from keeper_task.emulator import Emulator
from tests.support.emulator import job_data, write_job


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with Emulator() as agent:
        yield agent


@pytest.fixture
def healthy(emulator: Emulator, tmp_path: Path) -> Iterator[Emulator]:
    """One valid job with its binary in place; removed again after the test."""
    binary = emulator.agent_root / "Jobs" / "bin" / "probe" / "probe"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    job = write_job(emulator.jobs_dir, job_data("doctor-job"))
    emulator.reload_jobs()
    yield emulator
    job.unlink(missing_ok=True)
    for extra in emulator.jobs_dir.glob("*.json"):
        extra.unlink()
    shutil.rmtree(emulator.agent_root / "Jobs" / "bin", ignore_errors=True)
    emulator.reload_jobs()


def run_doctor(
    capsys, agent: Emulator, *extra: str, cert: Path | None = None, key: Path | None = None
) -> tuple[int, list[dict]]:
    code = main(
        [
            "doctor",
            "--agent-root",
            str(agent.agent_root),
            "--cert",
            str(cert or agent.admin_cert),
            "--key",
            str(key or agent.admin_key),
            "--ca-bundle",
            str(agent.ca_bundle),
            "--json",
            *extra,
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["exitCode"] == code
    assert doc["ok"] is (code == 0)
    return code, doc["checks"]


def failed(checks: list[dict]) -> list[dict]:
    return [c for c in checks if c["status"] == "fail"]


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


def test_healthy_agent_all_pass(capsys, healthy: Emulator) -> None:
    code, checks = run_doctor(capsys, healthy)
    assert failed(checks) == []
    assert code == 0
    named = by_name(checks)
    for name in (
        "agent root",
        "appsettings.json",
        "https port",
        "health",
        "tls certificate",
        "admin tier",
        "plugin tier",
        "job doctor-job.json: rules",
        "job doctor-job.json: binary",
        "job doctor-job.json: agent validate",
        "broker port",
    ):
        assert named[name]["status"] == "pass", named[name]
    assert f"verified by {healthy.ca_bundle}" in named["tls certificate"]["detail"]
    assert "403" in named["plugin tier"]["detail"]
    assert str(healthy.broker.port) in named["broker port"]["detail"]


def test_text_output_one_line_per_check(capsys, healthy: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("KEEPER_ADMIN_KEY_PASSWORD", "pw-never-printed")
    code = main(
        [
            "doctor",
            "--agent-root",
            str(healthy.agent_root),
            "--cert",
            str(healthy.admin_cert),
            "--key",
            str(healthy.admin_key),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert any(line.startswith("✓ https port: ") for line in out)
    assert not any(line.startswith("✗") for line in out)
    # Nothing secret: no private-key material, no key password.
    assert "PRIVATE KEY" not in "\n".join(out)
    assert "pw-never-printed" not in "\n".join(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wrong_port_one_failure(capsys, healthy: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "agent"
    shutil.copytree(healthy.agent_root / "Jobs", root / "Jobs")
    settings = json.loads((healthy.agent_root / "appsettings.json").read_text())
    port = _free_port()
    settings["Settings"]["KestrelHttpsPort"] = port
    (root / "appsettings.json").write_text(json.dumps(settings))
    code = main(["doctor", "--agent-root", str(root), "--cert", str(healthy.admin_cert), "--json"])
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert code == 1
    [bad] = failed(checks)
    assert bad["name"] == "https port"
    assert f"127.0.0.1:{port}" in bad["detail"]
    assert "KestrelHttpsPort" in bad["fix"]
    assert by_name(checks)["admin tier"]["status"] == "skip"


def test_tls_not_verifiable_with_bundle(capsys, healthy: Emulator, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    code = main(
        [
            "doctor",
            "--agent-root",
            str(healthy.agent_root),
            "--cert",
            str(healthy.admin_cert),
            "--key",
            str(healthy.admin_key),
            "--ca-bundle",
            str(other),
            "--json",
        ]
    )
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert code == 1
    [bad] = failed(checks)
    assert bad["name"] == "tls certificate"
    assert "NOT verified" in bad["detail"]
    assert "CA bundle" in bad["fix"]
    assert by_name(checks)["admin tier"]["status"] == "pass"


def test_client_certificate_refused(capsys, healthy: Emulator, tmp_path: Path) -> None:
    stranger = trustme.CA().issue_cert("admin.example")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    stranger.cert_chain_pems[0].write_to_path(str(cert))
    stranger.private_key_pem.write_to_path(str(key))
    code, checks = run_doctor(capsys, healthy, cert=cert, key=key)
    assert code == 1
    [bad] = failed(checks)
    assert bad["name"] == "admin tier"
    assert str(cert) in bad["detail"]
    assert "admin client certificate" in bad["fix"]


def test_invalid_job_file(capsys, healthy: Emulator) -> None:
    write_job(healthy.jobs_dir, job_data("bad_job"))  # '_' in the id
    code, checks = run_doctor(capsys, healthy)
    assert code == 1
    [bad] = failed(checks)
    assert bad["name"] == "job bad_job.json: rules"
    assert "_" in bad["detail"]
    assert "keeper-task job validate" in bad["fix"]
    assert by_name(checks)["job bad_job.json: agent validate"]["status"] == "skip"


def test_missing_binary(capsys, healthy: Emulator) -> None:
    data = job_data("no-binary")
    data["tasks"][0]["command"] = "NotThere"
    write_job(healthy.jobs_dir, data)
    code, checks = run_doctor(capsys, healthy)
    assert code == 1
    [bad] = failed(checks)
    assert bad["name"] == "job no-binary.json: binary"
    assert "NotThere" in bad["detail"]
    assert "deploy the task binary" in bad["fix"]


def test_missing_agent_root_named_first(capsys, tmp_path: Path) -> None:
    code = main(["doctor", "--agent-root", str(tmp_path / "nope"), "--json"])
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert code == 1
    assert [c["name"] for c in failed(checks)][:1] == ["agent root"]
