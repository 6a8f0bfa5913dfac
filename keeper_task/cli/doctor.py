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
