"""The emulator's job runner: starts a job's tasks the way the agent's job runner does.

For each task, in order:

1. **Locate the binary**: a ``--task`` override (shlex-split; it replaces the executable, the
   job's ``arguments`` are still appended), else ``<agent root>/Jobs/bin/<command>/<command>``,
   else ``executablePath``, else ``PATH``; ``keeper-task dev run`` finally falls back to a
   ``task.py`` next to the job file, run with the current Python (an emulator convention for
   unbuilt tasks).
2. **Arguments**: ``{KeeperApiBaseUrl}`` becomes ``https://127.0.0.1:<port>`` (no trailing
   slash), then the string is split like a POSIX shell would. The agent's placeholder syntax
   for job ``parameters`` and the way trigger context reaches a task are undocumented, so the
   emulator substitutes neither: any other ``{Token}`` left in the arguments is reported as a
   notice, and by default the trigger context is only recorded on the :class:`JobRun`
   (an :class:`~keeper_task.emulator.behaviour.AgentBehaviour` can pass it as an argument,
   a variable, stdin or a file).
3. **Environment**: the emulator's own, minus ``KEEPER_JOB_ID``/``KEEPER_JOB_NAME``/
   ``KEEPER_API_BASE``; ``KEEPER_JOB_ID``/``KEEPER_JOB_NAME`` are set only when the job declares
   at least one ``mqttTopics`` entry, as the agent does. ``PYTHONUNBUFFERED=1`` is added so a
   Python task's output streams live (an emulator convenience). The working directory is the
   emulator's (the agent's is undocumented).
4. **Trust**: the PID is registered in the launched-process registry right after the spawn
   (after ``register_delay`` seconds, when set).
5. **Timeout**: past ``timeoutSeconds`` the whole process tree is terminated, then killed
   after ``kill_grace`` seconds, or killed at once when the behaviour says no signal comes
   first (the agent's termination behaviour is undocumented); the task counts as failed with
   exit code 124.
6. **Failure**: a non-zero exit, a timeout or a binary that cannot start stops the job unless
   the task has ``continueOnFailure: true``.

stdout and stderr are captured line by line (and streamed to listeners as
:class:`~keeper_task.emulator.records.OutputLine`); exit codes and durations are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from keeper_task.emulator.behaviour import AgentBehaviour
from keeper_task.emulator.errors import EmulatorError
from keeper_task.emulator.records import Notice, OutputLine, Recorder
from keeper_task.emulator.tiers import ProcessRegistry
from keeper_task.jobs.validate import API_BASE_TOKEN

if TYPE_CHECKING:
    from keeper_task.emulator.behaviour import ContextDelivery
    from keeper_task.jobs import Job, JobTask

__all__ = [
    "API_BASE_TOKEN",
    "EXIT_NOT_STARTED",
    "EXIT_TIMEOUT",
    "JobRun",
    "Launcher",
    "TaskRun",
    "build_argv",
    "resolve_task_command",
]

#: Exit code recorded for a task killed at its ``timeoutSeconds``.
EXIT_TIMEOUT = 124
#: Exit code recorded for a task whose binary could not be started.
EXIT_NOT_STARTED = 127

_TOKEN = re.compile(r"\{[A-Za-z][A-Za-z0-9_.:-]*\}")
_AGENT_ENV = ("KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE")
_run_ids = itertools.count(1)


@dataclass
class TaskRun:
    """One task process of a job run.

    Attributes:
        task_id: The task's ``id`` (or its index when it has none).
        argv: The command line started.
        pid: The process id (None if it never started).
        exit_code: The exit code; 124 after a timeout, 127 when it could not start,
            128+N when killed by signal N.
        timed_out: Killed at ``timeoutSeconds``.
        stopped: Killed because the emulator stopped while it ran (Ctrl-C, SIGTERM).
        error: Why it could not start.
        duration: Seconds from start to exit.
    """

    task_id: str
    name: str | None
    argv: list[str]
    pid: int | None = None
    exit_code: int | None = None
    timed_out: bool = False
    stopped: bool = False
    error: str | None = None
    started: float = 0.0
    duration: float = 0.0
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exited 0 in time, on its own."""
        return (
            self.exit_code == 0 and not self.timed_out and not self.stopped and self.error is None
        )

    @property
    def stdout(self) -> str:
        """Everything the task wrote to stdout."""
        return "".join(line + "\n" for line in self.stdout_lines)

    @property
    def stderr(self) -> str:
        """Everything the task wrote to stderr."""
        return "".join(line + "\n" for line in self.stderr_lines)


@dataclass
class JobRun:
    """One run of a job (``dev run``, ``POST .../run`` or ``.../trigger``).

    Attributes:
        run_id: Unique within the emulator.
        job_id: The job.
        trigger: ``"run"``, ``"trigger"`` or ``"dev"``.
        context: The trigger's event context (recorded only, see the module docstring).
        status: ``running``, ``succeeded``, ``failed``, ``timed_out``, ``skipped`` or
            ``stopped`` (the emulator stopped while it ran: its task tree was killed).
        tasks: One :class:`TaskRun` per task started.
    """

    run_id: str
    job_id: str
    trigger: str
    context: dict[str, Any] | None = None
    status: str = "running"
    note: str = ""
    tasks: list[TaskRun] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    #: Set once the run ended and its broker messages were recorded.
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        """The first failed task's exit code, else 0."""
        for task in self.tasks:
            if not task.ok:
                return task.exit_code if task.exit_code not in (None, 0) else 1
        return 0

    @property
    def duration(self) -> float:
        """Seconds from start to end (so far, while running)."""
        return (self.ended or time.time()) - self.started

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (used by the API's answers and the CLI summary)."""
        return {
            "runId": self.run_id,
            "jobId": self.job_id,
            "trigger": self.trigger,
            "status": self.status,
            "exitCode": self.exit_code if self.ended else None,
            "tasks": [
                {
                    "id": t.task_id,
                    "pid": t.pid,
                    "exitCode": t.exit_code,
                    "timedOut": t.timed_out,
                    "stopped": t.stopped,
                    "error": t.error,
                    "durationSeconds": round(t.duration, 3),
                }
                for t in self.tasks
            ],
        }


def new_run_id() -> str:
    """A short unique run id."""
    return f"run-{next(_run_ids)}"


def resolve_task_command(
    task: JobTask,
    *,
    agent_root: Path | None,
    override: Sequence[str] | None = None,
    fallback_script: Path | None = None,
) -> list[str]:
    """The executable part of a task's command line (see the module docstring for the order).

    Raises:
        EmulatorError: Nothing found; the message lists where it looked.
    """
    from keeper_task.jobs.binary import binary_candidates, is_builtin_command, resolve_binary

    if override:
        return list(override)
    command = task.command or ""
    if command and is_builtin_command(command):
        raise EmulatorError(
            f"task {task.id or command!r} uses the agent's built-in command {command!r}, "
            "which the emulator does not implement; pass --task CMD to run something instead"
        )
    found = resolve_binary(task, agent_root, search_path=True)
    if found is not None:
        return [str(found)]
    if fallback_script is not None and fallback_script.is_file():
        return [sys.executable, str(fallback_script)]
    looked = [str(p) for p in binary_candidates(task, agent_root)]
    looked.append("PATH")
    if fallback_script is not None:
        looked.append(str(fallback_script))
    raise EmulatorError(
        f"task binary for command {command!r} not found (looked in {', '.join(looked)}); "
        "build it with `keeper-task build` or pass --task 'python path/to/task.py'"
    )


def build_argv(
    command: Sequence[str], arguments: str | None, api_base: str
) -> tuple[list[str], list[str]]:
    """Substitute ``{KeeperApiBaseUrl}`` and split the arguments.

    Returns:
        ``(argv, unknown_tokens)``: the full command line and any ``{Token}`` left unreplaced.
    """
    text = (arguments or "").replace(API_BASE_TOKEN, api_base)
    unknown = sorted(set(_TOKEN.findall(text)))
    try:
        extra = shlex.split(text, posix=os.name != "nt")
    except ValueError as exc:
        raise EmulatorError(f"cannot split the task's arguments {arguments!r}: {exc}") from exc
    return [*command, *extra], unknown


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """Wait for the process to exit.

    ``Process.wait()`` also waits for its pipes to close, which a grandchild that inherited
    them delays for ever; the return code is set as soon as the process itself is reaped.
    """
    while proc.returncode is None:
        await asyncio.sleep(0.01)
    return proc.returncode


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _own_session() -> dict[str, Any]:
    """Process-creation options that give a task its own session (process group).

    Its whole tree can then be killed at once, and a Ctrl-C meant for the emulator does
    not reach it.
    """
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


async def _feed_stdin(proc: asyncio.subprocess.Process, data: bytes | None) -> None:
    """Write ``data`` (the trigger context, when delivered on stdin) to the task and close it."""
    if data is None or proc.stdin is None:
        return
    with contextlib.suppress(OSError):  # a task that never reads stdin may exit first
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()


class Launcher:
    """Starts job runs in the emulator's event loop.

    Args:
        registry: Where launched PIDs are registered.
        recorder: Where output lines and notices go.
        api_base: The value of ``{KeeperApiBaseUrl}``.
        register_delay: Seconds between a spawn and its registration.
        kill_grace: Seconds between terminate and kill on timeout.
        extra_env: Variables added to every task's environment.
        behaviour: Undocumented agent behaviours to emulate: how trigger context is passed
            and whether a signal precedes the timeout kill.
    """

    def __init__(
        self,
        registry: ProcessRegistry,
        recorder: Recorder,
        *,
        api_base: str,
        register_delay: float = 0.0,
        kill_grace: float = 2.0,
        extra_env: Mapping[str, str] | None = None,
        behaviour: AgentBehaviour | None = None,
    ) -> None:
        self.behaviour = behaviour or AgentBehaviour(
            register_delay=register_delay, kill_grace=kill_grace
        )
        self.registry = registry
        self.recorder = recorder
        self.api_base = api_base
        self.register_delay = register_delay
        self.kill_grace = kill_grace
        self.extra_env = dict(extra_env or {})
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    def environment(self, job: Job, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment a task of ``job`` starts with (see the module docstring)."""
        env = {k: v for k, v in os.environ.items() if k not in _AGENT_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        env.update(extra or {})
        if job.mqtt_topics is not None and job.mqtt_topics.declared:
            env["KEEPER_JOB_ID"] = job.id or ""
            env["KEEPER_JOB_NAME"] = job.name or ""
        return env

    async def run_job(
        self,
        job: Job,
        run: JobRun,
        *,
        agent_root: Path | None,
        override: Sequence[str] | None = None,
        fallback_script: Path | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> JobRun:
        """Run every task of ``job`` in order; fills and returns ``run``."""
        try:
            for index, task in enumerate(job.tasks):
                task_run = await self._run_task(
                    job,
                    task,
                    run,
                    index=index,
                    agent_root=agent_root,
                    override=override,
                    fallback_script=fallback_script,
                    timeout=timeout,
                    env=env,
                )
                if self._stopping or (not task_run.ok and not task.continue_on_failure):
                    break
            failed = [t for t in run.tasks if not t.ok]
            if any(t.stopped for t in failed):
                run.status = "stopped"
                run.note = "the emulator stopped while the job ran"
            elif any(t.timed_out for t in failed):
                run.status = "timed_out"
            else:
                run.status = "failed" if failed else "succeeded"
        except asyncio.CancelledError:
            run.status = "stopped"
            run.note = "the emulator stopped while the job ran"
            raise
        finally:
            run.ended = time.time()
        return run

    async def _run_task(
        self,
        job: Job,
        task: JobTask,
        run: JobRun,
        *,
        index: int,
        agent_root: Path | None,
        override: Sequence[str] | None,
        fallback_script: Path | None,
        timeout: float | None,
        env: Mapping[str, str] | None,
    ) -> TaskRun:
        task_id = task.id or task.name or f"task-{index + 1}"
        task_run = TaskRun(task_id=task_id, name=task.name, argv=[])
        run.tasks.append(task_run)
        task_run.started = time.time()
        try:
            command = resolve_task_command(
                task, agent_root=agent_root, override=override, fallback_script=fallback_script
            )
            argv, unknown = build_argv(command, task.arguments, self.api_base)
            delivery = self.behaviour.deliver_context(run.context)
            argv.extend(delivery.args)
        except EmulatorError as exc:
            return self._not_started(job, task_run, exc.message)
        task_run.argv = argv
        self._note_unknown_tokens(job, task_id, unknown)
        limit = timeout if timeout is not None else task.timeout_seconds
        started = time.monotonic()
        try:
            proc = await self._spawn(
                argv, delivery, env={**self.environment(job, env), **delivery.env}
            )
        except OSError as exc:
            return self._not_started(
                job, task_run, f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            )
        pid = proc.pid
        task_run.pid = pid
        await _feed_stdin(proc, delivery.stdin)
        self.registry.register(pid, job.id or "", delay=self.register_delay)
        self._procs[pid] = proc
        readers = [
            asyncio.ensure_future(self._pump(proc.stdout, "stdout", run, task_run)),
            asyncio.ensure_future(self._pump(proc.stderr, "stderr", run, task_run)),
        ]
        try:
            await self._wait_and_drain(
                proc, job, task_run, limit=limit, started=started, readers=readers
            )
        except asyncio.CancelledError:
            await self._kill_cancelled(proc, task_run)
            raise
        finally:
            for reader in readers:
                reader.cancel()
            self._procs.pop(pid, None)
            delivery.cleanup()
            self.registry.unregister(pid)
            if not task_run.duration:
                task_run.duration = time.monotonic() - started
        code = proc.returncode if proc.returncode is not None else -9
        task_run.exit_code = EXIT_TIMEOUT if task_run.timed_out else _exit_code(code)
        return task_run

    def _not_started(self, job: Job, task_run: TaskRun, error: str) -> TaskRun:
        """Mark ``task_run`` as never started (exit 127) and say why in a notice."""
        task_run.error = error
        task_run.exit_code = EXIT_NOT_STARTED
        self.recorder.add(Notice(f"job {job.id!r} task {task_run.task_id!r}: {error}"))
        return task_run

    def _note_unknown_tokens(self, job: Job, task_id: str, unknown: Sequence[str]) -> None:
        """One notice per argument token left as it is (only ``{KeeperApiBaseUrl}`` is known)."""
        for token in unknown:
            self.recorder.add(
                Notice(
                    f"job {job.id!r} task {task_id!r}: argument token {token} is not "
                    f"substituted (the agent documents only {API_BASE_TOKEN}; its parameter "
                    "placeholder syntax is unknown)"
                )
            )

    async def _spawn(
        self, argv: list[str], delivery: ContextDelivery, *, env: dict[str, str]
    ) -> asyncio.subprocess.Process:
        """Start the task in a session (process group) of its own, its output piped.

        Raises:
            OSError: The executable cannot be started.
        """
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL if delivery.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            **_own_session(),
        )

    async def _wait_and_drain(
        self,
        proc: asyncio.subprocess.Process,
        job: Job,
        task_run: TaskRun,
        *,
        limit: float | None,
        started: float,
        readers: Sequence[asyncio.Future[None]],
    ) -> None:
        """Wait for the task to exit (killing it at ``limit``), then read its output to the end."""
        await self._wait_or_kill(proc, job, task_run, limit=limit)
        task_run.duration = time.monotonic() - started
        if self._stopping:
            task_run.stopped = True
        # Processes left in the task's session would hold its pipes open for ever.
        await self._reap_leftovers(proc.pid, job, task_run.task_id)
        # Output still buffered in the pipes is read to the end.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers), timeout=5)

    async def _wait_or_kill(
        self, proc: asyncio.subprocess.Process, job: Job, task_run: TaskRun, *, limit: float | None
    ) -> None:
        """Wait for the task to exit; past ``limit`` seconds (when > 0) kill its tree."""
        try:
            if limit is not None and limit > 0:
                await asyncio.wait_for(_exited(proc), timeout=limit)
            else:
                await _exited(proc)
        except asyncio.TimeoutError:
            task_run.timed_out = True
            self.recorder.add(
                Notice(
                    f"job {job.id!r} task {task_run.task_id!r} (pid {proc.pid}) ran past its "
                    f"timeout of {limit:g} s: killing its process tree"
                )
            )
            await self.kill_tree(proc.pid, signal_first=self.behaviour.signal_before_kill)
            await _exited(proc)

    async def _kill_cancelled(self, proc: asyncio.subprocess.Process, task_run: TaskRun) -> None:
        """The emulator is stopping (Ctrl-C, SIGTERM, stop()): the task tree goes with it."""
        task_run.stopped = True
        await self.kill_tree(proc.pid)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_exited(proc), timeout=5)
        if proc.returncode is not None:
            task_run.exit_code = _exit_code(proc.returncode)

    async def _pump(
        self, stream: asyncio.StreamReader | None, name: str, run: JobRun, task_run: TaskRun
    ) -> None:
        if stream is None:
            return
        lines = task_run.stdout_lines if name == "stdout" else task_run.stderr_lines
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            lines.append(text)
            self.recorder.add(OutputLine(run.run_id, task_run.task_id, name, text, task_run.pid))

    async def kill_tree(self, pid: int, *, signal_first: bool = True) -> None:
        """Terminate ``pid`` and its descendants, then kill what is left after the grace.

        ``signal_first=False`` kills at once, without the terminate signal.
        """
        proc = self._procs.get(pid)

        def exited() -> bool:
            return proc is None or proc.returncode is not None

        await asyncio.to_thread(_kill_tree, pid, self.kill_grace, exited, signal_first)

    async def _reap_leftovers(self, pid: int, job: Job, task_id: str) -> None:
        """Kill processes the task left running in its session (POSIX)."""
        if os.name == "nt":
            return
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if not self._stopping:  # when stopping, the tree is being killed on purpose
            self.recorder.add(
                Notice(
                    f"job {job.id!r} task {task_id!r} left processes running after it exited; "
                    "the emulator killed them (a job task must not leave daemons behind)"
                )
            )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    async def stop_all(self) -> None:
        """Kill every running task and start no more (the emulator is stopping)."""
        self._stopping = True
        for pid in list(self._procs):
            await self.kill_tree(pid)


def _kill_tree(
    pid: int, grace: float, root_exited: Callable[[], bool], signal_first: bool = True
) -> None:
    """Terminate ``pid`` and its descendants; kill what is left after ``grace`` seconds.

    ``pid`` is the emulator's own child and is never waited for here: psutil would reap it,
    and asyncio's child watcher would then log "Unknown child process" and report exit code
    255 instead of the signal. ``root_exited`` says when the watcher has seen it end.
    """
    try:
        root: psutil.Process | None = psutil.Process(pid)
        children = root.children(recursive=True) if root is not None else []
    except psutil.NoSuchProcess:
        root, children = None, []
    for proc in [*children, *([root] if root is not None else [])]:
        with contextlib.suppress(psutil.NoSuchProcess):
            if signal_first:
                proc.terminate()
            else:
                proc.kill()
    alive = _wait_gone(children, grace)
    if root is not None and not _poll(root_exited, grace):
        alive.append(root)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _wait_gone([proc for proc in alive if proc is not root], 5.0)
    if os.name != "nt":
        # Grandchildren that re-parented away from the tree are still in the task's session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _poll(done: Callable[[], bool], seconds: float) -> bool:
    """Poll ``done()`` every 10 ms for up to ``seconds``; return its last value."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Wait until the (non-child) processes ended; return those still alive.

    A dead descendant stays a zombie until whoever inherited it reaps it (in a container,
    an init that may reap late): a zombie counts as gone, as it can no longer do anything.
    """

    def gone(proc: psutil.Process) -> bool:
        try:
            return bool(proc.status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    left = list(procs)

    def all_gone() -> bool:
        left[:] = [proc for proc in left if not gone(proc)]
        return not left

    _poll(all_gone, seconds)
    return left
