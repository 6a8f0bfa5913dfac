"""The TLS policy shared by the HTTPS clients and the MQTT client.

The agent's certificate is self-signed and regenerated on every service start, so it cannot be
pinned. The agent's documentation allows two options and we implement exactly those:

* a CA bundle the administrator exported (``ca_bundle``): full verification;
* no bundle: verification is switched off, but **only** toward a loopback host.

We always build our own :class:`ssl.SSLContext`: httpx's default loads certifi's bundle, which
costs 60-90 ms per client on a small machine, while this costs about 1 ms.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from pathlib import Path

from keeper_task.errors import SettingsError

__all__ = ["client_ssl_context", "is_loopback_host"]


def is_loopback_host(host: str) -> bool:
    """Return True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_ssl_context(
    *,
    host: str,
    ca_bundle: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    key_password: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """Build the client-side TLS context for one agent host.

    Args:
        host: The host the context will connect to; decides whether unverified TLS is allowed.
        ca_bundle: PEM file of the CA(s) to trust. Without it, the peer is not verified, which
            is only allowed toward a loopback host.
        client_cert: PEM client certificate (mutual TLS, Admin tier).
        client_key: PEM private key of ``client_cert``; may be inside ``client_cert``.
        key_password: Password of an encrypted ``client_key``.
        check_hostname: Whether the certificate must name ``host`` (with a CA bundle).

    Returns:
        A context to pass as ``verify=`` to httpx and to paho's ``tls_set_context``.

    Raises:
        SettingsError: Unverified TLS toward a non-loopback host, or an unreadable file.
    """
    if ca_bundle is not None:
        path = Path(ca_bundle)
        try:
            ctx = ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"cannot load CA bundle {path}: {_reason(exc)}; "
                "pass the PEM file your administrator exported (--ca-bundle)"
            ) from exc
        ctx.check_hostname = check_hostname
    elif is_loopback_host(host):
        # The agent's documented fallback: its certificate is self-signed and rotates, so
        # on loopback the connection is encrypted but the peer is not authenticated.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise SettingsError(
            f"refusing unverified TLS toward non-loopback host {host!r}; "
            "pass --ca-bundle with the CA your administrator exported"
        )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:
        try:
            ctx.load_cert_chain(
                str(client_cert),
                str(client_key) if client_key is not None else None,
                password=key_password,
            )
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"cannot load client certificate {client_cert}: {_reason(exc)}; "
                "check the certificate/key paths and the key password"
            ) from exc
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
