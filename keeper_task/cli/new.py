"""``keeper-task new NAME``: scaffold a job-task project (see :mod:`keeper_task.scaffold`)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
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
        default=None,
        help="keeper-task requirement of the new project (env KEEPER_TASK_SPEC). Default: "
        "where this keeper-task came from: a version range when it was installed from a "
        "package index, 'keeper-task @ file:///...' when from a local checkout or wheel",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into an existing non-empty directory, overwriting the generated files",
    )
    parser.set_defaults(func=_run)


def _self_command(cwd: Path) -> str:
    """How to call this same keeper-task from ``cwd``, without activating a venv.

    ``keeper-task`` when that name on PATH is this program; else this program's path relative
    to ``cwd`` (``../.venv/bin/keeper-task``); else ``<python> -m keeper_task.cli``.
    """
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name.startswith("keeper-task") and argv0.exists():
        on_path = shutil.which("keeper-task")
        if on_path is not None and Path(on_path).resolve() == argv0.resolve():
            return "keeper-task"
        return _relative(argv0.absolute(), cwd)
    return f"{_relative(Path(sys.executable).absolute(), cwd)} -m keeper_task.cli"


def _relative(path: Path, cwd: Path) -> str:
    try:
        shown = os.path.relpath(path, cwd)
    except ValueError:  # another drive on Windows
        return str(path)
    if shown.split(os.sep).count("..") > 1:  # far away: the absolute path reads better
        return str(path)
    return shown if shown.startswith("..") or os.sep in shown else f".{os.sep}{shown}"


def _run(args: argparse.Namespace) -> int:
    requirement = args.keeper_task_spec or os.environ.get("KEEPER_TASK_SPEC")
    if requirement:
        source = "--keeper-task-spec" if args.keeper_task_spec else "KEEPER_TASK_SPEC"
        origin = f"given with {source} when the project was created"
    else:
        requirement, origin = scaffold.detect_keeper_task_spec()
    spec = scaffold.make_spec(
        args.name,
        module=args.module,
        command=args.command,
        oses=[part for part in args.os.split(",") if part.strip()],
        publishes=args.publishes,
        keeper_task_spec=requirement,
        keeper_task_origin=origin,
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
    print(f"  requires: {spec.keeper_task_spec}", file=out)
    print(f"            ({origin}; --keeper-task-spec overrides)", file=out)
    me = _self_command(target)
    print("run it now under the emulated agent (no install needed):", file=out)
    print(f"  cd {shown} && {me} dev run", file=out)
    print("then, in the project (see its README.md):", file=out)
    steps = [
        ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'", "its own venv"),
        (".venv/bin/python -m pytest", "its tests pass as generated"),
        (".venv/bin/pip install -q 'keeper-task[build]'", "PyInstaller"),
        (".venv/bin/keeper-task build", f"dist/Jobs/bin/{spec.command}/ and a deploy bundle"),
        (".venv/bin/keeper-task dev run --agent-root dist", "the built binary"),
    ]
    for command, why in steps:
        print(f"  {command:<64} # {why}", file=out)
    return 0
