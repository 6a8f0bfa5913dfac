"""``keeper-task job``: validate job files, deploy them, and drive the agent's Job Management API.

Every agent call is Admin tier (mutual TLS). Credentials come from options or the environment:
``--url``/``KEEPER_AGENT_URL``, ``--cert``/``KEEPER_ADMIN_CERT``, ``--key``/``KEEPER_ADMIN_KEY``,
``KEEPER_ADMIN_KEY_PASSWORD`` (environment only: a password on the command line leaks into
process listings and shell history), ``--ca-bundle``/``KEEPER_CA_BUNDLE``.

Exit codes: 0 success; 1 the job is invalid or malformed, or the agent refused the request
with 400 (its ``errors`` are printed); otherwise the code of the :mod:`keeper_task.errors`
class that ended the command: 64 usage (found before anything runs: bad option values, a
missing or unreadable job file), 68 unknown job id, 69 agent unreachable, an unexpected
answer, or another service at the URL, 77 403 / client certificate refused,
78 settings (certificate/key/CA files, URL, agent root). Errors are one line on stderr.

``--json`` prints one JSON document on stdout, also on failure (see :data:`JSON_HELP`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keeper_task.agent.jobs import DEFAULT_AGENT_URL, JobsClient
from keeper_task.errors import (
    AgentError,
    AgentUnreachableError,
    JobDefinitionError,
    KeeperTaskError,
    NotTrustedError,
    UsageError,
    ValidationFailedError,
)
from keeper_task.jobs import (
    Job,
    ValidationReport,
    default_agent_root,
    host_os,
    install_binary,
    is_builtin_command,
    load_job,
    normalize_os,
    read_job_json,
    validate_job,
)

__all__ = ["register"]

AGENT_ROOT_ENV = "KEEPER_AGENT_ROOT"
EXIT_INVALID = 1
#: Largest ``--timeout`` accepted: a day (more is a typo, and overflows socket timeouts).
MAX_TIMEOUT = 86400.0

Command = Callable[[argparse.Namespace], int]

#: What ``--json`` prints, per sub-command (also shown by ``--help``).
JSON_HELP = {
    "validate": '{"valid": bool, "files": [{"file", "valid", "errors", "warnings", "jobId", '
    '"agent": null | {"valid", "errors", "warnings", "jobId"}}]}',
    "list": 'the agent\'s answer as sent: {"jobs": [...], "count", "message"}',
    "get": "the job definition, exactly as the agent returned it",
    "create": '{"ok": true, "jobId", "response": <the agent\'s answer or null>}',
    "update": '{"ok": true, "jobId", "response": <the agent\'s answer or null>}',
    "delete": '{"ok": true, "jobId", "response": <the agent\'s answer or null>}',
    "trigger": '{"ok": true, "jobId", "response": <the agent\'s answer or null>}',
    "run": '{"ok": true, "jobId", "response": <the agent\'s answer or null>}',
    "reload": '{"ok": true, "jobId": null, "response": <the agent\'s answer or null>}',
    "deploy": '{"ok": bool, "steps": [{"step": "binary" | "validate" | "agent validate" | '
    '"create" | "trigger", ...}]}',
}
_JSON_ERROR = (
    'On failure every sub-command prints {"ok": false, "error": "<message>", "exitCode": N} '
    '(deploy adds "steps") on stdout, and the message on stderr.'
)
_EXIT_HELP = (
    "exit codes: 0 success; 1 job invalid or malformed, or refused by the agent with 400; "
    "64 usage (bad option values, a missing or unreadable job file); 68 unknown job id; "
    "69 agent unreachable, unexpected answer or another service at the URL; "
    "77 403 or client certificate refused; 78 certificate/key/CA files, URL or agent root"
)


def register(subparsers: Any) -> None:
    """Add the ``job`` command and its sub-commands to the ``keeper-task`` parser."""
    parser = subparsers.add_parser(
        "job",
        help="validate, deploy and manage jobs (agent Job Management API, Admin tier)",
        description="Validate job JSON offline and manage jobs on the agent (Admin tier, "
        "mutual TLS). Agent options also read KEEPER_AGENT_URL, KEEPER_ADMIN_CERT, "
        "KEEPER_ADMIN_KEY, KEEPER_ADMIN_KEY_PASSWORD and KEEPER_CA_BUNDLE.",
        epilog=f"{_EXIT_HELP}. {_JSON_ERROR}",
    )
    parser.set_defaults(func=_help_of(parser))
    sub = parser.add_subparsers(title="job commands", metavar="COMMAND", parser_class=type(parser))

    agent = argparse.ArgumentParser(add_help=False)
    group = agent.add_argument_group("agent connection (Admin tier)")
    group.add_argument(
        "--url",
        help=f"agent HTTPS API (env KEEPER_AGENT_URL; default {DEFAULT_AGENT_URL})",
    )
    group.add_argument("--cert", help="admin client certificate, PEM (env KEEPER_ADMIN_CERT)")
    group.add_argument(
        "--key",
        help="key of --cert, PEM, if not inside it (env KEEPER_ADMIN_KEY); its password is "
        "read from KEEPER_ADMIN_KEY_PASSWORD only",
    )
    group.add_argument(
        "--ca-bundle",
        help="CA bundle to verify the agent (env KEEPER_CA_BUNDLE); without it TLS is "
        "unverified, which is allowed toward loopback only",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        help=f"seconds per request, more than 0 and at most {MAX_TIMEOUT:g} (default 30)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print machine-readable JSON")

    def add(name: str, func: Command, help_text: str) -> Any:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[agent, output],
            epilog=f"--json prints {JSON_HELP[name]}. {_JSON_ERROR} {_EXIT_HELP}.",
        )
        p.set_defaults(func=_guarded(func))
        return p

    p = add(
        "validate",
        _cmd_validate,
        "check job files offline; with --url/--online also ask the agent's /validate",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="job JSON file(s)")
    p.add_argument(
        "--agent-root",
        help="agent install root: check the task binaries exist under it "
        f"(env {AGENT_ROOT_ENV}; default: no binary check)",
    )
    p.add_argument("--os", dest="os_name", help="OS the agent runs (default: this host)")
    p.add_argument(
        "--online",
        action="store_true",
        help="also ask the agent (at --url, KEEPER_AGENT_URL or the default)",
    )
    p.add_argument(
        "--no-mqtt-logs",
        dest="logs_via_mqtt",
        action="store_false",
        help="the task does not log through KeeperLogger (no warning when it is not allowed)",
    )

    add("list", _cmd_list, "list the jobs the agent knows")
    p = add("get", _cmd_get, "print one job definition as JSON")
    p.add_argument("job_id", metavar="ID")
    p = add(
        "create",
        _cmd_create,
        "create a job from a file (or update it if the id exists); the job is checked "
        "offline first",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--any-file-name",
        action="store_true",
        help="do not require the file to be named <id>.json (the agent stores it as that)",
    )
    p = add(
        "update",
        _cmd_update,
        "replace an existing job; the ID given here wins; the job is checked offline first",
    )
    p.add_argument("job_id", metavar="ID")
    p.add_argument("file", metavar="FILE")
    p = add("delete", _cmd_delete, "delete a job")
    p.add_argument("job_id", metavar="ID")
    p = add("trigger", _cmd_trigger, "trigger a job run, optionally with event context")
    p.add_argument("job_id", metavar="ID")
    _add_context(p)
    p = add("run", _cmd_run, "start a job run (asynchronous on the agent)")
    p.add_argument("job_id", metavar="ID")
    add("reload", _cmd_reload, "make the agent re-read Jobs/ from disk")

    p = add(
        "deploy",
        _cmd_deploy,
        "place the binary under Jobs/bin/<command>/, validate, create, optionally trigger",
    )
    p.add_argument("file", metavar="FILE", help="job JSON file")
    p.add_argument(
        "--binary",
        required=True,
        metavar="PATH",
        help="the built task: one executable, or a PyInstaller onedir folder",
    )
    p.add_argument(
        "--agent-root",
        help=f"agent install root (env {AGENT_ROOT_ENV}; default {default_agent_root()})",
    )
    p.add_argument(
        "--command",
        dest="command_name",
        help="which task command the binary is for, when the job has several",
    )
    p.add_argument("--trigger", action="store_true", help="trigger the job once registered")
    _add_context(p, implies_trigger=True)


def _add_context(parser: argparse.ArgumentParser, *, implies_trigger: bool = False) -> None:
    parser.add_argument(
        "--context",
        metavar="JSON|@FILE",
        help="event context: a JSON object, or @file holding one (default {})"
        + ("; implies --trigger" if implies_trigger else ""),
    )


def _help_of(parser: argparse.ArgumentParser) -> Command:
    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 64

    return show_help


# -- helpers ---------------------------------------------------------------------------------


class _Failed(Exception):
    """Carries a command's error together with what ``--json`` should report beside it."""

    def __init__(self, error: KeeperTaskError, **fields: Any) -> None:
        super().__init__(str(error))
        self.error = error
        self.fields = fields


def _exit_code(error: KeeperTaskError) -> int:
    # A job the agent refused (400) or that cannot be read is "the job is invalid", like an
    # offline validation error; AgentError's default (69, unreachable) would mislead.
    if isinstance(error, (ValidationFailedError, JobDefinitionError)):
        return EXIT_INVALID
    return int(error.exit_code)


def _guarded(func: Command) -> Command:
    """Run ``func``; print its error as one line (and as JSON with ``--json``)."""

    def run(args: argparse.Namespace) -> int:
        try:
            _check_inputs(args)
            return func(args)
        except (KeeperTaskError, _Failed) as exc:
            error = exc.error if isinstance(exc, _Failed) else exc
            fields = dict(exc.fields) if isinstance(exc, _Failed) else {}
            if isinstance(error, (AgentUnreachableError, NotTrustedError)) and (
                error.status_code is None
            ):
                error = _diagnose(args, error) or error
            code = _exit_code(error)
            if isinstance(error, ValidationFailedError) and "errors" not in fields:
                # The agent's (or our offline check's) errors as sent: an array, not one string.
                fields["errors"] = list(error.errors)
            # One line, whatever the message carries (a path with a newline, say).
            text = " ".join(str(error).splitlines())
            if getattr(args, "json", False):
                _print_json({"ok": False, "error": text, "exitCode": code, **fields})
            print(f"keeper-task: error: {text}", file=sys.stderr)
            return code

    return run


# argparse destinations whose option (or argument) name is not "--" + dest.
_OPTION_NAMES = {
    "file": "FILE",
    "files": "FILE",
    "job_id": "ID",
    "os_name": "--os",
    "command_name": "--command",
}


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse bad option values and unreadable input files before anything starts (exit 64)."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
            raise UsageError(f"{option}: a NUL character cannot be in a path or value")
    raw = getattr(args, "timeout", None)
    if isinstance(raw, str):
        args.timeout = parse_timeout(raw)
    files = list(getattr(args, "files", None) or [])
    if getattr(args, "file", None) is not None:
        files.append(args.file)
    for name in files:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"job file {name} does not exist")
        if path.is_dir():
            raise UsageError(f"job file {name} is a directory, not a JSON file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"job file {name} is not readable (check its permissions)")


def parse_timeout(text: str) -> float:
    """Parse ``--timeout``: a finite number of seconds, > 0 and <= :data:`MAX_TIMEOUT`.

    Raises:
        UsageError: Not a number, not finite, or out of range.
    """
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--timeout {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise UsageError(
            f"--timeout {text!r} is out of range: give seconds more than 0 and at most "
            f"{MAX_TIMEOUT:g}"
        )
    return value


def _diagnose(args: argparse.Namespace, error: AgentError) -> AgentError | None:
    """Tell what answers at the URL when a request failed below HTTP; None keeps ``error``."""
    url = getattr(args, "url", None) or os.environ.get("KEEPER_AGENT_URL") or DEFAULT_AGENT_URL
    # Each probe step waits at most this; a loopback service answers in milliseconds.
    timeout = min(float(getattr(args, "timeout", None) or 3.0), 3.0)
    found = probe_service(url, timeout)
    if found is None:
        return None
    return AgentUnreachableError(
        f"{url} is not the agent's HTTPS API: {found}; point --url (or KEEPER_AGENT_URL) at "
        "https://127.0.0.1:<Settings:KestrelHttpsPort> (6889 by default)",
        url=url,
    )


def probe_service(url: str, timeout: float) -> str | None:
    """Say what listens at ``url`` when it is not an HTTPS server; None when it is (or is down,
    or the answer proves nothing).

    A TLS 1.2 handshake without a client certificate (in TLS 1.2 a server that insists on
    one refuses during the handshake, so a finished handshake is not about certificates),
    then ``GET /health``; an MQTT CONNECT to name a broker; a plain-HTTP try when TLS fails.
    Never raises.
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname or "127.0.0.1"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return None
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    ctx = _probe_tls_context()
    try:
        head = _tls_exchange(ctx, host, port, timeout, request)
    except OSError as exc:
        return _after_tls_failure(exc, host, port, request, timeout)
    if head is None or head.startswith(b"HTTP/"):
        return None
    try:
        answer = _tls_exchange(ctx, host, port, timeout, _MQTT_CONNECT, want=1)
    except OSError:
        answer = None
    if (answer or b"")[:1] == b"\x20":  # CONNACK
        return "it is an MQTT broker over TLS (it answered an MQTT CONNECT), not HTTPS"
    return "it accepts TLS but does not answer HTTP"


def _probe_tls_context() -> ssl.SSLContext:
    """A TLS 1.2 client context that trusts anything: the probe asks what answers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a probe of what answers, not a trust decision
    # In TLS 1.2 a server wanting a client certificate refuses during the handshake.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_exchange(
    ctx: ssl.SSLContext, host: str, port: int, timeout: float, payload: bytes, *, want: int = 5
) -> bytes | None:
    """Send over TLS; the answer's first bytes (none after a reset or silence).

    Raises:
        OSError: Connecting or the handshake failed (``ssl.SSLError`` for TLS, an alert
            included).
    """
    with socket.create_connection((host, port), timeout=timeout) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=host)
        with tls:
            tls.sendall(payload)
            try:
                return _read_head(tls, want)
            except ssl.SSLError as exc:
                if "alert" in str(exc).lower():
                    raise
                return b""
            except OSError:  # reset or silence after a finished handshake: not HTTP
                return b""


def _after_tls_failure(
    exc: OSError, host: str, port: int, request: bytes, timeout: float
) -> str | None:
    """What a failed TLS try says: a TLS alert or a refused connection prove nothing wrong."""
    if isinstance(exc, ssl.SSLError) and "alert" in str(exc).lower():
        return None  # a TLS server that refused this client: HTTPS after all
    if isinstance(exc, ConnectionRefusedError):
        return None  # nothing listens: the original message says so
    return _plain_probe(host, port, request, timeout)


#: An MQTT 3.1.1 CONNECT (client id "keeper-task-probe", clean session, keepalive 10 s).
_MQTT_CONNECT = b"\x10\x1d\x00\x04MQTT\x04\x02\x00\x0a\x00\x11keeper-task-probe"


def _plain_probe(host: str, port: int, request: bytes, timeout: float) -> str | None:
    def exchange(payload: bytes, want: int = 5) -> bytes:
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                raw.sendall(payload)
                return _read_head(raw, want)
        except OSError:  # reset or timed out: no answer
            return b""

    head = exchange(request)
    if head.startswith(b"HTTP/"):
        return "it speaks plain HTTP, not HTTPS (the agent's HTTP port is not for admin calls)"
    if head[:1] == b"\x15":
        return None  # a TLS alert record: a TLS server that did not like the probe
    if exchange(_MQTT_CONNECT, want=1)[:1] == b"\x20":
        return "it is an MQTT broker without TLS (it answered an MQTT CONNECT), not HTTPS"
    return None  # nothing conclusive: keep the original diagnosis


def _read_head(sock: socket.socket, want: int = 5) -> bytes:
    """The first ``want`` bytes of the answer (fewer at end of file); raises what the socket
    raises."""
    data = b""
    while len(data) < want:
        chunk = sock.recv(64)
        if not chunk:
            break
        data += chunk
    return data


def _client(args: argparse.Namespace) -> JobsClient:
    return JobsClient.from_env(
        url=args.url,
        client_cert=args.cert,
        client_key=args.key,
        ca_bundle=args.ca_bundle,
        timeout=args.timeout,
    )


def _check_offline(
    path: str, data: Any, *, file_name: str | None, url_id: str | None = None
) -> None:
    """The agent's rules, offline, before anything is sent (raises ValidationFailedError)."""
    if url_id is not None and isinstance(data, dict):
        # PUT: the URL id replaces the body's, as the agent does; check what it will store.
        data = {k: v for k, v in data.items() if str(k).lower() != "id"}
        data = {"id": url_id, **data}
    report = validate_job(data, file_name=file_name)
    if report.valid:
        return
    more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
    raise ValidationFailedError(
        f"{path} is invalid, nothing was sent to the agent: {report.errors[0]}{more}; "
        f"`keeper-task job validate {path}` shows every problem",
        errors=report.errors,
        status_code=None,
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _agent_root(value: str | None, *, default: bool) -> Path | None:
    chosen = value or os.environ.get(AGENT_ROOT_ENV) or None
    if chosen is not None:
        return Path(chosen)
    return default_agent_root() if default else None


def _os_name(value: str | None) -> str:
    if value is None:
        return host_os()
    try:
        return normalize_os(value)
    except ValueError as exc:
        raise UsageError(f"--os: {exc}") from exc


def parse_context(value: str | None) -> dict[str, Any] | None:
    """Parse a ``--context JSON|@file`` option (shared with ``keeper-task dev run``)."""
    if value is None:
        return None
    source = "--context"
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        source = f"--context file {path}"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        context = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(context, dict):
        raise UsageError(f"{source} must be a JSON object of event context keys and values")
    return context


def _located(path: str, message: str) -> str:
    """Format a file message as ``path: error: ...`` or ``path:L:C: error: ...``."""
    rest = message.removeprefix(path)
    if rest != message and rest[:1] == ":":
        head, _, tail = rest[1:].partition(": ")
        if head.replace(":", "").isdigit() and tail:
            return f"{path}:{head}: error: {tail}"
        return f"{path}: error: {rest[1:].lstrip()}"
    return f"{path}: error: {message}"


def _report_lines(path: str, report: ValidationReport, prefix: str = "") -> list[str]:
    lines = [f"{path}: {prefix}error: {e}" for e in report.errors]
    lines += [f"{path}: {prefix}warning: {w}" for w in report.warnings]
    if report.valid:
        lines.append(f"{path}: {prefix}valid")
    else:
        count = len(report.errors)
        lines.append(f"{path}: {prefix}invalid ({count} error{'s' if count != 1 else ''})")
    return lines


# -- commands --------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    agent_root = _agent_root(args.agent_root, default=False)
    os_name = _os_name(args.os_name)
    online = args.online or args.url is not None
    client = _client(args) if online else None
    results: list[dict[str, Any]] = []
    all_valid = True
    try:
        for path in args.files:
            lines: list[str] = []
            agent_report: ValidationReport | None = None
            try:
                data = read_job_json(path)
            except JobDefinitionError as exc:
                report = ValidationReport(valid=False, errors=[str(exc)])
                lines.append(_located(path, str(exc)))
                lines.append(f"{path}: invalid (1 error)")
            else:
                report = validate_job(
                    data,
                    file_name=path,
                    agent_root=agent_root,
                    current_os=os_name,
                    logs_via_mqtt=args.logs_via_mqtt,
                )
                lines += _report_lines(path, report)
                if client is not None and isinstance(data, Mapping):
                    agent_report = client.validate(data)
                    lines += _report_lines(path, agent_report, prefix="agent: ")
            valid = report.valid and (agent_report is None or agent_report.valid)
            all_valid = all_valid and valid
            if args.json:
                entry: dict[str, Any] = {"file": path, **report.to_agent_json()}
                entry["agent"] = agent_report.to_agent_json() if agent_report else None
                results.append(entry)
            else:
                print("\n".join(lines))
    finally:
        if client is not None:
            client.close()
    if args.json:
        _print_json({"valid": all_valid, "files": results})
    return 0 if all_valid else EXIT_INVALID


def _cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list()
    if args.json:
        _print_json(listing.raw)
        return 0
    if not listing.jobs:
        print("no jobs" + (f" ({listing.message})" if listing.message else ""))
        return 0
    rows = [
        (
            job.id or "?",
            {True: "enabled", False: "disabled", None: "-"}[job.enabled],
            job.name or "",
        )
        for job in listing.jobs
    ]
    width = max(len(r[0]) for r in rows)
    for job_id, state, name in rows:
        print(f"{job_id:<{width}}  {state:<8}  {name}".rstrip())
    count = listing.count if listing.count is not None else len(rows)
    print(f"{count} job{'s' if count != 1 else ''}")
    return 0


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        # As sent, not through the model: `get` must show whatever the agent holds.
        body = client.get_json(args.job_id)
    _print_json(body)
    return 0


def _done(args: argparse.Namespace, message: str, job_id: str | None, response: Any) -> int:
    if args.json:
        _print_json({"ok": True, "jobId": job_id, "response": response})
        return 0
    print(message + _said(response))
    # The agent may list problems beside a success (reload names the files it skipped).
    problems = response.get("errors") if isinstance(response, Mapping) else None
    for problem in problems if isinstance(problems, list) else []:
        print(f"agent: warning: {problem}")
    return 0


def _cmd_create(args: argparse.Namespace) -> int:
    data = read_job_json(args.file)
    _check_offline(args.file, data, file_name=None if args.any_file_name else args.file)
    job = load_job(args.file)
    with _client(args) as client:
        response = client.create(job)
    return _done(args, f"job {job.id!r} created or updated", job.id, response)


def _cmd_update(args: argparse.Namespace) -> int:
    data = read_job_json(args.file)
    _check_offline(args.file, data, file_name=None, url_id=args.job_id)
    job = load_job(args.file)
    if job.id is not None and job.id != args.job_id:
        print(
            f"note: {args.file} has id {job.id!r}; the agent uses the URL id {args.job_id!r}",
            file=sys.stderr,
        )
    with _client(args) as client:
        response = client.update(args.job_id, job)
    return _done(args, f"job {args.job_id!r} updated", args.job_id, response)


def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.delete(args.job_id)
    return _done(args, f"job {args.job_id!r} deleted", args.job_id, response)


def _cmd_trigger(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    with _client(args) as client:
        response = client.trigger(args.job_id, context)
    return _done(args, f"job {args.job_id!r} triggered", args.job_id, response)


def _cmd_run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.run(args.job_id)
    return _done(args, f"job {args.job_id!r} started (runs asynchronously)", args.job_id, response)


def _cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.reload()
    return _done(args, "the agent reloaded its job definitions from disk", None, response)


def _deploy_command(job: Job, wanted: str | None) -> str:
    commands: list[str] = []
    for task in job.tasks:
        if task.command and not is_builtin_command(task.command) and task.command not in commands:
            commands.append(task.command)
    if wanted is not None:
        if wanted not in commands:
            raise UsageError(
                f"--command {wanted!r} is not a task command of job {job.id!r} "
                f"(commands: {', '.join(commands) or 'none'})"
            )
        return wanted
    if not commands:
        raise UsageError(f"job {job.id!r} has no task command that needs a binary")
    if len(commands) > 1:
        raise UsageError(
            f"job {job.id!r} has several task commands ({', '.join(commands)}); "
            "pass --command NAME for this binary"
        )
    return commands[0]


def _cmd_deploy(args: argparse.Namespace) -> int:
    steps: list[dict[str, Any]] = []
    try:
        return _deploy(args, steps)
    except KeeperTaskError as exc:
        raise _Failed(exc, steps=steps) from exc


class _DeploySteps:
    """The steps ``job deploy`` took: a line each, or one JSON document at the end (``--json``)."""

    def __init__(self, steps: list[dict[str, Any]], *, as_json: bool) -> None:
        # The caller's list: a failure raised mid-way still reports the steps done so far.
        self.steps = steps
        self.as_json = as_json

    def step(self, name: str, text: str, **fields: Any) -> None:
        """Record a step done (and say so, without ``--json``)."""
        self.steps.append({"step": name, **fields})
        if not self.as_json:
            print(f"{name}: {text}")

    def warnings(self, name: str, warnings: list[str]) -> None:
        """Print a step's warnings, one line each (in ``--json`` they are in the step)."""
        if not self.as_json:
            for warning in warnings:
                print(f"{name}: warning: {warning}")

    def finish(self, code: int) -> int:
        """End the deploy with ``code`` (printing the JSON document with ``--json``)."""
        if self.as_json:
            _print_json({"ok": code == 0, "steps": self.steps})
        return code

    def invalid(self, name: str, report: ValidationReport) -> int:
        """End the deploy at a failed validation step."""
        if not self.as_json:
            for error in report.errors:
                print(f"{name}: error: {error}")
        self.step(name, "invalid; fix the errors above", **report.to_agent_json())
        return self.finish(EXIT_INVALID)


def _deploy(args: argparse.Namespace, steps: list[dict[str, Any]]) -> int:
    """place -> validate -> create -> trigger; every step is idempotent."""
    log = _DeploySteps(steps, as_json=args.json)
    context = parse_context(args.context)
    job = load_job(args.file)
    agent_root = _agent_root(args.agent_root, default=True)
    assert agent_root is not None  # default=True always gives a root
    # The agent's rules first: an invalid job must not leave a binary behind.
    rules = validate_job(job, file_name=args.file)
    if not rules.valid:
        return log.invalid("validate", rules)
    _place_binary(args, job, agent_root, log)

    offline = validate_job(job, file_name=args.file, agent_root=agent_root)
    if not offline.valid:
        return log.invalid("validate", offline)
    log.warnings("validate", offline.warnings)
    log.step(
        "validate", f"valid offline ({len(offline.warnings)} warning(s))", **offline.to_agent_json()
    )

    with _client(args) as client:
        remote = client.validate(job)
        if not remote.valid:
            return log.invalid("agent validate", remote)
        log.warnings("agent validate", remote.warnings)
        log.step("agent validate", "valid", **remote.to_agent_json())
        _register(client, job, context, trigger=args.trigger, log=log)
    return log.finish(0)


def _place_binary(args: argparse.Namespace, job: Job, agent_root: Path, log: _DeploySteps) -> None:
    """Install ``--binary`` where the agent looks for the job's command."""
    command = _deploy_command(job, args.command_name)
    installed = install_binary(args.binary, agent_root, command)
    note = f" ({len(installed.stale)} older file(s) left in place)" if installed.stale else ""
    log.step(
        "binary",
        f"{installed.action} {installed.executable}{note}",
        action=installed.action,
        path=str(installed.executable),
        changed=[str(p) for p in installed.changed],
    )


def _register(
    client: JobsClient,
    job: Job,
    context: dict[str, Any] | None,
    *,
    trigger: bool,
    log: _DeploySteps,
) -> None:
    """Create (or replace) the job on the agent; trigger it when asked or given a context."""
    response = client.create(job)
    log.step("create", f"job {job.id!r} registered{_said(response)}", response=response)
    if trigger or context is not None:
        response = client.trigger(str(job.id), context)
        log.step("trigger", f"job {job.id!r} triggered{_said(response)}", response=response)


def _said(response: Any) -> str:
    """The agent's ``message``, if its answer has one, as `` (message)``."""
    if isinstance(response, Mapping):
        message = response.get("message")
        if isinstance(message, str) and message.strip():
            return f" ({message.strip()})"
    return ""
