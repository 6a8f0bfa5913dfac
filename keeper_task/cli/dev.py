"""``keeper-task dev``: run a job's task under the local agent emulator, or serve the emulator.

``keeper-task dev run JOB.json`` starts the emulator (HTTPS API + MQTT broker), runs the job
once as the agent's job runner would, streams the task's ``KeeperLogger`` messages, other
publishes and output one line each, prints a summary and exits with the task's exit code
(124 when it ran past its timeout). The task's binary is looked up as the agent does
(``Jobs/bin/<command>/<command>`` under the agent root, ``executablePath``, ``PATH``); when
none exists, a ``task.py`` next to the job file is run with the current Python (an emulator
convention for tasks not built yet). ``--task CMD`` replaces the executable outright.

Before anything starts, ``dev run`` checks the job file and that the task can be started
(each problem is one ``keeper-task: error:`` line). Ctrl-C or SIGTERM while the task runs
kills its whole process tree, prints the summary and exits with 128+N (130, 143).

``keeper-task dev agent`` serves the emulator until Ctrl-C or SIGTERM and prints what a
deployment script needs: base URL, CA bundle, admin certificate and key, a curl line; runs
started over the API (``trigger``, ``run``) get a ``[run]`` line when they start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from keeper_task.cli.job import parse_context
from keeper_task.errors import EmulatorError, JobDefinitionError, UsageError
from keeper_task.exit_codes import signal_exit_code

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``dev run`` and ``dev agent`` to the ``keeper-task`` parser."""
    dev = subparsers.add_parser(
        "dev",
        help="run a task under the local agent emulator, or serve the emulator",
        description="Run job tasks locally under an emulator of the Keeper EPM agent.",
    )
    sub = dev.add_subparsers(title="commands", metavar="COMMAND", parser_class=type(dev))
    dev.set_defaults(func=lambda _a: _help(dev))

    run = sub.add_parser(
        "run",
        help="run a job once under the emulator and stream its logs",
        description="Start the emulator and its broker, run JOB once as the agent would, "
        "stream its KeeperLogger messages and output, print a summary, exit with the "
        "task's exit code.",
    )
    run.add_argument("job", metavar="JOB.json", help="the job definition file")
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
    _common(run)
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
    _common(agent)
    agent.set_defaults(func=_agent)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="P",
        help="HTTPS port on 127.0.0.1 (default: a free port; the agent's is 6889)",
    )
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
        help="per-plugin settings JSON files (<name>.json) for revert/revert-all",
    )
    parser.add_argument(
        "--register-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds a launched task waits for trust (reproduces the startup 403)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print every API request")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 64


# --- output ----------------------------------------------------------------------------------


class _Printer:
    """Prints emulator events, one line each (thread-safe: events come from the loop)."""

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        verbose: bool,
        keeper_logger: bool = True,
        runs: bool = False,
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
        # Keyed by the whole log document: two events of one millisecond with the same
        # message name (a loop logging items) must not be mistaken for each other.
        self._pending: dict[str, list[str]] = {}
        self._delivered: Counter[str] = Counter()
        self._lock = threading.Lock()

    def flush(self) -> None:
        """Show stderr events whose KeeperLogger copy never arrived."""
        with self._lock:
            pending = [text for texts in self._pending.values() for text in texts]
            self._pending.clear()
        for text in pending:
            self._line(self.out, f"[stderr] {text}")

    def _line(self, stream: TextIO, text: str) -> None:
        with self._lock:
            stream.write(text + "\n")
            stream.flush()

    def __call__(self, event: object) -> None:
        from keeper_task.emulator import (
            KEEPER_LOGGER_TOPIC,
            BrokerMessage,
            DeniedOperation,
            JobRun,
            Notice,
            OutputLine,
            RequestRecord,
        )

        if isinstance(event, JobRun):
            if self.runs:
                if event.ended is not None:
                    self.flush()  # the run's unpaired stderr events, before its end line
                self._line(self.out, _run_line(event))
        elif isinstance(event, BrokerMessage):
            if event.topic == KEEPER_LOGGER_TOPIC:
                key = _event_key(event.payload)
                if key is not None:
                    with self._lock:
                        waiting = self._pending.get(key)
                        if waiting:
                            waiting.pop(0)
                            if not waiting:
                                del self._pending[key]
                        else:
                            self._delivered[key] += 1
                self._line(self.out, f"[KeeperLogger] {format_log(event.payload)}")
            else:
                self._line(self.out, f"[mqtt {event.topic}] {_snippet(event.text)}")
        elif isinstance(event, OutputLine):
            text = event.text
            if text.startswith("{") and '"message"' in text:
                # keeper-task tasks log JSON to a non-terminal stderr: show it readably.
                key = _event_key(text.encode())
                text = format_log(text.encode())
                if key is not None and self.keeper_logger and event.stream == "stderr":
                    with self._lock:
                        if self._delivered[key] > 0:
                            self._delivered[key] -= 1
                        else:
                            self._pending.setdefault(key, []).append(text)
                    return
            self._line(self.out, f"[{event.stream}] {text}")
        elif isinstance(event, DeniedOperation):
            self._line(self.err, f"keeper-task: DENIED {event.describe()}")
        elif isinstance(event, Notice):
            self._line(self.err, f"keeper-task: {event.text}")
        elif isinstance(event, RequestRecord) and self.verbose:
            who = f" ({event.caller})"
            fault = f" [fault: {event.fault}]" if event.fault else ""
            self._line(self.out, f"[api] {event.method} {event.path} {event.status}{who}{fault}")


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
        plugin, key, value = parse_setting(item)
        out[f"{plugin}/{key}"] = value
    return out


class _Signals:
    """SIGINT and SIGTERM stop ``dev`` cleanly.

    The first signal raises ``KeyboardInterrupt`` in the main thread, so every path stops
    the emulator, kills the task tree and removes the temporary state. Later signals are
    only recorded: a second Ctrl-C must not abort that cleanup half-way and leave a task or
    a temporary directory behind (the cleanup is bounded by the emulator's kill grace).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._shielded = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            if not self._shielded:
                raise KeyboardInterrupt

    def shield(self) -> None:
        """From now on signals are only recorded (the cleanup has started)."""
        self._shielded = True

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        """The signal's name (``SIGINT``), or an empty string."""
        return signal.Signals(self.signum).name if self.signum is not None else ""


# --- dev run -------------------------------------------------------------------------------


def _check_runnable(executable: str, command: str | None, *, from_task_option: bool) -> None:
    """Fail with one line, before anything starts, when the task cannot be started."""
    origin = "--task" if from_task_option else f"task binary for command {command!r}"
    if os.sep in executable or (os.altsep is not None and os.altsep in executable):
        path = Path(executable)
        if not path.is_file():
            raise EmulatorError(f"{origin}: {executable} does not exist")
        if os.name != "nt" and not os.access(path, os.X_OK):
            raise EmulatorError(
                f"{origin}: {executable} is not executable; run `chmod +x {executable}` "
                "(the agent's service account must be able to execute it)"
            )
    elif shutil.which(executable) is None:
        raise EmulatorError(f"{origin}: {executable!r} is not a file and not found on PATH")


def _require_dev_extra() -> None:
    """Fail with one line when the ``[dev]`` extra (aiohttp, amqtt, psutil, trustme) is missing."""
    try:
        import keeper_task.emulator  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("keeper_task"):
            raise
        raise EmulatorError(
            f"keeper-task dev needs the [dev] extra (module {exc.name!r} is missing): "
            "pip install 'keeper-task[dev]'"
        ) from exc


def _run(args: argparse.Namespace) -> int:
    _require_dev_extra()
    from keeper_task.emulator import Emulator, resolve_task_command
    from keeper_task.jobs import host_os, load_job, resolve_binary, validate_job

    context = parse_context(args.context)  # bad input first, before anything starts
    job_path = Path(args.job)
    if job_path.is_dir():
        raise JobDefinitionError(f"{job_path} is a directory; give the job's JSON file")
    if not job_path.is_file():
        raise JobDefinitionError(f"job file {job_path} not found")
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
    override: list[str] | None = None
    if args.task is not None:
        try:
            override = shlex.split(args.task)
        except ValueError as exc:
            raise UsageError(f"--task {args.task!r}: {exc}") from exc
        if not override:
            raise UsageError("--task is empty; give the command that runs the task")
        if override[0] in ("python", "python3"):
            override[0] = sys.executable  # the Python keeper-task runs on
    job_dir = job_path.resolve().parent
    if args.agent_root is not None:
        agent_root = Path(args.agent_root).resolve()
    else:
        agent_root = job_dir.parent if job_dir.name == "Jobs" else job_dir
    fallback = job_dir / "task.py"
    for task in job.tasks:
        command = resolve_task_command(
            task, agent_root=agent_root, override=override, fallback_script=fallback
        )
        _check_runnable(command[0], task.command, from_task_option=override is not None)
        if override is None and resolve_binary(task, agent_root, search_path=True) is None:
            print(
                f"keeper-task: no binary for command {task.command!r} yet; running "
                f"{command[-1]} with {Path(sys.executable).name}",
                file=sys.stderr,
            )
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")

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
        settings=_settings(args.setting),
        register_delay=args.register_delay,
        plugins_dir=args.plugins_dir,
    )
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
                command=override,
                fallback_script=fallback,
                agent_root=agent_root,
                timeout=args.timeout,
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


def _agent(args: argparse.Namespace) -> int:
    _require_dev_extra()
    from keeper_task.emulator import Emulator

    # Log copies are paired as in `dev run`; unpaired ones are shown when their run ends.
    printer = _Printer(sys.stdout, sys.stderr, verbose=args.verbose, runs=True)
    emulator = Emulator(
        jobs_dir=args.jobs_dir,
        state_dir=args.state_dir,
        port=args.port,
        broker=args.broker,
        settings=_settings(args.setting),
        register_delay=args.register_delay,
        plugins_dir=args.plugins_dir,
    )
    stop = threading.Event()
    # Listening from the start: job files skipped at load time are reported too.
    emulator.on_event(printer)
    with _Signals():
        try:
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
            print("keeper-task dev agent: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use: keeper-task dev ...")
