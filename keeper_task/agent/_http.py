"""The one boundary between httpx and keeper-task's error tree.

Both agent clients (Plugin tier and Admin tier) send requests through :class:`AgentHttp`.
The default transport (:mod:`keeper_task.agent._transport`) raises keeper-task errors
itself; an httpx transport a caller passes in (``httpx.MockTransport``,
``httpx.HTTPTransport``) raises httpx errors, which :data:`_HTTPX_ERRORS` maps, once, to the
same classes. Every non-2xx status is mapped here too. Each mapped error is re-raised
``from`` the original.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from keeper_task.agent._transport import AgentTransport, agent_error
from keeper_task.errors import (
    AgentResponseError,
    AgentUnreachableError,
    NotFoundError,
    NotTrustedError,
    RequestRejectedError,
    SettingsError,
    ValidationFailedError,
)
from keeper_task.tls import client_ssl_context

__all__ = ["AgentClient", "AgentHttp", "certificate_failure", "decode_json", "path_segment"]

_C = TypeVar("_C", bound="_ClosesOnExit")


#: Upper bound of a request timeout (seconds): one day (the task's --http-timeout stops at 3600).
MAX_TIMEOUT = 86_400


def _valid_timeout(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_TIMEOUT
    )


def path_segment(value: str) -> str:
    """URL-encode one path segment (job ids and plugin names are encoded, per the agent)."""
    return quote(value, safe="")


class _ClosesOnExit:
    """Context-manager support: leaving the ``with`` block calls :meth:`close`."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release what the object holds."""
        raise NotImplementedError


class AgentHttp(_ClosesOnExit):
    """A small synchronous HTTPS client for the agent's loopback API.

    Args:
        base_url: The agent's base URL, for example ``https://127.0.0.1:6889``.
        ssl_context: TLS context; default is the loopback policy of :mod:`keeper_task.tls`.
        timeout: Seconds one request may take in all (connect, TLS, headers, whole body);
            0 < timeout <= 86400, else :class:`~keeper_task.errors.SettingsError`.
        tier: ``"Plugin"`` or ``"Admin"``: named in 403 messages.
        transport: An httpx transport, for example ``httpx.MockTransport`` in unit tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        tier: str = "Plugin",
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not _valid_timeout(timeout):
            raise SettingsError(
                f"timeout must be a number of seconds, 0 < timeout <= {MAX_TIMEOUT}, "
                f"not {timeout!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.tier = tier
        if transport is None:
            if ssl_context is None:
                ssl_context = client_ssl_context(host=httpx.URL(self.base_url).host)
            # Our own SSLContext (never certifi: 60-90 ms; it also carries the client
            # certificate, which httpx 0.28 drops when given as cert=) on our transport:
            # a whole-request deadline, and no httpcore import (see its module docstring).
            transport = AgentTransport(ssl_context=ssl_context)
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"Accept": "application/json", **(headers or {})},
            trust_env=False,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        send_body: bool = False,
        not_found: type[NotFoundError] = NotFoundError,
        what: str = "",
    ) -> httpx.Response:
        """Send one request; return the 2xx response or raise the mapped error.

        Args:
            method: HTTP method.
            path: Path below the base URL, starting with ``/api/``; already encoded.
            json_body: Body to send as JSON (sent when not None, or when ``send_body``).
            send_body: Send ``json_body`` even when it is None (as ``null``).
            not_found: Error class for a 404.
            what: What was asked for, for messages ("plugin 'X'", "job 'y'").
        """
        url = self.base_url + path
        kwargs: dict[str, Any] = {}
        if json_body is not None or send_body:
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _from_httpx(exc, method, url, self._client.timeout) from exc
        self._raise_for_status(response, method, url, not_found, what)
        return response

    def _raise_for_status(
        self,
        response: httpx.Response,
        method: str,
        url: str,
        not_found: type[NotFoundError],
        what: str,
    ) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        subject = what or f"{method} {url}"
        if status == 403:
            raise NotTrustedError(
                f"the agent refused {subject} with 403 (TLS worked): this caller is not on the "
                f"{self.tier} tier{_tier_hint(self.tier)}",
                status_code=status,
                url=url,
            )
        if status == 404:
            raise not_found(f"{subject}: not found (404)", status_code=status, url=url)
        if status == 400:
            errors = _errors_of(response)
            detail = "; ".join(str(e) for e in errors) if errors else _snippet(response)
            raise ValidationFailedError(
                f"the agent rejected {subject} (400): {detail}",
                errors=errors,
                status_code=status,
                url=url,
            )
        if 400 <= status < 500:
            raise RequestRejectedError(
                f"the agent rejected {subject} ({status}): {_snippet(response)}",
                status_code=status,
                url=url,
            )
        if status >= 500:
            raise AgentUnreachableError(
                f"the agent failed on {subject} ({status}): {_snippet(response)}",
                status_code=status,
                url=url,
            )
        raise AgentResponseError(
            f"unexpected answer {status} to {subject}: {_snippet(response)}",
            status_code=status,
            url=url,
        )


class AgentClient(_ClosesOnExit):
    """Base of the agent API clients: each sends through one :class:`AgentHttp`.

    A subclass sets ``self._http`` in ``__init__``; ``with`` and :meth:`close` close it.
    """

    _http: AgentHttp

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


def decode_json(response: httpx.Response, what: str) -> Any:
    """Return the JSON body of ``response`` or raise :class:`AgentResponseError`."""
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentResponseError(
            f"the agent's answer to {what} is not valid JSON: {_snippet(response)}",
            status_code=response.status_code,
            url=str(response.request.url),
        ) from exc


#: httpx error (from a caller's httpx transport) -> kind of :func:`agent_error`; first match
#: wins. A ``ConnectError`` is refined by what caused it (see :func:`_httpx_kind`).
_HTTPX_ERRORS: tuple[tuple[type[httpx.HTTPError], str], ...] = (
    (httpx.TimeoutException, "timeout"),
    (httpx.ConnectError, "connect"),
    (httpx.NetworkError, "dropped"),
    (httpx.RemoteProtocolError, "dropped"),
)


def _httpx_kind(exc: httpx.HTTPError) -> str | None:
    for exc_type, kind in _HTTPX_ERRORS:
        if isinstance(exc, exc_type):
            if kind == "connect" and _in_chain(exc, ConnectionRefusedError) is not None:
                return "refused"
            if kind == "connect" and certificate_failure(exc) is not None:
                return "certificate"
            return kind
    return None


def _from_httpx(
    exc: httpx.HTTPError, method: str, url: str, timeout: httpx.Timeout
) -> AgentUnreachableError:
    kind = _httpx_kind(exc)
    if kind is None:
        return AgentUnreachableError(f"{method} {url} failed: {_reason(exc)}", url=url)
    limits = [timeout.connect, timeout.read, timeout.write]
    seconds = max((t for t in limits if t is not None), default=None)
    return agent_error(kind, method=method, url=url, reason=_reason(exc), timeout=seconds)


def certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """Return the certificate-verification error behind ``exc``, if that is what it is.

    The whole chain (``__cause__`` and ``__context__``) is searched.
    """
    return _in_chain(exc, ssl.SSLCertVerificationError)


_E = TypeVar("_E", bound=BaseException)


def _in_chain(exc: BaseException, wanted: type[_E]) -> _E | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, wanted):
            return current
        todo += [current.__cause__, current.__context__]
    return None


def _tier_hint(tier: str) -> str:
    if tier == "Plugin":
        return (
            " (only processes the agent launched are trusted, and registration can lag the "
            "launch by a moment; run the task through the agent or `keeper-task dev run`)"
        )
    if tier == "Admin":
        return " (check the admin client certificate and key given to this tool)"
    return ""


def _errors_of(response: httpx.Response) -> list[Any]:
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(body, dict):
        errors = body.get("errors") or body.get("Errors")
        if isinstance(errors, list):
            return errors
        if isinstance(errors, dict):  # ASP.NET problem-details shape: {field: [messages]}
            return [
                f"{k}: {m}" for k, v in errors.items() for m in (v if isinstance(v, list) else [v])
            ]
    return []


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit] + "..."


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
