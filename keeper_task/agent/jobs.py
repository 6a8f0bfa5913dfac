"""The Job Management API client (Admin tier, mutual TLS): deployment tooling's side of the agent.

Never call this from inside a task binary: the agent only lets deployment tooling with
admin-class credentials (typically a client certificate from the Keeper deployment team) use
``/api/Jobs``.

Example:
    >>> with JobsClient.from_env() as jobs:            # doctest: +SKIP
    ...     report = jobs.validate(load_job("Jobs/disk-report.json"))
    ...     if report.valid:
    ...         jobs.create(load_job("Jobs/disk-report.json"))
    ...         jobs.trigger("disk-report")
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from keeper_task.agent._http import AgentClient, AgentHttp, decode_json, path_segment
from keeper_task.agent._transport import ConnectFailedError, ConnectionDroppedError
from keeper_task.errors import (
    AgentResponseError,
    AgentUnreachableError,
    JobDefinitionError,
    JobNotFoundError,
    NotTrustedError,
    SettingsError,
    ValidationFailedError,
)
from keeper_task.jobs.model import Job, job_from_data, json_type_name
from keeper_task.jobs.validate import ValidationReport
from keeper_task.tls import client_ssl_context

__all__ = ["DEFAULT_AGENT_URL", "ENV_VARS", "JobListing", "JobSummary", "JobsClient"]

#: The agent's documented HTTPS API address (``Settings:KestrelHttpsPort`` 6889).
DEFAULT_AGENT_URL = "https://127.0.0.1:6889"

#: Environment variables read by :meth:`JobsClient.from_env`.
ENV_VARS = {
    "url": "KEEPER_AGENT_URL",
    "client_cert": "KEEPER_ADMIN_CERT",
    "client_key": "KEEPER_ADMIN_KEY",
    "key_password": "KEEPER_ADMIN_KEY_PASSWORD",
    "ca_bundle": "KEEPER_CA_BUNDLE",
}

# OpenSSL alert texts that mean "the server refused our client certificate (or its absence)".
_CERT_REQUIRED = ("certificate required", "certificate_required")
_CERT_REFUSED = (
    "unknown ca",
    "unknown_ca",
    "bad certificate",
    "bad_certificate",
    "certificate unknown",
    "certificate_unknown",
    "decrypt error",
    "access denied",
    "handshake failure",
)


@dataclass
class JobSummary:
    """One entry of ``GET /api/Jobs``.

    The entries' shape is [UNKNOWN]: ``id``/``name``/``enabled`` are read from an object in
    any key casing (or a bare string is taken as the id); ``raw`` is the entry as sent.
    """

    id: str | None
    name: str | None = None
    enabled: bool | None = None
    raw: Any = field(default=None, repr=False)

    @classmethod
    def from_raw(cls, item: Any) -> JobSummary:
        """Read one list entry, whatever its shape."""
        if isinstance(item, str):
            return cls(id=item, raw=item)
        if isinstance(item, Mapping):
            lowered = {str(k).lower(): v for k, v in item.items()}
            job_id = lowered.get("id", lowered.get("jobid"))
            name = lowered.get("name")
            enabled = lowered.get("enabled")
            return cls(
                id=job_id if isinstance(job_id, str) else None,
                name=name if isinstance(name, str) else None,
                enabled=enabled if isinstance(enabled, bool) else None,
                raw=item,
            )
        return cls(id=None, raw=item)


@dataclass
class JobListing:
    """The answer to ``GET /api/Jobs``: ``{jobs, count, message}``, with the raw body kept."""

    jobs: list[JobSummary]
    count: int | None = None
    message: str | None = None
    raw: Any = field(default=None, repr=False)

    @property
    def ids(self) -> list[str]:
        """The ids of the listed jobs (entries without a readable id are skipped)."""
        return [job.id for job in self.jobs if job.id is not None]


class JobsClient(AgentClient):
    """Client of the agent's ``/api/Jobs`` endpoints (Admin tier).

    Args:
        base_url: The agent's HTTPS API, default ``https://127.0.0.1:6889``.
        ssl_context: A ready TLS context; when given, the certificate arguments are ignored.
        client_cert: PEM client certificate for mutual TLS (may also hold the key).
        client_key: PEM private key of ``client_cert``.
        key_password: Password of an encrypted ``client_key``.
        ca_bundle: PEM CA bundle to verify the agent; without it TLS is unverified, which
            is allowed toward loopback only.
        timeout: Seconds one request may take in all (connect, TLS, headers, whole body).
        transport: An httpx transport (``httpx.MockTransport`` in unit tests).

    Raises:
        SettingsError: Unreadable certificate/key/bundle, a key without a certificate, or a
            non-HTTPS URL.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_AGENT_URL,
        *,
        ssl_context: ssl.SSLContext | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        key_password: str | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise SettingsError(f"invalid agent URL {base_url!r}: {exc}") from exc
        if url.scheme != "https" or not url.host:
            raise SettingsError(
                f"the Job Management API needs an https:// URL (mutual TLS), got {base_url!r}; "
                f"the agent's default is {DEFAULT_AGENT_URL}"
            )
        if client_key is not None and client_cert is None:
            raise SettingsError(
                "a client key was given without a client certificate; pass --cert "
                f"(or {ENV_VARS['client_cert']}) too"
            )
        self.has_client_cert = client_cert is not None or ssl_context is not None
        self._cert_label = os.fspath(client_cert) if client_cert is not None else None
        if ssl_context is None:
            ssl_context = client_ssl_context(
                host=url.host,
                ca_bundle=ca_bundle,
                client_cert=client_cert,
                client_key=client_key,
                key_password=key_password,
            )
        # 30 s default: create/validate run the agent's full validator (binary checks).
        self._http = AgentHttp(
            str(url), ssl_context=ssl_context, timeout=timeout, tier="Admin", transport=transport
        )
        self.base_url = self._http.base_url

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> JobsClient:
        """Build a client from the environment; keyword arguments given here win.

        Reads ``KEEPER_AGENT_URL`` (default ``https://127.0.0.1:6889``),
        ``KEEPER_ADMIN_CERT``, ``KEEPER_ADMIN_KEY``, ``KEEPER_ADMIN_KEY_PASSWORD`` and
        ``KEEPER_CA_BUNDLE``; empty values count as unset.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            value = env.get(var)
            if value:
                values[name] = value
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        base_url = values.pop("url", values.pop("base_url", DEFAULT_AGENT_URL))
        return cls(base_url, **values)

    # -- endpoints -----------------------------------------------------------------------

    def list(self) -> JobListing:
        """``GET /api/Jobs``: the jobs the agent knows."""
        body = self._json("GET", "/api/Jobs", what="the job list")
        if isinstance(body, list):  # tolerate a bare array
            return JobListing([JobSummary.from_raw(i) for i in body], len(body), None, body)
        if not isinstance(body, Mapping):
            raise AgentResponseError(
                f"the agent's job list is {json_type_name(body)}, expected an object with "
                "jobs, count and message"
            )
        lowered = {str(k).lower(): v for k, v in body.items()}
        items = lowered.get("jobs")
        jobs = [JobSummary.from_raw(i) for i in items] if isinstance(items, list) else []
        count = lowered.get("count")
        message = lowered.get("message")
        return JobListing(
            jobs=jobs,
            count=count if isinstance(count, int) and not isinstance(count, bool) else None,
            message=message if isinstance(message, str) else None,
            raw=body,
        )

    def get_json(self, job_id: str) -> Any:
        """``GET /api/Jobs/{id}``: the job definition exactly as the agent sent it.

        Use this to show or save what the agent holds even when it does not fit
        :class:`~keeper_task.jobs.Job` (the agent's serializer may, for example, write enum
        values such as ``executionType`` as numbers).

        Raises:
            JobNotFoundError: The agent knows no such job.
        """
        return self._json(
            "GET", f"/api/Jobs/{path_segment(job_id)}", job_id=job_id, what=f"job {job_id!r}"
        )

    def get(self, job_id: str) -> Job:
        """``GET /api/Jobs/{id}``: one job definition, as a :class:`~keeper_task.jobs.Job`.

        Raises:
            JobNotFoundError: The agent knows no such job.
            AgentResponseError: The answer is not a job the model can hold.
        """
        what = f"job {job_id!r}"
        body = self.get_json(job_id)
        try:
            return job_from_data(body, source=f"the agent's answer for {what}")
        except JobDefinitionError as exc:
            raise AgentResponseError(str(exc)) from exc

    def create(self, job: Job | Mapping[str, Any]) -> Any:
        """``POST /api/Jobs``: create the job, or update it if its id exists.

        The agent runs its full validator, which needs the task binary on disk already.

        Returns:
            The agent's answer body (its shape is undocumented), or None when empty.

        Raises:
            ValidationFailedError: 400; ``errors`` holds the agent's error list.
        """
        body = _job_body(job)
        return self._json("POST", "/api/Jobs", json_body=body, what=_job_label(body))

    def update(self, job_id: str, job: Job | Mapping[str, Any]) -> Any:
        """``PUT /api/Jobs/{id}``: replace an existing job.

        The body is sent as given; the agent overwrites a different ``id`` in it with the
        URL's id (the URL id wins).

        Raises:
            JobNotFoundError: No job with that id exists (PUT does not create).
        """
        return self._json(
            "PUT",
            f"/api/Jobs/{path_segment(job_id)}",
            json_body=_job_body(job),
            job_id=job_id,
            what=f"job {job_id!r}",
        )

    def delete(self, job_id: str) -> Any:
        """``DELETE /api/Jobs/{id}``."""
        return self._json(
            "DELETE", f"/api/Jobs/{path_segment(job_id)}", job_id=job_id, what=f"job {job_id!r}"
        )

    def validate(self, job: Job | Mapping[str, Any]) -> ValidationReport:
        """``POST /api/Jobs/validate``: the agent's verdict, nothing saved.

        A 400 with an ``errors`` array is returned as an invalid report too.
        """
        body = _job_body(job)
        try:
            answer = self._json(
                "POST", "/api/Jobs/validate", json_body=body, what=f"validating {_job_label(body)}"
            )
        except ValidationFailedError as exc:
            return ValidationReport(
                valid=False,
                errors=[str(e) for e in exc.errors] or [str(exc)],
                job_id=body.get("id") if isinstance(body.get("id"), str) else None,
            )
        try:
            return ValidationReport.from_agent_json(answer)
        except ValueError as exc:
            raise AgentResponseError(f"the agent's /validate answer: {exc}") from exc

    def trigger(self, job_id: str, context: Mapping[str, Any] | None = None) -> Any:
        """``POST /api/Jobs/{id}/trigger`` with an event-context object (``{}`` when None).

        Raises:
            ValidationFailedError: 400, typically because the job is disabled.
        """
        if context is not None and not isinstance(context, Mapping):
            raise TypeError(f"context must be a mapping, got {type(context).__name__}")
        return self._json(
            "POST",
            f"/api/Jobs/{path_segment(job_id)}/trigger",
            json_body=dict(context or {}),
            job_id=job_id,
            what=f"triggering job {job_id!r}",
        )

    def run(self, job_id: str) -> Any:
        """``POST /api/Jobs/{id}/run`` (no body; runs asynchronously on the agent)."""
        return self._json(
            "POST",
            f"/api/Jobs/{path_segment(job_id)}/run",
            job_id=job_id,
            what=f"running job {job_id!r}",
        )

    def reload(self) -> Any:
        """``POST /api/Jobs/reload``: the agent re-reads ``Jobs/`` from disk."""
        return self._json("POST", "/api/Jobs/reload", what="reloading the jobs")

    # -- plumbing ------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        job_id: str | None = None,
        what: str,
    ) -> Any:
        try:
            response = self._http.request(
                method, path, json_body=json_body, not_found=JobNotFoundError, what=what
            )
        except JobNotFoundError as exc:
            if job_id is None:
                raise
            raise JobNotFoundError(
                f"job {job_id!r} is unknown to the agent; `keeper-task job list` shows what exists",
                status_code=exc.status_code,
                url=exc.url,
            ) from exc
        except NotTrustedError as exc:
            if self.has_client_cert or exc.status_code != 403:
                raise
            # An agent that only *requests* client certificates (as the emulator does) lets
            # the handshake through and refuses on the Admin tier: say what is missing.
            raise NotTrustedError(
                f"the agent refused {what} with 403 (TLS worked): the Admin tier needs a client "
                f"certificate and none was given; pass --cert/--key (or "
                f"{ENV_VARS['client_cert']}/{ENV_VARS['client_key']})",
                status_code=exc.status_code,
                url=exc.url,
            ) from exc
        except AgentUnreachableError as exc:
            refused = self._certificate_refusal(exc)
            if refused is None:
                raise
            raise NotTrustedError(refused, url=exc.url) from exc
        if not response.content.strip():
            return None
        return decode_json(response, what)

    def _certificate_refusal(self, exc: AgentUnreachableError) -> str | None:
        """Explain a TLS-level refusal of our client certificate, or None if it is not one."""
        dropped = isinstance(exc, ConnectionDroppedError)
        if not (dropped or isinstance(exc, ConnectFailedError)):
            return None  # refused, timed out, 5xx: not a certificate problem
        text = _chain_text(exc).lower()
        cert_alert = any(s in text for s in _CERT_REQUIRED + _CERT_REFUSED)
        if not cert_alert and not dropped:
            return None  # a failed connect without a certificate alert: wrong port, no TLS
        if not self.has_client_cert:
            return (
                f"the agent at {self.base_url} requires a client certificate for the Admin tier "
                f"and none was given; pass --cert/--key (or {ENV_VARS['client_cert']}/"
                f"{ENV_VARS['client_key']}) with the certificate your Keeper deployment team issued"
            )
        label = f" {self._cert_label}" if self._cert_label else ""
        if cert_alert:
            return (
                f"the agent at {self.base_url} rejected the client certificate{label} during the "
                "TLS handshake; use the admin certificate issued for this agent "
                "(issued by a CA the agent trusts, not expired)"
            )
        if dropped:
            # Some TLS 1.3 servers (asyncio-based ones among them) drop the connection after a
            # failed client-certificate check without a readable alert: the client only sees
            # the server hang up before answering. Over TLS to the Admin tier, with a
            # certificate presented, that is the certificate being refused.
            return (
                f"the agent at {self.base_url} hung up without answering right after the TLS "
                f"handshake: it most likely rejected the client certificate{label}; use the "
                "admin certificate issued for this agent (issued by a CA the agent trusts, "
                "not expired)"
            )
        return None


def _chain_text(exc: BaseException) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


def _job_body(job: Job | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(job, Job):
        return job.to_json_dict()
    if isinstance(job, Mapping):
        return dict(job)
    raise TypeError(f"job must be a Job or a mapping, got {type(job).__name__}")


def _job_label(body: Mapping[str, Any]) -> str:
    job_id = body.get("id")
    return f"job {job_id!r}" if isinstance(job_id, str) else "the job"
