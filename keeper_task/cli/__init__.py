"""The ``keeper-task`` command (tooling; never imported by the runtime).

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds an
``argparse`` sub-parser whose ``func`` default takes the parsed namespace and returns an exit
code. Errors of the :class:`~keeper_task.errors.KeeperTaskError` tree are printed as one line
``keeper-task: error: ...`` and exit with the error's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from keeper_task.errors import KeeperTaskError, UsageError

__all__ = ["main"]

# Sub-command modules, in the order --help lists them.
_COMMAND_MODULES = ("new", "dev", "job", "build", "doctor")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """Return the full ``keeper-task`` argument parser."""
    parser = _Parser(
        prog="keeper-task",
        description="Scaffold, run, test, package and deploy Keeper EPM job tasks.",
    )
    from keeper_task import __version__

    parser.add_argument("--version", action="version", version=f"keeper-task {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"keeper_task.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"keeper_task.cli.{name}":
                raise
            continue
        module.register(subparsers)
    parser.set_defaults(func=missing_command(parser.prog, subparsers))
    return parser


def missing_command(prog: str, subparsers: Any) -> Callable[[argparse.Namespace], int]:
    """A ``func`` for a parser whose sub-command was left out: one usage-error line, exit 64."""

    def _fail(_args: argparse.Namespace) -> int:
        names = ", ".join(subparsers.choices)
        raise UsageError(f"missing command after '{prog}': one of {names} (see {prog} --help)")

    return _fail


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keeper-task`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        return int(args.func(args))
    except KeeperTaskError as exc:
        print(f"keeper-task: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("keeper-task: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
