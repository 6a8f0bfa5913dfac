"""The TLS policy: CA bundle when given, unverified only toward loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from keeper_task import SettingsError, client_ssl_context
from keeper_task.tls import is_loopback_host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_detection(host: str, expected: bool) -> None:
    """Only 127.0.0.0/8, ::1 and localhost are loopback."""
    assert is_loopback_host(host) is expected


def test_unverified_only_toward_loopback() -> None:
    """Without a CA bundle, loopback gets an unverified context; anything else is refused."""
    ctx = client_ssl_context(host="127.0.0.1")
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    with pytest.raises(SettingsError, match="non-loopback"):
        client_ssl_context(host="10.0.0.1")


def test_ca_bundle_verifies(tmp_path: Path) -> None:
    """With a CA bundle the context verifies the peer and its hostname."""
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    ctx = client_ssl_context(host="10.0.0.1", ca_bundle=path)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


def test_unreadable_ca_bundle_is_one_clear_line(tmp_path: Path) -> None:
    """A missing or garbage CA file is a SettingsError naming the file, not an ssl traceback."""
    with pytest.raises(SettingsError, match="cannot load CA bundle"):
        client_ssl_context(host="127.0.0.1", ca_bundle=tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(SettingsError, match="cannot load CA bundle"):
        client_ssl_context(host="127.0.0.1", ca_bundle=bad)


def test_client_certificate_is_loaded(tmp_path: Path) -> None:
    """A client certificate and key load into the context; a wrong key path is a clear error."""
    ca = trustme.CA()
    leaf = ca.issue_cert("admin@example")
    cert = tmp_path / "admin.pem"
    key = tmp_path / "admin-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    client_ssl_context(host="127.0.0.1", client_cert=cert, client_key=key)
    with pytest.raises(SettingsError, match="cannot load client certificate"):
        client_ssl_context(host="127.0.0.1", client_cert=cert, client_key=tmp_path / "nope.pem")
