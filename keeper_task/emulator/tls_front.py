"""TLS termination for the emulator's HTTPS API, so a foreign client certificate gets a 403.

The agent answers an Admin-tier call made with a certificate it does not accept with 403
("Admin credentials not provided or not accepted"), and keeps serving the Public and Plugin
tiers to that client. Python's :mod:`ssl` cannot do that: a server that requests client
certificates aborts the handshake on any certificate it cannot verify. So this front end
terminates TLS with pyOpenSSL, whose verify callback accepts every certificate, and checks the
certificate against the admin CA itself once the handshake is done. The decrypted stream is
handed to the aiohttp server over a socket pair; :meth:`TlsFront.peer` tells the tier check
who is behind each inner socket (client address and whether an admin certificate was shown).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

__all__ = ["Peer", "TlsFront"]

_CHUNK = 65536


@dataclass(frozen=True)
class Peer:
    """Who is behind one decrypted connection.

    Attributes:
        host: The client's address.
        port: The client's source port (identifies the process for the Plugin tier).
        certificate: A client certificate was presented.
        admin: It chains to the admin CA and is valid now.
        reason: Why a presented certificate is not an admin one (empty otherwise).
    """

    host: str
    port: int
    certificate: bool
    admin: bool
    reason: str = ""


class TlsFront:
    """Accepts TLS on 127.0.0.1 and feeds plaintext to ``protocol_factory``'s server.

    Args:
        cert_chain_pem: The server certificate chain (PEM).
        key_pem: Its private key (PEM).
        admin_ca_pem: The CA whose certificates are Admin tier.
        protocol_factory: The HTTP server's protocol factory (``AppRunner.server``).
    """

    def __init__(
        self,
        cert_chain_pem: bytes,
        key_pem: bytes,
        admin_ca_pem: bytes,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._factory = protocol_factory
        self._store = crypto.X509Store()
        self._store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, admin_ca_pem))
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        key = serialization.load_pem_private_key(key_pem, password=None)
        ctx.use_privatekey(key)  # type: ignore[arg-type]  # an RSA/EC key from trustme
        certs = x509.load_pem_x509_certificates(cert_chain_pem)
        ctx.use_certificate(certs[0])
        for extra in certs[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.check_privatekey()
        # Request a certificate, never require one, accept any: the tier check decides.
        ctx.set_verify(SSL.VERIFY_PEER, lambda *_args: True)
        self._ctx = ctx
        self._server: asyncio.Server | None = None
        self._peers: dict[int, Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); return the port.

        Raises:
            OSError: The address cannot be bound.
        """
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def peer(self, inner: object) -> Peer | None:
        """The client behind the aiohttp side of a socket pair (None: not one of ours).

        Args:
            inner: The HTTP transport's ``get_extra_info("socket")``.
        """
        fileno = getattr(inner, "fileno", None)
        if fileno is None:
            return None
        try:
            return self._peers.get(int(fileno()))
        except (OSError, ValueError):
            return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, OSError, SSL.Error, asyncio.IncompleteReadError):
            pass  # a client that vanished or spoke garbage: nothing to answer
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = SSL.Connection(self._ctx, None)
        conn.set_accept_state()
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await _flush(conn, writer)
                data = await reader.read(_CHUNK)
                if not data:
                    return
                conn.bio_write(data)
            except SSL.Error:
                await _flush(conn, writer)  # the alert, if any
                return
        await _flush(conn, writer)
        peername = writer.get_extra_info("peername") or ("", 0)
        peer = self._identify(conn, str(peername[0]), int(peername[1]))
        loop = asyncio.get_running_loop()
        outer_end, inner = socket.socketpair()
        outer_end.setblocking(False)
        key = inner.fileno()  # the transport closes `inner`; remember its number
        self._peers[key] = peer
        try:
            await loop.connect_accepted_socket(self._factory, sock=inner)
            pumps = [
                asyncio.create_task(self._tls_to_inner(conn, reader, writer, outer_end)),
                asyncio.create_task(self._inner_to_tls(conn, writer, outer_end)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.ALL_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            if self._peers.get(key) is peer:  # the number may already be reused
                del self._peers[key]
            outer_end.close()

    def _identify(self, conn: SSL.Connection, host: str, port: int) -> Peer:
        cert = conn.get_peer_certificate()
        if cert is None:
            return Peer(host, port, certificate=False, admin=False)
        chain = list(conn.get_peer_cert_chain() or [])[1:]
        try:
            crypto.X509StoreContext(self._store, cert, chain or None).verify_certificate()
        except crypto.X509StoreContextError as exc:
            return Peer(host, port, certificate=True, admin=False, reason=str(exc))
        return Peer(host, port, certificate=True, admin=True)

    async def _tls_to_inner(
        self,
        conn: SSL.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        outer_end: socket.socket,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Drain first: the request may have arrived with the handshake's last flight
                # and already sit decrypted-ready inside the TLS object.
                plain = b""
                while True:
                    try:
                        plain += conn.recv(_CHUNK)
                    except SSL.WantReadError:
                        break
                    except SSL.ZeroReturnError:  # the client's close_notify
                        if plain:
                            await loop.sock_sendall(outer_end, plain)
                        return
                await _flush(conn, writer)  # e.g. TLS 1.3 key updates
                if plain:
                    await loop.sock_sendall(outer_end, plain)
                data = await reader.read(_CHUNK)
                if not data:
                    return
                conn.bio_write(data)
        except (ConnectionError, OSError, SSL.Error):
            return
        finally:
            with contextlib.suppress(OSError):
                outer_end.shutdown(socket.SHUT_WR)  # the HTTP server sees the client's EOF

    async def _inner_to_tls(
        self, conn: SSL.Connection, writer: asyncio.StreamWriter, outer_end: socket.socket
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                plain = await loop.sock_recv(outer_end, _CHUNK)
                if not plain:
                    break
                conn.sendall(plain)
                await _flush(conn, writer)
            with contextlib.suppress(SSL.Error):
                conn.shutdown()  # close_notify
            await _flush(conn, writer)
        except (ConnectionError, OSError, SSL.Error):
            pass
        finally:
            writer.close()


async def _flush(conn: SSL.Connection, writer: asyncio.StreamWriter) -> None:
    out = b""
    while True:
        try:
            chunk = conn.bio_read(_CHUNK)
        except SSL.WantReadError:
            break
        if not chunk:
            break
        out += chunk
    if out:
        writer.write(out)
        await writer.drain()
