"""``keeper-task build``: package a task project with PyInstaller (see :mod:`keeper_task.build`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from keeper_task.build import build_project

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``build`` sub-command."""
    parser = subparsers.add_parser(
        "build",
        help="package a task into dist/Jobs/bin/<Command>/ plus a deploy bundle (this OS only)",
        description=(
            "Build the task binary with PyInstaller (pip install 'keeper-task[build]') in an "
            "isolated, runtime-only environment, for THIS OS only (PyInstaller cannot "
            "cross-build): dist/Jobs/bin/<Command>/<Command>[.exe] laid out as the agent "
            "resolves it, and dist/<job id>-<os>.tar.gz (.zip on Windows) with the binary, "
            "the job file for this OS and the deploy scripts."
        ),
    )
    parser.add_argument(
        "project",
        nargs="?",
        default=".",
        metavar="PROJECT_DIR",
        help="project directory (default: the current one)",
    )
    parser.add_argument(
        "--onefile",
        action="store_true",
        help="one self-extracting file instead of a directory (smaller, slower to start)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (default PROJECT_DIR/dist)")
    parser.add_argument(
        "--sign-command",
        metavar="COMMAND",
        help="shell command that signs the binary, run before bundling; {binary} and {dir} are "
        "replaced (env KEEPER_TASK_SIGN_COMMAND). E.g. Windows: 'signtool sign /sha1 THUMBPRINT "
        "/fd sha256 /tr URL {binary}'; macOS: 'codesign --options runtime --timestamp --sign "
        '"Developer ID Application: ..." {binary} && xcrun notarytool submit ...\'',
    )
    parser.add_argument(
        "--venv",
        metavar="DIR",
        help="build environment (default PROJECT_DIR/build/keeper-task/venv, reused)",
    )
    parser.add_argument(
        "--python", metavar="PATH", help="interpreter to build with (default: this one)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="recreate the build environment from scratch"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    def echo(line: str) -> None:
        print(line, flush=True)

    build_project(
        Path(args.project),
        onefile=args.onefile,
        out=Path(args.out) if args.out else None,
        sign_command=args.sign_command,
        venv=Path(args.venv) if args.venv else None,
        python=args.python,
        fresh=args.fresh,
        echo=echo,
    )
    return 0
