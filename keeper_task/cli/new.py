"""``keeper-task new NAME``: scaffold a job-task project (see :mod:`keeper_task.scaffold`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from keeper_task import scaffold

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``new`` sub-command."""
    parser = subparsers.add_parser(
        "new",
        help="create a job-task project (task, settings, jobs, tests, build/deploy scripts)",
        description=(
            "Create a job-task project. NAME is the job id: a letter, then letters, digits "
            "and '-' (no '_': the agent's broker splits client ids on '_')."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="job id, e.g. disk-report")
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="project directory (default ./NAME); a relative path must stay inside the "
        "current directory",
    )
    parser.add_argument(
        "--command",
        metavar="COMMAND",
        help="the agent's command name: Jobs/bin/COMMAND/COMMAND[.exe] (default NAME in "
        "PascalCase; letters, digits, '-', '_')",
    )
    parser.add_argument(
        "--module", metavar="MODULE", help="Python package name (default NAME with '_' for '-')"
    )
    parser.add_argument(
        "--os",
        metavar="OSES",
        default=",".join(scaffold.OS_NAMES),
        help="comma-separated OSes to write a job file for (default windows,linux,macos)",
    )
    parser.add_argument(
        "--publishes",
        metavar="TOPIC",
        nargs="+",
        action="extend",
        default=[],
        help="extra MQTT topics the task publishes (KeeperLogger and the event topic are "
        "always declared)",
    )
    parser.add_argument(
        "--keeper-task-spec",
        metavar="REQUIREMENT",
        default=os.environ.get("KEEPER_TASK_SPEC", scaffold.DEFAULT_KEEPER_TASK_SPEC),
        help="keeper-task requirement of the new project (default %(default)s; e.g. "
        "'keeper-task @ file:///path/to/checkout'; env KEEPER_TASK_SPEC)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into an existing non-empty directory, overwriting the generated files",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    spec = scaffold.make_spec(
        args.name,
        module=args.module,
        command=args.command,
        oses=[part for part in args.os.split(",") if part.strip()],
        publishes=args.publishes,
        keeper_task_spec=args.keeper_task_spec,
    )
    target = scaffold.resolve_target(args.dir, spec)
    written = scaffold.create_project(spec, target, force=args.force)
    shown = os.path.relpath(target) if not args.dir or not os.path.isabs(args.dir) else target
    out = sys.stdout
    print(f"created project {spec.job_id} in {shown}{os.sep} ({len(written)} files)", file=out)
    print(f"  task:     src/{spec.module}/task.py ({spec.class_name})", file=out)
    for os_name in spec.oses:
        print(f"  job:      {scaffold.job_file_name(spec, os_name)}", file=out)
    print(f"  command:  {spec.command}", file=out)
    first = scaffold.template_values(spec)["first_os"]
    job = scaffold.job_file_name(spec, first)
    print("next (see its README.md):", file=out)
    print(f"  cd {shown}", file=out)
    print("  pip install -e '.[test]'         # the task, the emulator and pytest", file=out)
    print("  python -m pytest                 # its tests pass as generated", file=out)
    print(f"  keeper-task dev run {job}", file=out)
    print(
        f"  keeper-task build                # dist/Jobs/bin/{spec.command}/ and a deploy bundle",
        file=out,
    )
    print(f"  keeper-task dev run {job} --agent-root dist   # the built binary", file=out)
    return 0
