"""``keeper-task doctor``: check a live agent install, one line per check.

Run by an administrator on the endpoint (or against ``keeper-task dev agent``). Exit codes:
0 every check passed (warnings and skipped checks do not fail); 1 at least one check failed;
64 bad arguments. ``--json`` prints ``{"ok", "exitCode", "checks": [{"name", "status",
"detail", "fix"}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from keeper_task.errors import UsageError

__all__ = ["register"]

_EXIT_HELP = (
    "exit codes: 0 every check passed (warnings and skipped checks do not fail); "
    "1 at least one check failed; 64 bad arguments"
)
_PROBE_EXIT_HELP = (
    "exit codes: 0 report collected; 64 bad arguments; 69 the probe or its report failed, or "
    "the agent is unreachable; 77 the Admin tier refused the client certificate; "
    "78 unreadable certificate/key/CA files or agent root"
)
_MARKS = {"pass": ("✓", "OK"), "fail": ("✗", "FAIL"), "warn": ("!", "WARN"), "skip": ("-", "SKIP")}


def register(subparsers: Any) -> None:
    """Add the ``doctor`` command to the ``keeper-task`` parser."""
    parser = subparsers.add_parser(
        "doctor",
        help="check a live agent: ports, TLS, tiers, job files, binaries, broker",
        description="Check the agent install on this endpoint, one line per check (✓/✗ and "
        "the fix). Reads appsettings.json from the agent root for the ports. Nothing secret "
        "is printed.",
        epilog=_EXIT_HELP,
    )
    add_agent_options(parser)
    parser.add_argument(
        "--broker-port", type=int, help="broker port (default: from the agent's settings, 8675)"
    )
    parser.add_argument("--os", dest="os_name", help="OS the agent runs (default: this host)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=_cmd_doctor)
    sub = parser.add_subparsers(
        title="doctor commands", metavar="COMMAND", parser_class=type(parser)
    )
    probe = sub.add_parser(
        "probe",
        help="deploy the probe job, measure what the agent does not document, recommend settings",
        description="Deploy the built-in probe jobs through the Admin API, trigger them with a "
        "context marker, read their report from the report directory, remove them again "
        "(unless --keep) and print the measured behaviour with recommended settings. The "
        "report holds names, not values, for anything that may be secret.",
        epilog=_PROBE_EXIT_HELP,
    )
    add_agent_options(probe)
    probe.add_argument("--keep", action="store_true", help="leave the probe jobs deployed")
    probe.add_argument(
        "--apply",
        metavar="DIR",
        help="write the recommended settings into the job files (task arguments) under DIR",
    )
    probe.add_argument(
        "--report-dir",
        help="where the probe writes its report (default <agent root>/keeper-task-probe; the "
        "agent's service account must be able to write there)",
    )
    probe.add_argument("--output", metavar="FILE", help="also save the report as JSON here")
    probe.add_argument(
        "--wait", type=float, default=180.0, help="seconds to wait for each report (180)"
    )
    probe.add_argument(
        "--python",
        help="the Python the agent starts for the probe (default: this one; it must have "
        "keeper-task installed and be runnable by the agent's service account)",
    )
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    probe.set_defaults(func=_cmd_probe)


def add_agent_options(parser: argparse.ArgumentParser) -> None:
    """The connection options shared by ``doctor`` and ``doctor probe``."""
    group = parser.add_argument_group("agent")
    group.add_argument(
        "--agent-root",
        help="agent install root (env KEEPER_AGENT_ROOT; default C:\\Program Files\\"
        "KeeperPrivilegeManager, /opt/KeeperPrivilegeManager or "
        "/usr/local/KeeperPrivilegeManager)",
    )
    group.add_argument(
        "--url", help="agent HTTPS API (default: https://127.0.0.1:<Settings:KestrelHttpsPort>)"
    )
    group.add_argument("--cert", help="admin client certificate, PEM (env KEEPER_ADMIN_CERT)")
    group.add_argument(
        "--key",
        help="key of --cert, PEM (env KEEPER_ADMIN_KEY); its password only from "
        "KEEPER_ADMIN_KEY_PASSWORD",
    )
    group.add_argument(
        "--ca-bundle",
        help="CA bundle that should verify the agent (env KEEPER_CA_BUNDLE); without it TLS "
        "is unverified, loopback only",
    )
    group.add_argument("--timeout", type=float, default=10.0, help="seconds per operation")


def options_from_args(args: argparse.Namespace) -> Any:
    """Build :class:`~keeper_task.doctor.DoctorOptions` from parsed arguments and the env."""
    from pathlib import Path

    from keeper_task.doctor import DoctorOptions

    env = os.environ
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, not {args.timeout}")
    os_name = getattr(args, "os_name", None)
    if os_name:
        from keeper_task.jobs import normalize_os

        try:
            os_name = normalize_os(os_name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return DoctorOptions(
        agent_root=Path(args.agent_root) if args.agent_root else None,
        url=args.url or env.get("KEEPER_AGENT_URL") or None,
        client_cert=args.cert or env.get("KEEPER_ADMIN_CERT") or None,
        client_key=args.key or env.get("KEEPER_ADMIN_KEY") or None,
        key_password=env.get("KEEPER_ADMIN_KEY_PASSWORD") or None,
        ca_bundle=args.ca_bundle or env.get("KEEPER_CA_BUNDLE") or None,
        broker_port=getattr(args, "broker_port", None),
        os_name=os_name,
        timeout=args.timeout,
    )


def _mark(status: str) -> str:
    symbol, word = _MARKS[status]
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        symbol.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return word
    return symbol


def _cmd_doctor(args: argparse.Namespace) -> int:
    from keeper_task.doctor import EXIT_CHECK_FAILED, run_checks

    checks = run_checks(options_from_args(args))
    failed = [c for c in checks if c.status == "fail"]
    code = EXIT_CHECK_FAILED if failed else 0
    if args.json:
        document = {
            "ok": not failed,
            "exitCode": code,
            "checks": [c.to_json_dict() for c in checks],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return code
    for check in checks:
        line = f"{_mark(check.status)} {check.name}: {check.detail}"
        if check.fix and check.status in ("fail", "warn"):
            line += f" -> fix: {check.fix}"
        print(line)
    if failed:
        print(f"{len(failed)} of {len(checks)} checks failed", file=sys.stderr)
    return code


def _agent_url(options: Any) -> str:
    """The HTTPS API: --url, else the port in the agent root's appsettings.json."""
    from keeper_task.doctor.checks import api_url, find_agent_root

    if options.url:
        return str(options.url)
    root, _ = find_agent_root(options.agent_root)
    return api_url(root)


def _cmd_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from keeper_task.agent.jobs import JobsClient
    from keeper_task.doctor.checks import find_agent_root
    from keeper_task.probe import REPORT_DIR_NAME, apply_recommendations, run_probe

    options = options_from_args(args)
    _check_probe_args(args, options)
    root, _ = find_agent_root(options.agent_root)
    report_dir = Path(args.report_dir) if args.report_dir else root / REPORT_DIR_NAME
    quiet = args.json

    def progress(line: str) -> None:
        if not quiet:
            print(f"probe: {line}", file=sys.stderr)

    with JobsClient(
        _agent_url(options),
        client_cert=options.client_cert,
        client_key=options.client_key,
        key_password=options.key_password,
        ca_bundle=options.ca_bundle,
        timeout=options.timeout,
    ) as jobs:
        report = run_probe(
            jobs,
            report_dir=report_dir,
            keep=args.keep,
            wait=args.wait,
            python=args.python,
            progress=progress,
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    changes = apply_recommendations(report["recommended"], Path(args.apply)) if args.apply else []
    _print_probe_result(args, report, changes)
    return 0


def _check_probe_args(args: argparse.Namespace, options: Any) -> None:
    """Refuse bad ``doctor probe`` arguments before anything is deployed.

    Raises:
        UsageError: The first bad argument.
    """
    from pathlib import Path

    if not options.client_cert:
        raise UsageError("doctor probe needs --cert (the admin client certificate) to deploy")
    if args.wait <= 0:
        raise UsageError(f"--wait must be > 0 seconds, not {args.wait}")
    if args.apply and not Path(args.apply).is_dir():
        raise UsageError(f"--apply {args.apply}: not a directory")


def _print_probe_result(
    args: argparse.Namespace, report: dict[str, Any], changes: list[str]
) -> None:
    """The report (JSON or readable lines) and what ``--apply`` changed."""
    if args.json:
        print(json.dumps({**report, "applied": changes}, indent=2, ensure_ascii=False))
        return
    for line in describe_report(report):
        print(line)
    if args.apply:
        print(f"applied to {args.apply}:" if changes else f"nothing to change in {args.apply}")
        for change in changes:
            print(f"  {change}")


def describe_report(report: dict[str, Any]) -> list[str]:
    """The probe report and its recommendations as readable lines."""
    process = report.get("process", {})
    env = report.get("environment", {})
    context = report.get("context", {})
    trust = report.get("trust", {})
    mqtt = report.get("mqtt", {})
    timeout = report.get("timeout", {})
    rec = report.get("recommended", {})
    parent = process.get("parent") or {}
    lines = [
        "measured:",
        f"  argv: {' '.join(process.get('argv', []))}",
        f"  {{KeeperApiBaseUrl}} became: {process.get('apiBaseArgument')}",
        f"  {{job_id}} in arguments arrived as: {process.get('literalTemplateArgument')}",
        f"  cwd: {process.get('cwd')}; user: {process.get('user')}; parent: "
        f"{parent.get('name')} (pid {parent.get('pid')})",
        f"  environment: {len(env.get('names', []))} variables; KEEPER_*: "
        + (", ".join(f"{k}={v}" for k, v in env.get("keeperValues", {}).items()) or "none"),
    ]
    found = context.get("found") or []
    where = ", ".join(f"{f['via']} ({f['name']})" for f in found) or "not passed to the task"
    lines.append(f"  trigger context: {where}")
    window = trust.get("windowSeconds")
    lines.append(
        f"  startup 403 window: {window:.2f} s ({trust.get('forbidden', 0)} refusals)"
        if isinstance(window, (int, float))
        else f"  startup 403 window: Plugin Settings never answered ({trust.get('lastError')})"
    )
    settings = report.get("settings") or {}
    lines.append(f"  merged settings keys: {', '.join(settings.get('keys', [])) or 'unread'}")
    if mqtt:
        cert = mqtt.get("certificate") or {}
        tls = "TLS" if mqtt.get("tls") else "plain TCP"
        issuer = f", certificate issuer {cert.get('issuer')}" if cert.get("issuer") else ""
        lines.append(f"  broker: {mqtt.get('host')}:{mqtt.get('port')} {tls}{issuer}")
        for entry in mqtt.get("clientIds", []):
            verdict = (
                (
                    "accepted, KeeperLogger publish acknowledged"
                    if entry.get("logAcked")
                    else "accepted, KeeperLogger publish NOT acknowledged"
                )
                if entry.get("accepted")
                else f"refused ({entry.get('refusal')})"
            )
            lines.append(f"  client id {entry['template']}: {verdict}")
        undeclared = mqtt.get("undeclaredPublish") or {}
        if undeclared:
            lines.append(f"  publish outside allowedPublications: {undeclared.get('outcome')}")
    if timeout.get("measured"):
        if timeout.get("signal"):
            lines.append(
                f"  on timeout: {timeout['signal']} about {timeout.get('secondsBeforeKill')} s "
                "before the kill"
            )
        else:
            lines.append("  on timeout: killed without a signal")
    else:
        lines.append(f"  on timeout: not measured ({timeout.get('note', 'no data')})")
    lines.append("recommended settings (task arguments or KEEPER_TASK_* variables):")
    template = rec.get("mqttClientIdTemplate")
    lines.append(
        f"  --mqtt-client-id-template={template}"
        if template
        else "  no client-id format worked: MQTT logging will not reach KeeperLogger"
    )
    if rec.get("trustTimeout") is not None:
        lines.append(f"  --trust-timeout={rec['trustTimeout']:g}")
    if rec.get("deadlineMarginSeconds") is not None:
        lines.append(f"  --deadline=<timeoutSeconds - {rec['deadlineMarginSeconds']}>")
    return lines
