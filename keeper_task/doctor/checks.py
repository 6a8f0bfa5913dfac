"""The checks of ``keeper-task doctor``: one verdict per piece of a live agent install.

Checks run in a fixed order and each names what it needs: a check whose prerequisite failed
is *skipped* (it would only repeat the same failure), so one broken piece gives one ✗ line.

Nothing secret is read into a verdict: of ``appsettings.json`` only the port keys are read,
certificates are described by issuer, subject and validity, and the key password is never
shown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from keeper_task.agent._http import AgentHttp
from keeper_task.agent.jobs import JobsClient
from keeper_task.agent.plugin_settings import PluginSettingsClient
from keeper_task.agent.retry import RetryPolicy
from keeper_task.errors import (
    AgentError,
    JobDefinitionError,
    KeeperTaskError,
    NotTrustedError,
    SettingsError,
)
from keeper_task.jobs import (
    default_agent_root,
    host_os,
    is_builtin_command,
    normalize_os,
    read_job_json,
    resolve_binary,
    validate_job,
)
from keeper_task.jobs.binary import binary_candidates
from keeper_task.tls import client_ssl_context, is_loopback_host

__all__ = [
    "AGENT_PLUGIN",
    "AGENT_ROOT_ENV",
    "DEFAULT_BROKER_PORT",
    "DEFAULT_HTTPS_PORT",
    "DEFAULT_HTTP_PORT",
    "Check",
    "DoctorOptions",
    "Status",
    "api_url",
    "find_agent_root",
    "read_appsettings",
    "run_checks",
]

#: Environment variable naming the agent root (shared with ``keeper-task job``).
AGENT_ROOT_ENV = "KEEPER_AGENT_ROOT"
#: Documented defaults of ``Settings:KestrelHttpsPort`` / ``Settings:KestrelHttpPort``.
DEFAULT_HTTPS_PORT = 6889
DEFAULT_HTTP_PORT = 6888
#: The broker port given in the agent's overview (its configuration key is undocumented).
DEFAULT_BROKER_PORT = 8675
#: The plugin whose merged settings hold the broker address.
AGENT_PLUGIN = "KeeperPrivilegeManager"

Status = Literal["pass", "fail", "warn", "skip"]


@dataclass
class Check:
    """One verdict.

    Attributes:
        name: What was checked (stable, e.g. ``"https port"``, ``"job foo.json: binary"``).
        status: ``pass``; ``fail``; ``warn`` (a problem that does not break tasks, does not
            fail the run); ``skip`` (not applicable, or a prerequisite failed).
        detail: What was found.
        fix: What to do about a ``fail`` or ``warn``.
    """

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json_dict(self) -> dict[str, str]:
        """``{"name", "status", "detail", "fix"}``."""
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorOptions:
    """What ``doctor`` checks against.

    Attributes:
        agent_root: The agent's install root (default: ``KEEPER_AGENT_ROOT``, else the
            documented default for this OS).
        url: The HTTPS API (default: ``https://127.0.0.1:<Settings:KestrelHttpsPort>``).
        client_cert: Admin-tier client certificate (PEM); without it the Admin tier and the
            agent's ``/validate`` are skipped.
        client_key: Its key (PEM), if not inside ``client_cert``.
        key_password: Password of an encrypted key (never shown).
        ca_bundle: CA bundle that should verify the agent's certificate.
        broker_port: The broker port, overriding what doctor would read.
        os_name: The OS the agent runs (default: this host), for the binaries.
        timeout: Seconds per network operation.
    """

    agent_root: Path | None = None
    url: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    key_password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    broker_port: int | None = None
    os_name: str | None = None
    timeout: float = 10.0


def find_agent_root(
    option: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[Path, str]:
    """Return ``(root, source)``: ``--agent-root``, ``KEEPER_AGENT_ROOT`` or the OS default."""
    env = os.environ if environ is None else environ
    if option:
        return Path(option), "--agent-root"
    if env.get(AGENT_ROOT_ENV):
        return Path(env[AGENT_ROOT_ENV]), AGENT_ROOT_ENV
    return default_agent_root(), f"the default for {host_os()}"


_JSON_NOISE = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def read_appsettings(path: Path) -> dict[str, Any]:
    """Parse ``appsettings.json`` as .NET does (comments and trailing commas allowed).

    Raises:
        SettingsError: Unreadable, or not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        relaxed = _TRAILING_COMMA.sub(r"\1", _JSON_NOISE.sub(lambda m: m.group(1) or "", text))
        try:
            data = json.loads(relaxed)
        except ValueError as exc:
            raise SettingsError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{path} must hold a JSON object")
    return data


def api_url(root: Path) -> str:
    """``https://127.0.0.1:<Settings:KestrelHttpsPort>`` from ``root/appsettings.json``.

    The documented default port (6889) when the file or the key is missing or unreadable.
    """
    port = None
    settings_file = root / "appsettings.json"
    if settings_file.is_file():
        try:
            port, _ = _port_value(
                _section(read_appsettings(settings_file), "Settings"), "KestrelHttpsPort"
            )
        except SettingsError:
            port = None
    return f"https://127.0.0.1:{port or DEFAULT_HTTPS_PORT}"


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A configuration section, matched case-insensitively like .NET configuration."""
    for key, value in data.items():
        if str(key).lower() == name.lower() and isinstance(value, Mapping):
            return value
    return {}


def _port_value(section: Mapping[str, Any], key: str) -> tuple[int | None, str | None]:
    """``(port, problem)`` for ``key`` (case-insensitive); ``(None, None)`` when absent."""
    for name, value in section.items():
        if str(name).lower() != key.lower():
            continue
        try:
            port = int(str(value).strip())
        except ValueError:
            return None, f"{key} is {value!r}, not a port number"
        if not 1 <= port <= 65535:
            return None, f"{key} is {port}, outside 1-65535"
        return port, None
    return None, None


def _listens(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _describe_name(name: Any) -> str:
    parts = []
    for rdn in name or ():
        for key, value in rdn:
            if key in ("commonName", "organizationName"):
                parts.append(f"{'CN' if key == 'commonName' else 'O'}={value}")
    return ", ".join(parts) or "(no name)"


def _describe_der(der: bytes) -> dict[str, str]:
    """Issuer, subject and validity of a DER certificate (needs ``cryptography``)."""
    try:
        from cryptography import x509
    except ImportError:
        return {}
    cert = x509.load_der_x509_certificate(der)
    return {
        "issuer": cert.issuer.rfc4514_string() or "(no name)",
        "subject": cert.subject.rfc4514_string() or "(no name)",
        "notBefore": cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC"),
        "notAfter": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
        "_expired": "yes" if cert.not_valid_after_utc < datetime.now(timezone.utc) else "",
    }


def _handshake(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def certificate_report(
    host: str, port: int, ca_bundle: str | None, timeout: float
) -> tuple[dict[str, str], bool | None, str | None]:
    """Describe the server certificate at ``host:port``.

    Returns:
        ``(info, verified, error)``: ``info`` has issuer/subject/validity when readable;
        ``verified`` is None without a bundle, else whether the bundle verifies it;
        ``error`` says why the verifying handshake failed.
    """
    info: dict[str, str] = {}
    if is_loopback_host(host):
        # Read the certificate without judging it first, so a failing bundle can still be
        # compared with what the agent actually presents.
        loose = client_ssl_context(host=host)
        with (
            contextlib.suppress(OSError, ssl.SSLError),
            _handshake(host, port, loose, timeout) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            if der:
                info = _describe_der(der)
    if ca_bundle is None:
        return info, None, None
    strict = client_ssl_context(host=host, ca_bundle=ca_bundle)
    try:
        with _handshake(host, port, strict, timeout) as tls:
            peer = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return info, False, exc.verify_message or str(exc)
    except (OSError, ssl.SSLError) as exc:
        return info, False, str(exc)
    if not info:
        info = {
            "issuer": _describe_name(peer.get("issuer")),
            "subject": _describe_name(peer.get("subject")),
            "notBefore": str(peer.get("notBefore", "")),
            "notAfter": str(peer.get("notAfter", "")),
        }
    return info, True, None


class _Run:
    """Collects checks in order; prerequisites by name."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.failed: set[str] = set()

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        if status == "fail":
            self.failed.add(name)
        return check

    def skip(self, name: str, why: str) -> None:
        self.add(name, "skip", why)


@dataclass
class _Context:
    """What earlier checks learned that later ones need."""

    options: DoctorOptions
    os_name: str
    root: Path
    https_port: int = DEFAULT_HTTPS_PORT
    http_port: int = DEFAULT_HTTP_PORT
    broker_section: Mapping[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    base_url: str = ""
    port_source: str = ""
    #: The CA bundle later calls verify with (None once it failed to verify the agent).
    bundle: str | None = None
    reachable: bool = False
    admin: JobsClient | None = None
    broker_settings: dict[str, str] | None = None


def run_checks(options: DoctorOptions) -> list[Check]:
    """Run every check against the agent described by ``options``; never raises."""
    run = _Run()
    root, source = find_agent_root(options.agent_root)
    ctx = _Context(options, normalize_os(options.os_name) if options.os_name else host_os(), root)
    _check_agent_root(run, ctx, source)
    _check_appsettings(run, ctx)
    _check_https_port(run, ctx)
    _check_http_port(run, ctx)
    _check_public_tier(run, ctx)
    _decide_reachable(run, ctx)
    _check_admin_tier(run, ctx)
    _check_plugin_tier(run, ctx)
    _check_jobs(run, ctx)
    _check_broker(run, options, ctx.broker_settings, ctx.broker_section, options.timeout)
    return run.checks


def _check_agent_root(run: _Run, ctx: _Context, source: str) -> None:
    if ctx.root.is_dir():
        run.add("agent root", "pass", f"{ctx.root} ({source})")
    else:
        run.add(
            "agent root",
            "fail",
            f"{ctx.root} ({source}) is not a directory",
            "pass --agent-root (or KEEPER_AGENT_ROOT) with the folder that holds the agent "
            "service executable and appsettings.json",
        )


def _check_appsettings(run: _Run, ctx: _Context) -> None:
    settings_file = ctx.root / "appsettings.json"
    if "agent root" in run.failed:
        run.skip("appsettings.json", "no agent root")
        return
    if not settings_file.is_file():
        run.add(
            "appsettings.json",
            "fail",
            f"{settings_file} does not exist",
            "pass --agent-root with the folder of the agent service executable "
            "(appsettings.json sits next to it)",
        )
        return
    try:
        data = read_appsettings(settings_file)
    except SettingsError as exc:
        run.add(
            "appsettings.json",
            "fail",
            str(exc),
            "repair the file (the agent reads it at service start) or restore it",
        )
        return
    _check_settings_ports(run, ctx, settings_file, data)


def _check_settings_ports(
    run: _Run, ctx: _Context, settings_file: Path, data: Mapping[str, Any]
) -> None:
    section = _section(data, "Settings")
    found_https, https_problem = _port_value(section, "KestrelHttpsPort")
    found_http, http_problem = _port_value(section, "KestrelHttpPort")
    problems = [p for p in (https_problem, http_problem) if p]
    ctx.https_port = found_https or DEFAULT_HTTPS_PORT
    ctx.http_port = found_http or DEFAULT_HTTP_PORT
    ctx.broker_section = _section(data, "MqttBrokerSettings")
    if problems:
        run.add(
            "appsettings.json",
            "fail",
            f"{settings_file}: {'; '.join(problems)}",
            "set Settings:KestrelHttpsPort/KestrelHttpPort to integers in 1024-65535 "
            "and restart the agent service",
        )
        return
    detail = (
        f"{settings_file}: HTTPS port {ctx.https_port}"
        f"{'' if found_https else ' (default)'}, HTTP port {ctx.http_port}"
        f"{'' if found_http else ' (default)'}"
    )
    run.add("appsettings.json", "pass", detail)


def _resolve_api_address(ctx: _Context) -> None:
    """Host, port and base URL of the HTTPS API: ``--url``, else appsettings.json."""
    if ctx.options.url:
        import httpx

        try:
            url = httpx.URL(ctx.options.url)
        except httpx.InvalidURL:
            url = httpx.URL("https://invalid")
        ctx.host = url.host or "127.0.0.1"
        ctx.https_port = url.port or 443
        ctx.port_source = "--url"
    else:
        ctx.host = "127.0.0.1"
        ctx.port_source = "Settings:KestrelHttpsPort"
    ctx.base_url = f"https://{ctx.host}:{ctx.https_port}"


def _check_https_port(run: _Run, ctx: _Context) -> None:
    _resolve_api_address(ctx)
    why = _listens(ctx.host, ctx.https_port, ctx.options.timeout)
    if why is None:
        run.add("https port", "pass", f"{ctx.host}:{ctx.https_port} listens ({ctx.port_source})")
    else:
        run.add(
            "https port",
            "fail",
            f"nothing accepts connections on {ctx.host}:{ctx.https_port} "
            f"({ctx.port_source}): {why}",
            "start the agent service, or point doctor at the right port "
            "(--url, or Settings:KestrelHttpsPort in appsettings.json)",
        )


def _check_http_port(run: _Run, ctx: _Context) -> None:
    if ctx.options.url:
        run.skip("http port", "--url given; the HTTP port of appsettings.json is not used")
        return
    why = _listens("127.0.0.1", ctx.http_port, ctx.options.timeout)
    if why is None:
        run.add(
            "http port", "pass", f"127.0.0.1:{ctx.http_port} listens (Settings:KestrelHttpPort)"
        )
    else:
        run.add(
            "http port",
            "warn",
            f"nothing accepts connections on 127.0.0.1:{ctx.http_port}: {why}",
            "only matters to tools that use the HTTP endpoint (it redirects to HTTPS; "
            "keeper-task never uses it)",
        )


def _check_public_tier(run: _Run, ctx: _Context) -> None:
    """``health`` and ``tls certificate``; both need the HTTPS port to listen."""
    if "https port" in run.failed:
        run.skip("health", "the HTTPS port does not listen")
        run.skip("tls certificate", "the HTTPS port does not listen")
        return
    _check_health(run, ctx)
    _check_tls_certificate(run, ctx)


def _check_health(run: _Run, ctx: _Context) -> None:
    try:
        plain_ctx: ssl.SSLContext | None = client_ssl_context(host=ctx.host)
    except SettingsError:
        plain_ctx = None
    try:
        with _http(ctx.base_url, plain_ctx, ctx.options, "Public") as http:
            response = http.request("GET", "/health", what="GET /health")
        run.add("health", "pass", f"GET {ctx.base_url}/health answered {response.status_code}")
    except KeeperTaskError as exc:
        run.add(
            "health",
            "fail",
            str(exc),
            "check that the agent service runs and that this port is its HTTPS API",
        )


def _check_tls_certificate(run: _Run, ctx: _Context) -> None:
    ca_bundle = ctx.options.ca_bundle
    try:
        info, verified, error = certificate_report(
            ctx.host, ctx.https_port, ca_bundle, ctx.options.timeout
        )
    except SettingsError as exc:
        run.add("tls certificate", "fail", str(exc), "pass a readable PEM file to --ca-bundle")
        return
    described = _cert_text(info)
    if verified is None:
        expired = bool(info.get("_expired"))
        run.add(
            "tls certificate",
            "fail" if expired else "pass",
            f"{described}; not verified (no --ca-bundle: unverified TLS, loopback only)",
            "restart the agent service (it regenerates its certificate at start)"
            if expired
            else "",
        )
    elif verified:
        run.add("tls certificate", "pass", f"{described}; verified by {ca_bundle}")
    else:
        run.add(
            "tls certificate",
            "fail",
            f"{described}; NOT verified by {ca_bundle}: {error}",
            "export the agent's current CA bundle again (the agent regenerates its "
            "certificate at every start), or omit --ca-bundle to use unverified TLS "
            "on loopback",
        )


def _decide_reachable(run: _Run, ctx: _Context) -> None:
    # Later calls verify with the bundle only if it works; on loopback they fall back to the
    # agent's documented unverified mode so one bad bundle gives one ✗ line, not five.
    ctx.bundle = ctx.options.ca_bundle if "tls certificate" not in run.failed else None
    ctx.reachable = "https port" not in run.failed and "health" not in run.failed
    if ctx.reachable and ctx.bundle is None and not is_loopback_host(ctx.host):
        ctx.reachable = False


def _check_admin_tier(run: _Run, ctx: _Context) -> None:
    options = ctx.options
    if not ctx.reachable:
        run.skip("admin tier", "the API is not reachable")
        return
    if not options.client_cert:
        run.skip("admin tier", "no --cert given (GET /api/Jobs needs the admin client certificate)")
        return
    try:
        admin = JobsClient(
            ctx.base_url,
            client_cert=options.client_cert,
            client_key=options.client_key,
            key_password=options.key_password,
            ca_bundle=ctx.bundle,
            timeout=options.timeout,
        )
        listing = admin.list()
    except SettingsError as exc:
        run.add("admin tier", "fail", str(exc), "check the --cert/--key paths and the key password")
    except NotTrustedError as exc:
        run.add(
            "admin tier",
            "fail",
            f"client certificate {options.client_cert} refused: {exc}",
            "use the admin client certificate issued for this agent by your Keeper "
            "deployment team (from a CA the agent trusts, not expired)",
        )
    except AgentError as exc:
        run.add("admin tier", "fail", str(exc), "check that the agent service runs")
    else:
        ctx.admin = admin
        run.add("admin tier", "pass", f"GET /api/Jobs answered: {len(listing.jobs)} job(s)")


def _check_plugin_tier(run: _Run, ctx: _Context) -> None:
    if not ctx.reachable:
        run.skip("plugin tier", "the API is not reachable")
        return
    try:
        ssl_ctx = client_ssl_context(host=ctx.host, ca_bundle=ctx.bundle)
        with PluginSettingsClient(
            ctx.base_url,
            ssl_context=ssl_ctx,
            timeout=ctx.options.timeout,
            retry=RetryPolicy(budget=0),
        ) as plugin:
            ctx.broker_settings = plugin.get_all(AGENT_PLUGIN)
    except NotTrustedError:
        run.add(
            "plugin tier",
            "pass",
            f"GET /api/PluginSettings/{AGENT_PLUGIN} refused this shell with 403, as it "
            "must (only processes the agent launched may read it)",
        )
    except KeeperTaskError as exc:
        run.add("plugin tier", "fail", str(exc), "check that the agent service runs")
    else:
        run.add(
            "plugin tier",
            "fail",
            f"GET /api/PluginSettings/{AGENT_PLUGIN} answered this process (it should "
            "answer only processes the agent launched)",
            "run doctor from a plain administrator shell; if it already is one, review "
            "Settings:AlternativeSignatures in appsettings.json",
        )


def _check_jobs(run: _Run, ctx: _Context) -> None:
    jobs_dir = ctx.root / "Jobs"
    files = sorted(jobs_dir.glob("*.json")) if jobs_dir.is_dir() else []
    if not files:
        run.skip("jobs", f"no job files in {jobs_dir}")
    for path in files:
        _check_job_file(run, path, ctx.root, ctx.os_name, ctx.admin)
    if ctx.admin is not None:
        ctx.admin.close()


@contextlib.contextmanager
def _http(
    base_url: str, ctx: ssl.SSLContext | None, options: DoctorOptions, tier: str
) -> Iterator[AgentHttp]:
    http = AgentHttp(base_url, ssl_context=ctx, timeout=options.timeout, tier=tier)
    try:
        yield http
    finally:
        http.close()


def _cert_text(info: Mapping[str, str]) -> str:
    if not info:
        return "certificate details unavailable (install 'cryptography' or pass --ca-bundle)"
    text = (
        f"issuer {info.get('issuer')}, subject {info.get('subject')}, valid "
        f"{info.get('notBefore')} to {info.get('notAfter')}"
    )
    return text + (" (EXPIRED)" if info.get("_expired") else "")


def _check_job_file(
    run: _Run, path: Path, root: Path, os_name: str, admin: JobsClient | None
) -> None:
    name = f"job {path.name}"
    try:
        data = read_job_json(path)
    except JobDefinitionError as exc:
        run.add(f"{name}: rules", "fail", str(exc), "fix the JSON syntax at the position shown")
        run.skip(f"{name}: binary", "the job file is unreadable")
        run.skip(f"{name}: agent validate", "the job file is unreadable")
        return
    report = validate_job(data, file_name=path.name, current_os=os_name)
    if not report.valid:
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        run.add(
            f"{name}: rules",
            "fail",
            f"{report.errors[0]}{more}",
            f"fix the job file; `keeper-task job validate {path}` lists every problem",
        )
    else:
        warn = f" ({len(report.warnings)} warning(s))" if report.warnings else ""
        run.add(f"{name}: rules", "pass", f"valid offline{warn}")
    _check_binaries(run, name, data, root, os_name)
    if not report.valid or f"{name}: binary" in run.failed:
        run.skip(f"{name}: agent validate", "fix the problems above first")
    elif admin is None:
        run.skip(f"{name}: agent validate", "needs the Admin tier (--cert)")
    else:
        try:
            verdict = admin.validate(data)
        except KeeperTaskError as exc:
            run.add(f"{name}: agent validate", "fail", str(exc), "check the Admin tier above")
        else:
            if verdict.valid:
                run.add(f"{name}: agent validate", "pass", "POST /api/Jobs/validate: valid")
            else:
                run.add(
                    f"{name}: agent validate",
                    "fail",
                    "the agent refused it: " + "; ".join(verdict.errors or ["(no reason)"]),
                    "fix what the agent names; its rules may be stricter than the offline ones",
                )


def _check_binaries(run: _Run, name: str, data: Any, root: Path, os_name: str) -> None:
    check = f"{name}: binary"
    tasks = data.get("tasks") if isinstance(data, Mapping) else None
    if not isinstance(tasks, list):
        run.skip(check, "the job has no task list")
        return
    os_filter = data.get("osFilter") if isinstance(data, Mapping) else None
    key = {"windows": "windows", "linux": "linux", "macos": "macOS"}[os_name]
    if isinstance(os_filter, Mapping) and os_filter.get(key) is False:
        run.skip(check, f"osFilter excludes {os_name}")
        return
    missing: list[str] = []
    present: list[str] = []
    for task in tasks:
        if not isinstance(task, Mapping):
            continue
        command = task.get("command")
        if not isinstance(command, str) or is_builtin_command(command):
            continue
        found = resolve_binary(task, root, os_name)
        if found is None:
            looked = " or ".join(str(p) for p in binary_candidates(task, root, os_name))
            missing.append(f"{command!r} (looked at {looked or 'nothing: no path to try'})")
        elif os_name == host_os() != "windows" and not os.access(found, os.X_OK):
            missing.append(f"{command!r} at {found} is not executable")
        else:
            present.append(str(found))
    if missing:
        run.add(
            check,
            "fail",
            f"binary missing for {os_name}: {'; '.join(missing)}",
            "deploy the task binary (keeper-task job deploy --binary DIR), or chmod +x it",
        )
    elif present:
        run.add(check, "pass", ", ".join(present))
    else:
        run.skip(check, "only built-in commands")


def _check_broker(
    run: _Run,
    options: DoctorOptions,
    settings: Mapping[str, str] | None,
    section: Mapping[str, Any],
    timeout: float,
) -> None:
    host = "127.0.0.1"
    port: int | None = None
    if options.broker_port is not None:
        port, source = options.broker_port, "--broker-port"
    elif settings is not None and settings.get("broker.port", "").isdigit():
        port, source = int(settings["broker.port"]), "the agent's Plugin Settings"
        host = settings.get("broker.host") or host
    else:
        # The port's configuration key is undocumented: take any MqttBrokerSettings key that
        # names a port, else the port the agent's overview gives.
        for key in section:
            if "port" in str(key).lower():
                found, _ = _port_value(section, str(key))
                if found is not None:
                    port, source = found, f"appsettings.json MqttBrokerSettings:{key}"
                    break
        if port is None:
            port, source = DEFAULT_BROKER_PORT, "the documented default"
        address = section.get("IpAddress") if isinstance(section.get("IpAddress"), str) else None
        host = address or host
    why = _listens(host, port, timeout)
    if why is None:
        run.add("broker port", "pass", f"{host}:{port} listens ({source})")
    else:
        run.add(
            "broker port",
            "fail",
            f"nothing accepts connections on {host}:{port} ({source}): {why}",
            "start the agent service (it hosts the broker); if the broker uses another port, "
            "pass it with --broker-port",
        )
