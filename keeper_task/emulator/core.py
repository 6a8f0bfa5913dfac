"""The :class:`Emulator`: a local stand-in for the agent, for ``keeper-task dev`` and tests.

It runs in a background thread with its own asyncio loop, so it can be used from plain
synchronous code (the CLI, pytest fixtures, a task run in-process)::

    with Emulator(jobs_dir="Jobs") as agent:
        run = agent.run_job("hello-task", command=["python", "task.py"])
        print(run.exit_code, agent.logs())
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import math
import os
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from keeper_task.emulator.behaviour import AgentBehaviour, write_appsettings
from keeper_task.emulator.broker import (
    Broker,
    BrokerPolicy,
    EmbeddedBroker,
    ExternalBroker,
    MosquittoBroker,
    parse_broker_spec,
)
from keeper_task.emulator.errors import EmulatorError
from keeper_task.emulator.faults import Faults
from keeper_task.emulator.launcher import JobRun, Launcher, new_run_id
from keeper_task.emulator.records import (
    BrokerMessage,
    DeniedOperation,
    Notice,
    OutputLine,
    Recorder,
    RequestRecord,
)
from keeper_task.emulator.schedule import STARTUP_EVENT, CronError, CronExpression
from keeper_task.emulator.settings_store import AGENT_PLUGIN, SettingsStore, setting_text
from keeper_task.emulator.state import EmulatorState
from keeper_task.emulator.tiers import ProcessRegistry
from keeper_task.emulator.tls_front import TlsFront
from keeper_task.errors import JobDefinitionError

if TYPE_CHECKING:
    import httpx
    from aiohttp import web

    from keeper_task.jobs import Job, ValidationReport

__all__ = ["Emulator", "parse_setting"]

T = TypeVar("T")


def parse_setting(text: str) -> tuple[str, str, str]:
    """Parse ``--setting [PLUGIN/]KEY=VALUE`` into ``(plugin, key, value)``.

    Without ``PLUGIN/`` the setting belongs to ``KeeperPrivilegeManager``.

    Raises:
        EmulatorError: No ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise EmulatorError(f"--setting {text!r}: expected KEY=VALUE or PLUGIN/KEY=VALUE")
    plugin, slash, name = key.partition("/")
    if slash and plugin and name:
        return plugin, name, value
    return AGENT_PLUGIN, key, value


def _policy_settings(settings: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{"key": value}`` / ``{"Plugin/key": value}`` as the agent's strings, by plugin.

    Raises:
        EmulatorError: An empty key.
    """
    by_plugin: dict[str, dict[str, str]] = {}
    for key, value in settings.items():
        plugin, name, _ = parse_setting(f"{key}=")
        by_plugin.setdefault(plugin, {})[name] = setting_text(value)
    return by_plugin


class Emulator:
    """A local agent: HTTPS API, MQTT broker, job runner, tiers and faults.

    Args:
        jobs_dir: The ``Jobs/`` directory (default ``<state dir>/Jobs``); the agent root is
            its parent unless ``agent_root`` is given.
        state_dir: Where the CA and certificates live (default: a temporary directory removed
            by :meth:`stop`).
        plugins_dir: Per-plugin settings JSON files (default ``<agent root>/Plugins``).
        agent_root: Root for ``Jobs/bin/<command>/<command>`` and ``{approot}``.
        port: HTTPS port on 127.0.0.1 (0: a free port).
        startup_events: Run the jobs whose ``events`` include ``Startup`` once, when the
            emulator starts (``dev agent`` turns this on).
        schedules: Tick the scheduler: ``intervalMinutes`` and ``cronExpression`` fire
            (see :mod:`keeper_task.emulator.schedule`); :meth:`advance_schedule` works
            either way.
        time_scale: Emulated minutes per real minute for the scheduler (60: a tick a second).
        schedule_start: The emulated clock at start, for cron (default: now, local time).
        http_port: Also serve the agent's plain-HTTP port (its default is 6888; 0: a free
            port), which answers every request with a 307 redirect to HTTPS and serves
            nothing itself (the reference: "do not use the HTTP port for sensitive
            operations"). None (the default): not served.
        broker: ``"embedded"`` (default), ``"mosquitto"``, ``"HOST:PORT"`` or
            ``"mqtts://HOST:PORT"``.
        broker_port: Port of an embedded/mosquitto broker (0: a free port).
        settings: Policy settings, ``{"key": value}`` or ``{"Plugin/key": value}`` (values are
            converted to the agent's strings).
        register_delay: Seconds between a task's launch and its registration (403 meanwhile).
        trust_pids: PIDs trusted as if launched (for in-process test runs); empty by default.
        require_trusted_mqtt: The embedded broker refuses processes it did not launch.
        kill_grace: Seconds between terminate and kill when a task times out.
        task_env: Extra environment variables for every task.
        behaviour: The undocumented agent behaviours to emulate (see
            :mod:`keeper_task.emulator.behaviour`); its ``register_delay`` and ``kill_grace``
            replace the arguments of the same name.
    """

    def __init__(
        self,
        *,
        jobs_dir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        plugins_dir: str | os.PathLike[str] | None = None,
        agent_root: str | os.PathLike[str] | None = None,
        port: int = 0,
        http_port: int | None = None,
        startup_events: bool = False,
        schedules: bool = False,
        time_scale: float = 1.0,
        schedule_start: datetime | None = None,
        broker: str = "embedded",
        broker_port: int = 0,
        settings: Mapping[str, Any] | None = None,
        register_delay: float = 0.0,
        trust_pids: Iterable[int] = (),
        require_trusted_mqtt: bool = True,
        kill_grace: float = 2.0,
        task_env: Mapping[str, str] | None = None,
        behaviour: AgentBehaviour | None = None,
    ) -> None:
        if behaviour is not None:
            register_delay, kill_grace = behaviour.register_delay, behaviour.kill_grace
        self.behaviour = behaviour or AgentBehaviour(
            register_delay=register_delay, kill_grace=kill_grace
        )
        self._jobs_dir_arg = Path(jobs_dir).resolve() if jobs_dir is not None else None
        self._state_dir_arg = state_dir
        self._plugins_dir_arg = Path(plugins_dir).resolve() if plugins_dir is not None else None
        self._agent_root_arg = Path(agent_root).resolve() if agent_root is not None else None
        self._port_arg = port
        self._http_port_arg = http_port
        if not (math.isfinite(time_scale) and 0 < time_scale <= 100_000):
            raise EmulatorError("time_scale must be a number above 0 and at most 100000")
        self.startup_events = startup_events
        self.schedules = schedules
        self.time_scale = time_scale
        self._schedule_start = schedule_start
        self._schedule_clock = schedule_start or datetime.now()
        self._schedule_minute = 0
        self._ticker: asyncio.Task[None] | None = None
        self._http_runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.front: TlsFront | None = None
        self.broker_spec = broker
        self._broker_kind, self._ext_host, self._ext_port, self._ext_tls = parse_broker_spec(broker)
        self._broker_port_arg = broker_port
        self._policy_settings = _policy_settings(settings or {})
        if register_delay < 0:
            raise EmulatorError("register_delay must be >= 0 seconds")
        self.register_delay = register_delay
        self._require_trusted = require_trusted_mqtt
        self.kill_grace = kill_grace
        self.task_env = dict(task_env or {})
        self.recorder = Recorder()
        self.registry = ProcessRegistry(trust_pids)
        self.faults = Faults()
        self.runs: list[JobRun] = []
        self.started_at = time.monotonic()
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._run_tasks: set[asyncio.Task[Any]] = set()
        self._state: EmulatorState | None = None
        self._broker: Broker | None = None
        self._launcher: Launcher | None = None
        self._settings: SettingsStore | None = None
        self._policy: BrokerPolicy | None = None
        self.port = 0
        self.recorder.add_listener(self._on_record)

    @classmethod
    def from_probe_report(
        cls, report: Mapping[str, Any] | str | os.PathLike[str], **kwargs: Any
    ) -> Emulator:
        """An emulator that behaves like the agent a ``keeper-task doctor probe`` measured."""
        return cls(behaviour=AgentBehaviour.from_probe_report(report), **kwargs)

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Emulator:
        """Create the state, start the broker and the HTTPS API; return self.

        Raises:
            EmulatorError: The port is in use, the broker cannot start, a directory is
                unusable.
        """
        if self._loop is not None:
            return self
        self._state = EmulatorState(self._state_dir_arg)
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_disconnects)
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="keeper-task-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._call(self._astart(), timeout=60)
        except BaseException:
            self.stop()
            raise
        self.started_at = time.monotonic()
        return self

    def stop(self) -> None:
        """Kill running tasks, stop the API and the broker, remove a temporary state dir."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            with contextlib.suppress(Exception):
                self._call(self._astop(), timeout=60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.close()
        self._loop = None
        self._thread = None
        if self._state is not None:
            self._state.cleanup()

    async def _astart(self) -> None:
        from aiohttp import web

        from keeper_task.emulator.api import build_app

        state = self.state
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._policy = BrokerPolicy(
            self.job, self.registry, self.recorder, require_trusted=self._require_trusted
        )
        if self.behaviour.client_id_format is not None:
            self._policy.client_id_check = self.behaviour.client_id_problem
        self._broker = self._make_broker(state, self._policy)
        await self._broker.start()
        defaults = {
            AGENT_PLUGIN: {
                "broker.host": self._broker.host,
                "broker.port": str(self._broker.port),
                "broker.tls": "true" if self._broker.tls else "false",
            }
        }
        self._settings = SettingsStore(
            self.plugins_dir, defaults=defaults, policy=self._policy_settings
        )
        for problem in self._settings.load_errors:
            self.recorder.add(Notice(f"plugin settings file skipped: {problem}"))
        self.reload_jobs()
        runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        server = runner.server
        assert server is not None  # set by setup()
        chain, key = state.server_pems()
        front = TlsFront(chain, key, state.admin_ca_pem(), server)
        try:
            self.port = await front.start("127.0.0.1", self._port_arg)
            if self._http_port_arg is not None:
                self._http_runner = await _start_http_redirect(self, self._http_port_arg)
        except OSError as exc:
            await front.stop()
            await runner.cleanup()
            raise _listen_error(exc, self._port_arg, self._http_port_arg) from exc
        self._runner = runner
        self.front = front
        if self.agent_root == state.root:  # never write into a user's own agent root
            write_appsettings(
                state.root,
                https_port=self.port,
                http_port=self.http_port,
                broker_host=self._broker.host,
                broker_port=self._broker.port,
            )
        self._launcher = Launcher(
            self.registry,
            self.recorder,
            api_base=self.base_url,
            register_delay=self.register_delay,
            kill_grace=self.kill_grace,
            extra_env=self.task_env,
            behaviour=self.behaviour,
        )
        self._start_scheduler()

    def _make_broker(self, state: EmulatorState, policy: BrokerPolicy) -> Broker:
        if self._broker_kind == "embedded":
            return EmbeddedBroker(state, policy, port=self._broker_port_arg)
        if self._broker_kind == "mosquitto":
            self.recorder.add(
                Notice(
                    "mosquitto broker: client ids and topic permissions are NOT enforced "
                    "(use the embedded broker to check them); every publish is recorded"
                )
            )
            return MosquittoBroker(state, policy, port=self._broker_port_arg)
        assert self._ext_host is not None and self._ext_port is not None
        self.recorder.add(
            Notice(
                f"external broker {self._ext_host}:{self._ext_port}: client ids and topic "
                "permissions are NOT enforced; publishes are recorded only if a subscriber on "
                "'#' can connect"
            )
        )
        return ExternalBroker(self._ext_host, self._ext_port, tls=self._ext_tls, policy=policy)

    async def _astop(self) -> None:
        if self._ticker is not None:
            ticker, self._ticker = self._ticker, None
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        if self._launcher is not None:
            await self._launcher.stop_all()
        tasks = list(self._run_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.front is not None:
            front, self.front = self.front, None
            await front.stop()
        if self._http_runner is not None:
            http_runner, self._http_runner = self._http_runner, None
            await http_runner.cleanup()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._broker is not None:
            await self._broker.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` in the emulator's loop and wait for its result."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise EmulatorError("the emulator is not running; call start() first")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise EmulatorError(f"the emulator did not answer within {timeout} s") from exc

    # --- where things are -------------------------------------------------------------------

    @property
    def state(self) -> EmulatorState:
        """The state directory and certificates (after :meth:`start`)."""
        if self._state is None:
            raise EmulatorError("the emulator is not started")
        return self._state

    @property
    def running(self) -> bool:
        """Whether the emulator serves."""
        return self._runner is not None

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<port>``: what ``{KeeperApiBaseUrl}`` becomes."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_bundle(self) -> Path:
        """PEM bundle that verifies the HTTPS API and the broker."""
        return self.state.ca_bundle

    @property
    def admin_cert(self) -> Path:
        """Admin-tier client certificate (PEM)."""
        return self.state.admin_cert

    @property
    def admin_key(self) -> Path:
        """Private key of :attr:`admin_cert` (PEM)."""
        return self.state.admin_key

    @property
    def jobs_dir(self) -> Path:
        """The ``Jobs/`` directory."""
        return self._jobs_dir_arg or self.state.root / "Jobs"

    @property
    def agent_root(self) -> Path:
        """The agent root: ``agent_root`` or the parent of :attr:`jobs_dir`."""
        return self._agent_root_arg or self.jobs_dir.parent

    @property
    def plugins_dir(self) -> Path:
        """Where per-plugin settings JSON files are read from."""
        return self._plugins_dir_arg or self.agent_root / "Plugins"

    @property
    def broker(self) -> Broker | None:
        """The broker (after :meth:`start`)."""
        return self._broker

    @property
    def settings(self) -> SettingsStore:
        """The Plugin Settings store (after :meth:`start`)."""
        if self._settings is None:
            raise EmulatorError("the emulator is not started")
        return self._settings

    def curl_line(self, path: str = "/api/Jobs") -> str:
        """A ready ``curl`` command for an Admin-tier call."""
        return (
            f"curl --cacert {self.ca_bundle} --cert {self.admin_cert} --key {self.admin_key} "
            f"{self.base_url}{path}"
        )

    def http_client(self, *, admin: bool = False, timeout: float = 10.0) -> httpx.Client:
        """An httpx client for the API that verifies the emulator's certificate.

        Args:
            admin: Present the admin client certificate (Admin tier).
            timeout: Seconds per request.
        """
        import httpx

        return httpx.Client(
            base_url=self.base_url,
            verify=self.state.client_ssl_context(admin=admin),
            timeout=timeout,
            trust_env=False,
        )

    # --- tiers ------------------------------------------------------------------------------

    def trusting(self, pid: int | None = None) -> contextlib.AbstractContextManager[None]:
        """Trust ``pid`` (default: this process) as if launched, inside a ``with`` block."""
        return self.registry.trusting(os.getpid() if pid is None else pid)

    # --- jobs -------------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """Every loaded job, sorted by id."""
        with self._jobs_lock:
            return [self._jobs[k] for k in sorted(self._jobs)]

    def job(self, job_id: str) -> Job | None:
        """The job with that id, or None."""
        with self._jobs_lock:
            return self._jobs.get(job_id)

    def case_clash(self, job_id: str) -> str | None:
        """A loaded job whose id differs from ``job_id`` only in letter case, or None.

        Windows and macOS file systems hold both as one ``Jobs/<id>.json``.
        """
        folded = job_id.lower()
        with self._jobs_lock:
            return next((k for k in self._jobs if k != job_id and k.lower() == folded), None)

    def validate(self, data: Any) -> ValidationReport:
        """Validate job JSON as ``POST /api/Jobs/validate`` does (binary must exist)."""
        from keeper_task.jobs import validate_job

        return validate_job(data, agent_root=self.agent_root)

    def save_job(self, data: Any) -> bool:
        """Write a valid job's JSON to ``Jobs/<id>.json`` and load it; True when new."""
        from keeper_task.jobs import job_from_data

        job = job_from_data(data, source="request body")
        if job.id is None:
            raise JobDefinitionError("the job has no id")
        path = self.jobs_dir / f"{job.id}.json"
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with self._jobs_lock:
            created = job.id not in self._jobs
            self._jobs[job.id] = job
        return created

    def add_job(self, job: Job | Mapping[str, Any] | str | os.PathLike[str]) -> Job:
        """Add a job (object, JSON mapping or file) without checking its binary; return it.

        The job is written to ``Jobs/<id>.json`` like ``POST /api/Jobs`` would.

        Raises:
            JobDefinitionError: The file cannot be read or the job breaks the agent's rules.
        """
        from keeper_task.jobs import Job as JobModel
        from keeper_task.jobs import job_from_data, load_job, validate_job

        if isinstance(job, JobModel):
            loaded = job
        elif isinstance(job, Mapping):
            loaded = job_from_data(dict(job), source="job")
        else:
            loaded = load_job(job)
        report = validate_job(loaded)
        if not report.valid:
            more = f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
            raise JobDefinitionError(f"invalid job {loaded.id!r}: {report.errors[0]}{more}")
        self.save_job(loaded.to_json_dict())
        return loaded

    def delete_job(self, job_id: str) -> bool:
        """Remove a job and its file; False when unknown."""
        with self._jobs_lock:
            if self._jobs.pop(job_id, None) is None:
                return False
        with contextlib.suppress(FileNotFoundError):
            (self.jobs_dir / f"{job_id}.json").unlink()
        return True

    def reload_jobs(self) -> list[str]:
        """Re-read ``Jobs/*.json``; return one line per file skipped (also as notices)."""
        from keeper_task.jobs import load_job, validate_job

        loaded: dict[str, Job] = {}
        problems: list[str] = []
        directory = self.jobs_dir
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                job = load_job(path)
            except JobDefinitionError as exc:
                problems.append(str(exc))
                continue
            report = validate_job(job, file_name=path.name)
            if not report.valid or job.id is None:
                problems.append(f"{path}: {'; '.join(report.errors) or 'no id'}")
                continue
            clash = next((k for k in loaded if k.lower() == job.id.lower()), None)
            if clash is not None:
                problems.append(
                    f"{path}: id {job.id!r} differs only in letter case from {clash!r}; "
                    "Windows and macOS file systems hold them as one file"
                )
                continue
            loaded[job.id] = job
        with self._jobs_lock:
            self._jobs = loaded
        for problem in problems:
            self.recorder.add(Notice(f"job file skipped: {problem}"))
        return problems

    # --- runs -------------------------------------------------------------------------------

    def start_run(
        self,
        job_id: str,
        *,
        trigger: str = "run",
        context: Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
        fallback_script: str | os.PathLike[str] | None = None,
        agent_root: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> JobRun:
        """Start a run of ``job_id`` and return at once (``run.done`` is set when it ends).

        Args:
            job_id: A loaded job.
            trigger: ``"run"``, ``"trigger"`` or ``"dev"`` (recorded).
            context: Event context of a trigger (recorded on the run only).
            command: Replaces each task's executable (``--task``); arguments are appended.
            fallback_script: A ``task.py`` run with this Python when no binary is found.
            agent_root: Overrides the agent root for binary resolution.
            timeout: Overrides every task's ``timeoutSeconds``.
            env: Extra environment variables for this run's tasks.

        Raises:
            EmulatorError: Unknown job or emulator not running.
        """
        from keeper_task.jobs import host_os

        job = self.job(job_id)
        if job is None:
            raise EmulatorError(f"unknown job {job_id!r}")
        loop = self._loop
        if loop is None or self._launcher is None:
            raise EmulatorError("the emulator is not running; call start() first")
        run = JobRun(new_run_id(), job_id, trigger, dict(context) if context is not None else None)
        self.runs.append(run)
        if job.os_filter is not None and not job.os_filter.allows(host_os()):
            run.status = "skipped"
            run.note = f"osFilter excludes {host_os()}"
            run.ended = time.time()
            run.done.set()
            self.recorder.emit(run)
            return run
        self.recorder.emit(run)
        launcher = self._launcher
        root = Path(agent_root) if agent_root is not None else self.agent_root
        script = Path(fallback_script) if fallback_script is not None else None

        async def execute() -> None:
            try:
                await launcher.run_job(
                    job,
                    run,
                    agent_root=root,
                    override=command,
                    fallback_script=script,
                    timeout=timeout,
                    env=env,
                )
                if self._broker is not None:
                    await self._broker.drain(2.0)
            finally:
                run.done.set()
                self.recorder.emit(run)

        def schedule() -> None:
            task = loop.create_task(execute())
            self._run_tasks.add(task)
            task.add_done_callback(self._run_tasks.discard)

        if _in_loop(loop):
            schedule()
        else:
            loop.call_soon_threadsafe(schedule)
        return run

    def run_job(self, job_id: str, *, wait: float | None = None, **kwargs: Any) -> JobRun:
        """Run ``job_id`` and wait for it to end (see :meth:`start_run` for the options).

        Raises:
            EmulatorError: The run did not end within ``wait`` seconds.
        """
        run = self.start_run(job_id, **kwargs)
        if not run.done.wait(wait):
            raise EmulatorError(f"job {job_id!r} did not finish within {wait} s")
        return run

    # --- scheduler (Startup event, intervalMinutes, cronExpression) ---------------------------

    def _start_scheduler(self) -> None:
        """In the loop, at start: the Startup runs, then the ticker (when asked for)."""
        self._schedule_clock = self._schedule_start or datetime.now()
        self._schedule_minute = 0
        if self.startup_events:
            for job in self.jobs():
                if any(name.lower() == STARTUP_EVENT.lower() for name in job.event_names):
                    self._scheduled_run(job, "startup")
        if self.schedules:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(60.0 / self.time_scale)
            self._tick(1)

    def advance_schedule(self, minutes: int = 1) -> list[JobRun]:
        """Let ``minutes`` scheduler ticks pass at once; return the runs they started.

        The "run schedules now" switch: tests and ``dev agent`` use it to fire interval and
        cron schedules without waiting (the ticker, if running, keeps its own pace).

        Raises:
            EmulatorError: ``minutes`` is not 1 to 525600, or the emulator is not running.
        """
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= 525600:
            raise EmulatorError("advance_schedule: minutes must be an integer from 1 to 525600")

        async def advance() -> list[JobRun]:
            return self._tick(minutes)

        return self._call(advance(), timeout=60)

    @property
    def schedule_minute(self) -> int:
        """How many scheduler ticks have passed since the start."""
        return self._schedule_minute

    def _tick(self, minutes: int) -> list[JobRun]:
        started: list[JobRun] = []
        for _ in range(minutes):
            self._schedule_minute += 1
            now = self._schedule_clock + timedelta(minutes=self._schedule_minute)
            for job in self.jobs():
                if job.schedule is not None and self._due(job, now):
                    run = self._scheduled_run(job, "schedule")
                    if run is not None:
                        started.append(run)
        return started

    def _due(self, job: Job, now: datetime) -> bool:
        schedule = job.schedule
        assert schedule is not None
        if schedule.interval_minutes is not None:
            interval = schedule.interval_minutes
            return interval > 0 and self._schedule_minute % interval == 0
        if schedule.cron_expression is not None:
            try:
                return CronExpression(schedule.cron_expression).matches(now)
            except CronError as exc:
                if self._schedule_minute == 1:
                    self.recorder.add(Notice(f"job {job.id!r}: schedule never fires: {exc}"))
                return False
        if self._schedule_minute == 1:
            self.recorder.add(
                Notice(
                    f"job {job.id!r}: runAt/calendar schedules are not emulated (their "
                    "formats are undocumented); trigger the job instead"
                )
            )
        return False

    def _scheduled_run(self, job: Job, trigger: str) -> JobRun | None:
        if job.enabled is False or job.id is None:
            return None  # documented: a disabled job never runs
        busy = any(r.job_id == job.id and not r.done.is_set() for r in self.runs)
        if busy:
            self.recorder.add(
                Notice(f"job {job.id!r}: {trigger} run skipped, the previous run still runs")
            )
            return None
        return self.start_run(job.id, trigger=trigger)

    # --- broker -----------------------------------------------------------------------------

    def stop_broker(self) -> None:
        """Stop the broker (connected tasks are disconnected): the "broker down" fault."""
        if self._broker is not None:
            self._call(self._broker.stop(), timeout=30)

    def start_broker(self) -> None:
        """Start the broker again on the same address."""
        if self._broker is not None:
            self._call(self._broker.start(), timeout=30)

    def restart_broker(self) -> None:
        """Stop and start the broker (clients must reconnect)."""
        self.stop_broker()
        self.start_broker()

    async def _arestart_broker(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
            await self._broker.start()
            self.recorder.add(Notice("broker restarted (scripted fault)"))
            self.recorder.notify()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until publishes already acknowledged by the broker are recorded."""
        if self._broker is not None and self._loop is not None:
            self._call(self._broker.drain(timeout), timeout=timeout + 5)

    def publish(self, topic: str, payload: bytes | str | Mapping[str, Any], qos: int = 0) -> None:
        """Publish on the broker as the agent itself (no permission check)."""
        if isinstance(payload, Mapping):
            data = json.dumps(payload).encode()
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = payload
        if self._broker is None:
            raise EmulatorError("the emulator is not running")
        self._call(self._broker.publish(topic, data, qos), timeout=30)

    def _on_record(self, record: object) -> None:
        if (
            isinstance(record, BrokerMessage)
            and self._loop is not None
            and self.faults.count_message()
        ):
            self.recorder.add(
                Notice("broker restarting after an accepted publish (scripted fault)")
            )
            asyncio.run_coroutine_threadsafe(self._arestart_broker(), self._loop)

    # --- records ----------------------------------------------------------------------------

    @property
    def messages(self) -> list[BrokerMessage]:
        """Every publish the broker accepted."""
        return list(self.recorder.messages)

    def logs(self) -> list[dict[str, Any]]:
        """Every ``KeeperLogger`` payload (parsed JSON objects), in order."""
        return self.recorder.logs()

    @property
    def denied(self) -> list[DeniedOperation]:
        """Every refused connection, publish and subscription."""
        return list(self.recorder.denied)

    @property
    def requests(self) -> list[RequestRecord]:
        """Every API request."""
        return list(self.recorder.requests)

    @property
    def output(self) -> list[OutputLine]:
        """Every line tasks wrote."""
        return list(self.recorder.output)

    @property
    def notices(self) -> list[Notice]:
        """Every notice the emulator raised."""
        return list(self.recorder.notices)

    def on_event(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback`` for every record and run start/end; returns a remover."""
        return self.recorder.add_listener(callback)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate()`` holds (re-checked on every record) or timeout."""
        return self.recorder.wait_for(predicate, timeout)

    @contextlib.contextmanager
    def listening(self, callback: Callable[[Any], None]) -> Iterator[None]:
        """Call ``callback`` for every event inside the ``with`` block."""
        remove = self.on_event(callback)
        try:
            yield
        finally:
            remove()


def _listen_error(exc: OSError, port: int, http_port: int | None) -> EmulatorError:
    ports = f"{port}" if http_port is None else f"{port} (HTTPS) or {http_port} (HTTP)"
    if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
        return EmulatorError(
            f"port {ports} on 127.0.0.1 is already in use; stop what listens "
            "there or pick another port with --port (omit it for a free port)"
        )
    return EmulatorError(f"cannot listen on 127.0.0.1:{ports}: {exc.strerror or exc}")


async def _start_http_redirect(emulator: Emulator, port: int) -> web.AppRunner:
    """Serve the agent's HTTP port: every request is redirected to HTTPS (307), as ASP.NET's
    HTTPS redirection does; nothing is answered over plain HTTP."""
    from aiohttp import web

    async def redirect(request: web.Request) -> web.StreamResponse:
        location = f"{emulator.base_url}{request.rel_url}"
        emulator.recorder.add(
            RequestRecord(request.method, request.path, 307, "Public", "anonymous")
        )
        return web.json_response(
            {
                "error": "UseHttps",
                "message": f"the HTTP port only redirects; call {location}",
            },
            status=307,
            headers={"Location": location},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    emulator.http_port = int(runner.addresses[0][1])
    return runner


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Ignore a client that vanished mid-connection (a refused or killed task); report the rest."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, ssl.SSLError, asyncio.CancelledError)):
        return
    loop.default_exception_handler(context)


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
