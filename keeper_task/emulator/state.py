"""The emulator's state directory: its local CA, server certificates and admin credentials.

Layout (PEM files; ``dev agent --state-dir DIR`` keeps them across restarts so deployment
scripts keep working; ``dev run`` uses a temporary directory removed at exit)::

    DIR/ca.pem               CA bundle that signs the HTTPS and MQTT server certificates
    DIR/ca-key.pem           its private key (kept so the CA survives restarts)
    DIR/admin-ca.pem         CA that issues Admin-tier client certificates
    DIR/admin-ca-key.pem     its private key
    DIR/admin.pem            an Admin-tier client certificate (for curl / deploy scripts)
    DIR/admin-key.pem        its private key
    DIR/server.pem           HTTPS/MQTT server certificate + key, reissued at every start
    DIR/Jobs/                default jobs directory (agent root = DIR)
    DIR/Plugins/             default per-plugin settings JSON files

Like the agent's, the server certificate is regenerated on every start; unlike the agent's,
its CA is kept so a client can verify it with ``ca.pem``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme

from keeper_task.emulator.errors import EmulatorError

__all__ = ["SERVER_NAMES", "EmulatorState"]

#: Names the server certificate is valid for (loopback only).
SERVER_NAMES = ("127.0.0.1", "localhost", "::1")

#: Common name of the admin client certificate the emulator writes.
ADMIN_COMMON_NAME = "keeper-task-emulator-admin"


@dataclass(frozen=True)
class _Pair:
    cert: Path
    key: Path


class EmulatorState:
    """Owns the state directory and the certificates in it.

    Args:
        root: The state directory; ``None`` creates a temporary one that :meth:`cleanup`
            removes.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix="keeper-task-emulator-"))
            self.temporary = True
        else:
            self.root = Path(root).resolve()
            self.temporary = False
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EmulatorError(
                    f"cannot create state directory {self.root}: {exc.strerror or exc}"
                ) from exc
        self.ca_bundle = self.root / "ca.pem"
        self.admin_ca_bundle = self.root / "admin-ca.pem"
        self.admin_cert = self.root / "admin.pem"
        self.admin_key = self.root / "admin-key.pem"
        self.server_pem = self.root / "server.pem"
        self.ca = self._load_or_create_ca(_Pair(self.ca_bundle, self.root / "ca-key.pem"))
        self.admin_ca = self._load_or_create_ca(
            _Pair(self.admin_ca_bundle, self.root / "admin-ca-key.pem")
        )
        if not (self.admin_cert.exists() and self.admin_key.exists()):
            leaf = self.admin_ca.issue_cert(ADMIN_COMMON_NAME, common_name=ADMIN_COMMON_NAME)
            leaf.cert_chain_pems[0].write_to_path(str(self.admin_cert))
            leaf.private_key_pem.write_to_path(str(self.admin_key))
            _private(self.admin_key)
        self._server = self.ca.issue_cert(*SERVER_NAMES)
        self._server.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))
        _private(self.server_pem)

    @staticmethod
    def _load_or_create_ca(pair: _Pair) -> trustme.CA:
        if pair.cert.exists() and pair.key.exists():
            try:
                return trustme.CA.from_pem(pair.cert.read_bytes(), pair.key.read_bytes())
            except (OSError, ValueError) as exc:
                raise EmulatorError(
                    f"cannot load CA {pair.cert}: {exc}; delete the state directory's PEM "
                    "files to create a new CA"
                ) from exc
        ca = trustme.CA(organization_name="keeper-task emulator")
        ca.cert_pem.write_to_path(str(pair.cert))
        ca.private_key_pem.write_to_path(str(pair.key))
        _private(pair.key)
        return ca

    def server_ssl_context(self) -> ssl.SSLContext:
        """A stdlib TLS context with the HTTPS API's certificate that requests an admin cert.

        The API itself terminates TLS in :mod:`keeper_task.emulator.tls_front` (a foreign
        client certificate must get a 403, not a failed handshake); this context remains for
        callers that serve with :mod:`ssl`, where a foreign certificate fails the handshake.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server.configure_cert(ctx)
        self.admin_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def server_pems(self) -> tuple[bytes, bytes]:
        """The HTTPS server's certificate chain and private key, PEM."""
        chain = b"".join(blob.bytes() for blob in self._server.cert_chain_pems)
        return chain, self._server.private_key_pem.bytes()

    def admin_ca_pem(self) -> bytes:
        """The admin CA certificate, PEM (Admin-tier client certificates chain to it)."""
        return bytes(self.admin_ca.cert_pem.bytes())

    def broker_cert_files(self) -> tuple[Path, Path]:
        """Write the broker's certificate chain and key as separate files; return their paths."""
        cert = self.root / "broker.pem"
        key = self.root / "broker-key.pem"
        with cert.open("wb") as fh:
            for blob in self._server.cert_chain_pems:
                fh.write(blob.bytes())
        self._server.private_key_pem.write_to_path(str(key))
        _private(key)
        return cert, key

    def client_ssl_context(self, *, admin: bool = False) -> ssl.SSLContext:
        """A client context that verifies the emulator (and presents the admin cert if asked)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        if admin:
            ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx

    def cleanup(self) -> None:
        """Remove the directory if it is temporary."""
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


def _private(path: Path) -> None:
    # Keys are for this user only (best effort: chmod is a no-op on some file systems).
    with contextlib.suppress(OSError):
        path.chmod(0o600)
