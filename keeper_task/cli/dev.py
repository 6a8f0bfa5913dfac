"""``keeper-task dev``: run a job's task under the local agent emulator, or serve the emulator.

``keeper-task dev run [JOB.json|DIR]`` starts the emulator (HTTPS API + MQTT broker), runs the
job once as the agent's job runner would, shows the task's ``KeeperLogger`` messages, other
publishes and output one line each, prints a summary and exits with the task's exit code
(124 when it ran past its timeout). Without a job file it runs the job of the project in DIR
(default: the current directory) for this OS, ``jobs/<os>/<job id>.json`` as ``keeper-task
new`` lays it out, or DIR's ``job.json``. The task's binary is looked up as the agent does
(``Jobs/bin/<command>/<command>`` under the agent root, ``executablePath``, ``PATH``); when
none exists, a project's source (``src/<package>``) or a ``task.py`` next to the job file is
run with the current Python (emulator conventions for tasks not built yet). ``--task CMD``
replaces the executable outright. One line names what was launched and how it was found.
A ``plugins/`` folder beside the job file is the emulator's per-plugin settings directory
unless ``--plugins-dir`` says otherwise.

Lines are shown in the order their events happened (see :class:`_Printer`), each held back
:data:`ORDER_WINDOW` seconds for that.

Before anything starts, ``dev run`` checks its options, the job file and that the task can
be started; each problem is one ``keeper-task: error:`` line (bad options, a missing or
unreadable job file: exit 64). Ctrl-C or SIGTERM while the task runs kills its whole process
tree, prints the summary and exits with 128+N (130, 143).

``keeper-task dev agent`` serves the emulator until Ctrl-C or SIGTERM, on the agent's port
6889 when it is free (else on a free port, with a one-line warning), and prints what a
deployment script needs: base URL, CA bundle, admin certificate and key, a curl line; runs
started over the API (``trigger``, ``run``) get a ``[run]`` line when they start and end.
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import importlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from keeper_task.cli import missing_command
from keeper_task.cli.job import parse_context
from keeper_task.emulator.errors import EmulatorError
from keeper_task.errors import JobDefinitionError, UsageError
from keeper_task.exit_codes import signal_exit_code
from keeper_task.signals import InterruptOnce

__all__ = ["AGENT_PORT", "register"]

#: The agent's HTTPS port (``Settings:KestrelHttpsPort`` default); ``dev agent`` takes it when
#: free so that ``keeper-task job`` and ``deploy.sh`` reach it with their default URL.
AGENT_PORT = 6889

#: Seconds each line is held back so that lines can be shown in the order their events
#: happened: a task's log events reach the emulator in bursts (within 50 ms), its other
#: publishes at once.
ORDER_WINDOW = 0.25


def register(subparsers: Any) -> None:
    """Add ``dev run`` and ``dev agent`` to the ``keeper-task`` parser."""
    dev = subparsers.add_parser(
        "dev",
        help="run a task under the local agent emulator, or serve the emulator",
        description="Run job tasks locally under an emulator of the Keeper EPM agent.",
    )
    sub = dev.add_subparsers(title="commands", metavar="COMMAND", parser_class=type(dev))
    dev.set_defaults(func=missing_command(dev.prog, sub))

    run = sub.add_parser(
        "run",
        help="run a job once under the emulator and stream its logs",
        description="Start the emulator and its broker, run JOB once as the agent would, "
        "stream its KeeperLogger messages and output, print a summary, exit with the "
        "task's exit code.",
    )
    run.add_argument(
        "job",
        metavar="JOB.json|DIR",
        nargs="?",
        default=None,
        help="the job definition file, or a directory: a project made by `keeper-task new` "
        "(its job for this OS) or a directory holding job.json (default: the current "
        "directory)",
    )
    run.add_argument(
        "--task",
        metavar="CMD",
        help='command that replaces the task\'s executable, e.g. "python task.py" (the '
        "job's arguments are still appended)",
    )
    run.add_argument(
        "--agent-root",
        metavar="DIR",
        help="where Jobs/bin/<command>/<command> is looked up (default: the job file's "
        "directory, or its parent when the file sits in a Jobs/ directory)",
    )
    run.add_argument(
        "--context",
        metavar="JSON|@FILE",
        help="trigger event context (recorded; how the agent passes it to a task is "
        "undocumented, so the emulator does not pass it)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="override every task's timeoutSeconds",
    )
    _common(run, port_help="HTTPS port on 127.0.0.1 (default: a free port)")
    run.set_defaults(func=_run)

    agent = sub.add_parser(
        "agent",
        help="serve the emulator until Ctrl-C",
        description="Serve the emulator's HTTPS API and broker until Ctrl-C or SIGTERM.",
    )
    agent.add_argument(
        "--jobs-dir",
        metavar="DIR",
        help="the Jobs/ directory (default: <state dir>/Jobs); agent root is its parent",
    )
    agent.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep the CA, admin certificate and key here (default: a temporary directory "
        "removed at exit)",
    )
    _common(
        agent,
        port_help=f"HTTPS port on 127.0.0.1 (default {AGENT_PORT}, the agent's, when free; "
        "else a free port, with a warning; 0: a free port)",
    )
    agent.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="X",
        help="scheduler speed: X emulated minutes per real minute for intervalMinutes and "
        "cronExpression (default 1; 60: a tick a second; at most 100000). Jobs with the "
        "Startup event run once at start",
    )
    agent.add_argument(
        "--http-port",
        type=int,
        metavar="P",
        help="also serve the agent's HTTP port, which only redirects to HTTPS (the agent's "
        "default is 6888; 0: a free port; default: not served)",
    )
    agent.set_defaults(func=_agent, port=None)


def _common(parser: argparse.ArgumentParser, *, port_help: str) -> None:
    parser.add_argument("--port", type=int, default=0, metavar="P", help=port_help)
    parser.add_argument(
        "--broker",
        default="embedded",
        metavar="KIND",
        help="embedded (default, enforces the agent's rules), mosquitto, HOST:PORT or "
        "mqtts://HOST:PORT (external: nothing enforced)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="[PLUGIN/]KEY=VALUE",
        help="a Plugin Settings value (default plugin KeeperPrivilegeManager); repeatable",
    )
    parser.add_argument(
        "--plugins-dir",
        metavar="DIR",
        help="per-plugin settings JSON files (<name>.json) for revert/revert-all (dev run: "
        "default the plugins/ folder beside the job file, when there is one)",
    )
    parser.add_argument(
        "--register-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds a launched task waits for trust (reproduces the startup 403)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print every API request")
    _behaviour_options(parser)


def _behaviour_options(parser: argparse.ArgumentParser) -> None:
    """Switches for the agent behaviours its documentation leaves open (emulator/behaviour.py)."""
    group = parser.add_argument_group(
        "undocumented agent behaviour (default: the emulator's; --like takes a probe report)"
    )
    group.add_argument(
        "--like",
        metavar="REPORT.json",
        help="behave like the agent a `keeper-task doctor probe --output` report measured; "
        "the switches below override it",
    )
    group.add_argument(
        "--client-id-format",
        metavar="TEMPLATE",
        help="the only MQTT client id the broker accepts, e.g. '{job_id}' or '{job_id}_{pid}' "
        "(default: any id whose first '_' segment is a known job)",
    )
    group.add_argument(
        "--context-via",
        choices=("none", "args", "env", "stdin", "file"),
        help="how a trigger's context reaches the task (default none)",
    )
    group.add_argument(
        "--context-env",
        metavar="NAME",
        help="variable for --context-via env/file (default KEEPER_JOB_CONTEXT)",
    )
    group.add_argument(
        "--kill-grace",
        type=float,
        metavar="S",
        help="seconds between the terminate signal and the kill on timeoutSeconds (default 2)",
    )
    group.add_argument(
        "--no-signal-before-kill",
        dest="signal_before_kill",
        action="store_false",
        default=None,
        help="on timeoutSeconds, kill at once without a terminate signal",
    )


def _behaviour(args: argparse.Namespace) -> Any:
    """The :class:`AgentBehaviour` the options ask for (--like first, then each switch)."""
    import dataclasses

    from keeper_task.emulator.behaviour import AgentBehaviour

    base = AgentBehaviour.from_probe_report(args.like) if args.like else AgentBehaviour()
    changes: dict[str, Any] = {}
    for option, field_name in (
        ("client_id_format", "client_id_format"),
        ("context_via", "context_via"),
        ("context_env", "context_env_var"),
        ("kill_grace", "kill_grace"),
        ("signal_before_kill", "signal_before_kill"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            changes[field_name] = value
    if args.register_delay:
        changes["register_delay"] = args.register_delay
    return dataclasses.replace(base, **changes)


# --- output ----------------------------------------------------------------------------------


class _Printer:
    """Prints emulator events, one line each, in the order the events happened.

    Events come from the emulator's loop thread. Each line is held back for
    :data:`ORDER_WINDOW` seconds and lines are written in the order of their event's time:
    a keeper-task log document by its own ``timestamp`` (milliseconds), anything else by the
    time the emulator received it. A task hands its log events to stderr and KeeperLogger in
    bursts but publishes other messages at once, so without this its last event (a
    ``finished`` publish) would be shown before the log lines that preceded it. A writer
    thread releases the lines; :meth:`flush` writes everything still held.
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        verbose: bool,
        keeper_logger: bool = True,
        runs: bool = False,
        window: float = ORDER_WINDOW,
    ) -> None:
        self.out = out
        self.err = err
        self.verbose = verbose
        # dev agent: runs started over the API get a start and an end line (dev run prints
        # a summary instead).
        self.runs = runs
        # A keeper-task task logs every event twice: as a JSON line on stderr and on
        # KeeperLogger. When the job may publish to KeeperLogger, a stderr event is held back
        # until its KeeperLogger copy arrives (then shown once, as [KeeperLogger]); events
        # that never arrive (startup failures, denied publishes) are shown by flush().
        self.keeper_logger = keeper_logger
        self.window = window
        # Keyed by the whole log document: two events of one millisecond with the same
        # message name (a loop logging items) must not be mistaken for each other.
        self._pending: dict[str, list[tuple[float, str]]] = {}
        self._delivered: Counter[str] = Counter()
        self._lock = threading.Condition()
        # (event time, arrival sequence, stream, text): a heap, earliest event first.
        self._held: list[tuple[float, int, TextIO, str]] = []
        self._seq = itertools.count()
        self._writer: threading.Thread | None = None

    def flush(self) -> None:
        """Write every line still held, and stderr events whose KeeperLogger copy never came."""
        with self._lock:
            for texts in self._pending.values():
                for at, text in texts:
                    heapq.heappush(self._held, (at, next(self._seq), self.out, f"[stderr] {text}"))
            self._pending.clear()
            self._release(None)

    def _release(self, now: float | None) -> None:
        """Write held lines whose event is at least the window old (all when ``now`` is None).

        Called with the lock held.
        """
        held = self._held
        while held and (now is None or held[0][0] + self.window <= now):
            _at, _seq, stream, text = heapq.heappop(held)
            stream.write(text + "\n")
            stream.flush()

    def _write_loop(self) -> None:
        with self._lock:
            while True:
                now = time.time()
                self._release(now)
                timeout = self._held[0][0] + self.window - now if self._held else None
                self._lock.wait(timeout if timeout is None else max(timeout, 0.01))

    def _line(self, stream: TextIO, text: str, at: float) -> None:
        with self._lock:
            heapq.heappush(self._held, (at, next(self._seq), stream, text))
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="keeper-task-dev-output", daemon=True
                )
                self._writer.start()
            self._lock.notify()

    def __call__(self, event: object) -> None:
        from keeper_task.emulator import (
            BrokerMessage,
            DeniedOperation,
            JobRun,
            Notice,
            OutputLine,
            RequestRecord,
        )

        if isinstance(event, JobRun):
            self._show_run(event)
        elif isinstance(event, BrokerMessage):
            self._show_message(event)
        elif isinstance(event, OutputLine):
            self._show_output(event)
        elif isinstance(event, DeniedOperation):
            self._line(self.err, f"keeper-task: DENIED {event.describe()}", event.time)
        elif isinstance(event, Notice):
            self._line(self.err, f"keeper-task: {event.text}", event.time)
        elif isinstance(event, RequestRecord) and self.verbose:
            self._show_request(event)

    def _show_run(self, run: Any) -> None:
        """Show a run's start or end line (only when ``runs`` is set)."""
        if not self.runs:
            return
        if run.ended is None:
            self._line(self.out, _run_line(run), run.started)
            return
        self.flush()  # the run's unpaired stderr events, before its end line
        self._line(self.out, _run_line(run), run.ended)
        self.flush()

    def _show_message(self, message: Any) -> None:
        """Show a publish; a KeeperLogger one also settles its stderr copy."""
        from keeper_task.emulator import KEEPER_LOGGER_TOPIC

        if message.topic != KEEPER_LOGGER_TOPIC:
            self._line(self.out, f"[mqtt {message.topic}] {_snippet(message.text)}", message.time)
            return
        key = _event_key(message.payload)
        if key is not None:
            self._pair_logger_copy(key)
        at = _event_time(message.payload, message.time)
        self._line(self.out, f"[KeeperLogger] {format_log(message.payload)}", at)

    def _pair_logger_copy(self, key: str) -> None:
        """Drop the stderr copy held for ``key``, or remember that its KeeperLogger copy came."""
        with self._lock:
            waiting = self._pending.get(key)
            if waiting:
                waiting.pop(0)
                if not waiting:
                    del self._pending[key]
            else:
                self._delivered[key] += 1

    def _show_output(self, line: Any) -> None:
        """Show an output line; a JSON log event readably, paired with its KeeperLogger copy."""
        text = line.text
        at = line.time
        if text.startswith("{") and '"message"' in text:
            # keeper-task tasks log JSON to a non-terminal stderr: show it readably.
            key = _event_key(text.encode())
            at = _event_time(text.encode(), line.time)
            text = format_log(text.encode())
            if key is not None and self.keeper_logger and line.stream == "stderr":
                self._hold_stderr_copy(key, at, text)
                return
        self._line(self.out, f"[{line.stream}] {text}", at)

    def _hold_stderr_copy(self, key: str, at: float, text: str) -> None:
        """Hold a stderr log event until its KeeperLogger copy comes (none if it already came)."""
        with self._lock:
            if self._delivered[key] > 0:
                self._delivered[key] -= 1
            else:
                self._pending.setdefault(key, []).append((at, text))

    def _show_request(self, record: Any) -> None:
        """Show one API request (``--verbose``)."""
        who = f" ({record.caller})"
        fault = f" [fault: {record.fault}]" if record.fault else ""
        self._line(
            self.out,
            f"[api] {record.method} {record.path} {record.status}{who}{fault}",
            record.time,
        )


def _event_time(payload: bytes, default: float) -> float:
    """When a keeper-task log document says its event happened (``default`` otherwise)."""
    try:
        body = json.loads(payload)
        stamp = body["timestamp"]
        if not isinstance(stamp, str):
            return default
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (ValueError, TypeError, KeyError):
        return default
    if moment.tzinfo is None:
        return default
    return moment.timestamp()


def _run_line(run: Any) -> str:
    """One line for a run starting or ending (``dev agent``)."""
    head = f"[run] job {run.job_id} {run.run_id} ({run.trigger})"
    if run.ended is None:
        return f"{head}: started"
    note = f" ({run.note})" if run.note else ""
    return f"{head}: {run.status}, exit code {run.exit_code} in {run.duration:.2f} s{note}"


def _event_key(payload: bytes) -> str | None:
    """A keeper-task log document in canonical form, to pair its two copies."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or "timestamp" not in body or "message" not in body:
        return None
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def format_log(payload: bytes) -> str:
    """One readable line from a KeeperLogger payload: ``Level message key=value ...``."""
    try:
        body = json.loads(payload)
    except ValueError:
        return _snippet(payload.decode("utf-8", errors="replace"))
    if not isinstance(body, dict):
        return _snippet(json.dumps(body))
    level = body.get("level") or body.get("Level") or "?"
    message = body.get("message") or body.get("Message") or ""
    props = body.get("properties") or body.get("Properties") or {}
    parts = [str(level), str(message)]
    if isinstance(props, dict):
        parts.extend(f"{k}={_value(v)}" for k, v in props.items())
    return " ".join(p for p in parts if p)


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if (" " in text or not text) else text


def _snippet(text: str, limit: int = 300) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# --- shared --------------------------------------------------------------------------------


def _settings(items: list[str]) -> dict[str, str]:
    from keeper_task.emulator import parse_setting

    out: dict[str, str] = {}
    for item in items:
        try:
            plugin, key, value = parse_setting(item)
        except EmulatorError as exc:
            raise UsageError(exc.message) from exc
        out[f"{plugin}/{key}"] = value
    return out


#: SIGINT, SIGTERM (and Ctrl-Break on Windows) stop ``dev`` cleanly: the first raises
#: ``KeyboardInterrupt`` in the main thread, so every path stops the emulator, kills the task
#: tree and removes the temporary state; later ones are only recorded, so a second Ctrl-C
#: cannot abort that cleanup half-way (it is bounded by the emulator's kill grace).
_Signals = InterruptOnce


# --- dev run -------------------------------------------------------------------------------


def _check_runnable(executable: str, command: str | None, *, from_task_option: bool) -> None:
    """Fail with one line, before anything starts, when the task cannot be started."""
    origin = "--task" if from_task_option else f"task binary for command {command!r}"
    # A bad --task is a usage error (64); a job whose binary is unusable is the emulator's.
    error = UsageError if from_task_option else EmulatorError
    if os.sep in executable or (os.altsep is not None and os.altsep in executable):
        path = Path(executable)
        if not path.is_file():
            raise error(f"{origin}: {executable} does not exist")
        if os.name != "nt" and not os.access(path, os.X_OK):
            raise error(
                f"{origin}: {executable} is not executable; run `chmod +x {executable}` "
                "(the agent's service account must be able to execute it)"
            )
    elif shutil.which(executable) is None:
        raise error(f"{origin}: {executable!r} is not a file and not found on PATH")


def _require_dev_extra() -> None:
    """Fail with one line when the ``[emulator]`` extra (aiohttp, amqtt, ...) is missing."""
    try:
        import keeper_task.emulator.core  # noqa: F401  (the package itself imports lazily)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("keeper_task"):
            raise
        raise EmulatorError(
            f"keeper-task dev needs the [emulator] extra (module {exc.name!r} is missing): "
            "pip install 'keeper-task[emulator]'"
        ) from exc


@dataclass(frozen=True)
class _Project:
    """A task project (``pyproject.toml`` with ``[tool.keeper-task]``, as ``keeper-task new``
    writes it)."""

    root: Path
    job_id: str
    task: str
    jobs_dir: Path

    @property
    def package(self) -> str:
        """The top-level package of the task (``demo_task`` for ``demo_task.task:DemoTask``)."""
        return self.task.partition(":")[0].split(".")[0]

    @property
    def source_dir(self) -> Path:
        """Where the package lives: ``src/`` (the template's layout), else the root."""
        src = self.root / "src"
        return src if (src / self.package).is_dir() else self.root

    def source_command(self) -> list[str]:
        """Runs the task from source with this Python: its package's ``__main__``, else the
        task module (both call ``Task.main()`` in a generated project)."""
        if (self.source_dir / self.package / "__main__.py").is_file():
            return [sys.executable, "-m", self.package]
        return [sys.executable, "-m", self.task.partition(":")[0]]


def _tool_table(pyproject: Path) -> dict[str, Any] | None:
    """The ``[tool.keeper-task]`` table of ``pyproject``, or None when it has none."""
    try:
        raw = pyproject.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {pyproject}: {exc.strerror or exc}") from exc
    if b"[tool.keeper-task]" not in raw:
        return None
    # tomllib is 3.11+; tomli (the same parser) may be there on 3.10, else a minimal reader.
    try:
        toml = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    except ModuleNotFoundError:
        return _tool_table_fallback(raw.decode("utf-8", errors="replace"))
    try:
        data: dict[str, Any] = toml.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {pyproject}: {exc}") from exc
    table = data.get("tool", {}).get("keeper-task")
    return table if isinstance(table, dict) else None


def _tool_table_fallback(text: str) -> dict[str, Any] | None:
    """``key = "value"`` lines of ``[tool.keeper-task]`` (Python 3.10 without tomli)."""
    table: dict[str, Any] = {}
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped == "[tool.keeper-task]"
            continue
        key, sep, value = stripped.partition("=")
        if inside and sep and value.strip().startswith('"'):
            table[key.strip()] = value.strip().split('"')[1]
    return table or None


def _read_project(root: Path) -> _Project | None:
    """The project rooted at ``root``, or None when ``root`` is not a task project."""
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    table = _tool_table(pyproject)
    if table is None:
        return None
    missing = [key for key in ("job-id", "task") if not isinstance(table.get(key), str)]
    if missing:
        raise UsageError(
            f"{pyproject}: [tool.keeper-task] lacks {', '.join(missing)} (see keeper-task new)"
        )
    jobs_dir = root / str(table.get("jobs-dir", "jobs"))
    return _Project(root.resolve(), str(table["job-id"]), str(table["task"]), jobs_dir.resolve())


def _project_of(job_file: Path) -> _Project | None:
    """The project a job file belongs to: the first directory above it with a pyproject.toml."""
    for parent in job_file.resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return _read_project(parent)
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def _locate_job(arg: str | None) -> tuple[Path, _Project | None, str | None]:
    """Find the job file for ``dev run [JOB.json|DIR]``.

    Returns:
        ``(job file, its project or None, how it was found or None when given as a file)``.

    Raises:
        UsageError: Nothing to run there (exit 64, before anything starts).
    """
    from keeper_task.scaffold import current_os

    if arg is not None:
        given = Path(arg)
        if given.is_file():
            try:
                with given.open("rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot read job file {arg}: {exc.strerror or exc}") from exc
            return given, _project_of(given), None
        if not given.is_dir():
            raise UsageError(
                f"job file {arg} not found; give a job file, a project directory or nothing "
                "(the current directory)"
            )
    base = Path(arg) if arg is not None else Path.cwd()
    project = _read_project(base)
    if project is None and arg is None and not (base / "job.json").is_file():
        # Somewhere inside a project (src/, tests/): its root, as git finds its repository.
        project = _project_of(base / "job.json")
        if project is not None:
            base = project.root
    where = _shown(base)
    os_name = current_os()
    if project is not None:
        job = project.jobs_dir / os_name / f"{project.job_id}.json"
        if not job.is_file():
            others = sorted(_shown(p) for p in project.jobs_dir.glob(f"*/{project.job_id}.json"))
            found = f" (it has {', '.join(others)})" if others else ""
            raise UsageError(
                f"project {where} has no job for {os_name}: {_shown(job)} is missing{found}; "
                f"create it (`keeper-task new {project.job_id} --os {os_name}` elsewhere "
                "writes one to copy) or give a job file"
            )
        return job, project, f"the project's job for {os_name} (pyproject.toml)"
    single = base / "job.json"
    if single.is_file():
        return single, _project_of(single), f"job.json in {where}"
    raise UsageError(
        f"no job to run in {where}: expected a project made by keeper-task new "
        "(pyproject.toml with [tool.keeper-task]) or a job.json; give the job file: "
        "keeper-task dev run JOB.json"
    )


def _how_found(task: Any, agent_root: Path, found: Path | None) -> str:
    """Where a task's binary was found, in the agent's terms."""
    from keeper_task.jobs.binary import binary_candidates

    command = task.command or ""
    candidates = binary_candidates(task, agent_root)
    if found is not None:
        for index, candidate in enumerate(candidates):
            if candidate == found:
                if index == 0 and agent_root in candidate.parents:
                    return f"Jobs/bin/{command}/ under the agent root {_shown(agent_root)}"
                return "the job's executablePath"
        return f"command {command!r} found on PATH"
    return ""


def _load_runnable_job(job_path: Path) -> Any:
    """Load the job at ``job_path``: valid, allowed on this OS, with at least one task.

    Raises:
        JobDefinitionError: The job is invalid or has no tasks.
        EmulatorError: Its osFilter excludes this OS.
    """
    from keeper_task.jobs import host_os, load_job, validate_job

    job = load_job(job_path)
    report = validate_job(job)
    if not report.valid:
        more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise JobDefinitionError(
            f"{job_path}: invalid job: {report.errors[0]}{more}; "
            "`keeper-task job validate` shows the full report"
        )
    assert job.id is not None
    if job.os_filter is not None and not job.os_filter.allows(host_os()):
        raise EmulatorError(f"job {job.id!r} does not run on {host_os()}: its osFilter excludes it")
    if not job.tasks:
        raise JobDefinitionError(f"{job_path}: the job has no tasks")
    return job


def _task_option(value: str | None) -> list[str] | None:
    """The command ``--task`` gives (None without it); ``python`` means this Python.

    Raises:
        UsageError: The command does not parse or is empty.
    """
    if value is None:
        return None
    try:
        override = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"--task {value!r}: {exc}") from exc
    if not override:
        raise UsageError("--task is empty; give the command that runs the task")
    if override[0] in ("python", "python3"):
        override[0] = sys.executable  # the Python keeper-task runs on
    return override


def _agent_root_for(args: argparse.Namespace, job_dir: Path) -> Path:
    """``--agent-root``, else the agent root a job file's folder implies (``Jobs/``' parent)."""
    if args.agent_root is not None:
        return Path(args.agent_root).resolve()
    return job_dir.parent if job_dir.name == "Jobs" else job_dir


@dataclass
class _Launch:
    """How ``dev run`` starts the job's tasks."""

    #: The command that replaces every task's executable (None: each task's own binary).
    override: list[str] | None
    #: Extra environment for the tasks (None: none).
    env: dict[str, str] | None
    #: Why each task (by ``id()``) runs what it runs, when not found the agent's way.
    how: dict[int, str]


def _plan_launch(
    job: Any, project: _Project | None, override: list[str] | None, found: dict[int, Path | None]
) -> _Launch:
    """Decide what runs: ``--task``, a project's source when nothing is built, or the binaries."""
    if override is not None:
        return _Launch(override, None, {id(t): "--task" for t in job.tasks})
    if project is not None and all(found[id(t)] is None for t in job.tasks):
        # A project not built (nor installed) yet: run its source with this Python, as
        # `keeper-task dev run` right after `keeper-task new` should.
        source = project.source_dir
        path = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": str(source) + (os.pathsep + path if path else "")}
        shown_source = _shown(source / project.package)
        how = {
            id(t): f"no {t.command!r} binary yet: the project's source {shown_source} with "
            "this Python; `keeper-task build` makes the binary"
            for t in job.tasks
        }
        return _Launch(project.source_command(), env, how)
    return _Launch(None, None, {})


def _announce_tasks(
    job: Any,
    launch: _Launch,
    found: dict[int, Path | None],
    *,
    agent_root: Path,
    fallback: Path,
    from_task_option: bool,
) -> None:
    """Check each task can be started and say what runs for it and how it was found.

    Raises:
        UsageError: A task's executable cannot be started.
    """
    from keeper_task.emulator import resolve_task_command

    for task in job.tasks:
        command = resolve_task_command(
            task, agent_root=agent_root, override=launch.override, fallback_script=fallback
        )
        _check_runnable(command[0], task.command, from_task_option=from_task_option)
        reason = launch.how.get(id(task)) or _how_found(task, agent_root, found[id(task)])
        if not reason:
            reason = f"no {task.command!r} binary yet: the task.py beside the job file"
        name = task.id or task.command
        print(
            f"keeper-task: task {name}: running {shlex.join(command)} ({reason})",
            file=sys.stderr,
        )


def _plugins_dir_for(args: argparse.Namespace, job_dir: Path) -> str | None:
    """``--plugins-dir``, else a ``plugins/`` folder beside the job file (said on stderr)."""
    plugins_dir: str | None = args.plugins_dir
    if plugins_dir is None and (job_dir / "plugins").is_dir():
        plugins_dir = str(job_dir / "plugins")
        print(f"keeper-task: plugin settings from {_shown(job_dir / 'plugins')}", file=sys.stderr)
    return plugins_dir


def _run(args: argparse.Namespace) -> int:
    _require_dev_extra()
    from keeper_task.emulator import Emulator
    from keeper_task.jobs import resolve_binary

    context = parse_context(args.context)  # bad input first, before anything starts
    settings = _settings(args.setting)
    job_path, project, how_job = _locate_job(args.job)
    if how_job is not None:
        print(f"keeper-task: job {_shown(job_path)} ({how_job})", file=sys.stderr)
    job = _load_runnable_job(job_path)
    override = _task_option(args.task)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    job_dir = job_path.resolve().parent
    agent_root = _agent_root_for(args, job_dir)
    fallback = job_dir / "task.py"
    found = {id(t): resolve_binary(t, agent_root, search_path=True) for t in job.tasks}
    launch = _plan_launch(job, project, override, found)
    _announce_tasks(
        job,
        launch,
        found,
        agent_root=agent_root,
        fallback=fallback,
        from_task_option=args.task is not None,
    )
    plugins_dir = _plugins_dir_for(args, job_dir)

    topics = job.mqtt_topics
    printer = _Printer(
        sys.stdout,
        sys.stderr,
        verbose=args.verbose,
        keeper_logger=topics is not None and "KeeperLogger" in (topics.allowed_publications or []),
    )
    emulator = Emulator(
        port=args.port,
        broker=args.broker,
        settings=settings,
        register_delay=args.register_delay,
        plugins_dir=plugins_dir,
        behaviour=_behaviour(args),
    )
    return _run_once(
        emulator,
        printer,
        job,
        context=context,
        launch=launch,
        fallback=fallback,
        agent_root=agent_root,
        timeout=args.timeout,
    )


def _run_once(
    emulator: Any,
    printer: _Printer,
    job: Any,
    *,
    context: dict[str, Any] | None,
    launch: _Launch,
    fallback: Path,
    agent_root: Path,
    timeout: float | None,
) -> int:
    """Run ``job`` once on ``emulator``, print the summary and return the exit code.

    Ctrl-C or SIGTERM stops the run; the exit code is then 128+N.
    """
    run: Any = None
    interrupted = False
    with _Signals() as signals:
        remove = emulator.on_event(printer)
        try:
            emulator.start()
            emulator.add_job(job)
            run = emulator.start_run(
                job.id,
                trigger="dev",
                context=context,
                command=launch.override,
                fallback_script=fallback,
                agent_root=agent_root,
                timeout=timeout,
                env=launch.env,
            )
            run.done.wait()
        except KeyboardInterrupt:
            interrupted = True  # summarised below, once everything is stopped
        finally:
            signals.shield()
            # Kills a task still running (with its whole tree) and removes the temporary
            # state; the task's last lines are still shown.
            emulator.stop()
            remove()
            printer.flush()
        # Still inside: a late second signal must not cut the summary short.
        if interrupted and signals.signum is not None:
            _summary(emulator, run, sys.stdout, interrupted=signals.name, job_id=job.id)
            return signal_exit_code(signals.signum)
        _summary(emulator, run, sys.stdout)
        return int(run.exit_code)


def _summary(
    emulator: Any, run: Any, out: TextIO, *, interrupted: str = "", job_id: str = ""
) -> None:
    from keeper_task.emulator import KEEPER_LOGGER_TOPIC

    messages = emulator.messages
    logs = sum(1 for m in messages if m.topic == KEEPER_LOGGER_TOPIC)
    denied = emulator.denied
    if run is None:
        out.write(f"--- job {job_id}: interrupted by {interrupted} before it started\n")
        out.flush()
        return
    if interrupted:
        head = (
            f"--- job {run.job_id}: interrupted by {interrupted} after {run.duration:.2f} s; "
            f"task processes killed, exit code {signal_exit_code(signal.Signals[interrupted])}"
        )
    else:
        head = (
            f"--- job {run.job_id}: {run.status} in {run.duration:.2f} s, exit code {run.exit_code}"
        )
    lines = [head]
    for task in run.tasks:
        if task.error:
            lines.append(f"    task {task.task_id}: not started: {task.error}")
        else:
            extra = ""
            if task.timed_out:
                extra = " (killed at its timeout)"
            elif task.stopped:
                extra = " (killed: dev run was stopped)"
            code = "-" if task.exit_code is None else task.exit_code
            lines.append(
                f"    task {task.task_id}: exit {code} in {task.duration:.2f} s "
                f"(pid {task.pid}){extra}"
            )
    lines.append(
        f"    KeeperLogger messages: {logs}, other publishes: {len(messages) - logs}, "
        f"denied: {len(denied)}, API requests: {len(emulator.requests)}"
    )
    broker = emulator.broker
    if broker is not None and not broker.enforces:
        lines.append(f"    broker {broker.kind}: client ids and topic permissions not enforced")
    lines.extend(f"    DENIED {d.describe()}" for d in denied)
    out.write("\n".join(lines) + "\n")
    out.flush()


# --- dev agent -----------------------------------------------------------------------------


def _port_in_use(exc: EmulatorError) -> bool:
    import errno

    cause = exc.__cause__
    in_use = (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1))
    return isinstance(cause, OSError) and cause.errno in in_use


def _agent_port_free() -> bool:
    """Whether 127.0.0.1:6889 can be listened on now (bound the way the emulator binds)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if os.name != "nt":
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", AGENT_PORT))
        except OSError:
            return False
    return True


def _start_on_agent_port(make: Any) -> Any:
    """Start an emulator on :data:`AGENT_PORT`; when that is taken, on a free port.

    ``keeper-task job`` and ``deploy.sh`` default to the agent's port, so a rehearsal needs no
    ``--url`` unless something (a real agent) already listens there: then one warning line.
    The port is probed first so that only one emulator (and one set of notices) is made; one
    taken between the probe and the start is handled the same way.
    """
    if _agent_port_free():
        try:
            return make(AGENT_PORT).start()
        except EmulatorError as exc:
            if not _port_in_use(exc):
                raise
    fallback = make(0).start()
    print(
        f"keeper-task: warning: port {AGENT_PORT} (the agent's) is in use; serving on "
        f"{fallback.port} instead: pass --url {fallback.base_url} to keeper-task job and "
        "deploy.sh",
        file=sys.stderr,
        flush=True,
    )
    return fallback


def _agent(args: argparse.Namespace) -> int:
    _require_dev_extra()
    from keeper_task.emulator import Emulator

    if not (math.isfinite(args.time_scale) and 0 < args.time_scale <= 100_000):
        raise UsageError(f"--time-scale {args.time_scale:g} must be above 0 and at most 100000")
    # Log copies are paired as in `dev run`; unpaired ones are shown when their run ends.
    printer = _Printer(sys.stdout, sys.stderr, verbose=args.verbose, runs=True)

    def make(port: int) -> Any:
        made = Emulator(
            jobs_dir=args.jobs_dir,
            state_dir=args.state_dir,
            port=port,
            broker=args.broker,
            settings=_settings(args.setting),
            register_delay=args.register_delay,
            plugins_dir=args.plugins_dir,
            behaviour=_behaviour(args),
            startup_events=True,
            schedules=True,
            time_scale=args.time_scale,
            http_port=args.http_port,
        )
        # Listening from the start: job files skipped at load time are reported too.
        made.on_event(printer)
        return made

    stop = threading.Event()
    with _Signals():
        try:
            emulator = _start_on_agent_port(make) if args.port is None else make(args.port)
            with emulator:
                broker = emulator.broker
                assert broker is not None
                scheme = "mqtts" if broker.tls else "mqtt"
                enforced = "enforcing the agent's rules" if broker.enforces else "NOT enforcing"
                info = [
                    f"keeper-task dev agent: serving {emulator.base_url}",
                    f"  CA bundle:  {emulator.ca_bundle}",
                    f"  admin cert: {emulator.admin_cert}",
                    f"  admin key:  {emulator.admin_key}",
                    f"  jobs dir:   {emulator.jobs_dir} ({len(emulator.jobs())} job(s))",
                    f"  broker:     {scheme}://{broker.host}:{broker.port} ({broker.kind}, "
                    f"{enforced})",
                    f"  try:        {emulator.curl_line()}",
                    "Press Ctrl-C to stop.",
                ]
                if emulator.state.temporary:
                    info.insert(-1, "  (temporary state: pass --state-dir DIR to keep the CA)")
                print("\n".join(info), flush=True)
                while not stop.wait(3600):
                    pass
        except KeyboardInterrupt:
            printer.flush()  # lines still held for ordering
            print("keeper-task dev agent: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use: keeper-task dev ...")
