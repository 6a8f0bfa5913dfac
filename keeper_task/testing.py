"""pytest plugin and helpers to test job tasks against the local agent emulator.

Installed with keeper-task (entry point ``pytest11``), so the fixtures below exist in every
pytest session; nothing heavy is imported until a fixture or function is used.

Fixtures (prefixed ``keeper_`` so they never shadow or collide with a project's own):
    ``keeper_agent``: a running :class:`~keeper_task.emulator.Emulator` (HTTPS API + embedded MQTT
        broker enforcing the agent's rules, temporary state), one per test.
    ``keeper_agent_session``: the same, shared by the whole session (faster; records accumulate, a
        :class:`TaskResult` only holds what its own run produced).

Functions and classes:
    :func:`run_task` ``(agent, task, *, job=None, args=(), env=None, timeout=60)``: run a task
        once as the agent would and return a :class:`TaskResult`. ``task`` is either

        * a :class:`~keeper_task.Task` subclass: run **in-process** with ``Task.execute``;
          this test process is trusted explicitly (``agent.trusting()``) for the duration;
        * a ``.py`` file: run as a subprocess with the current Python;
        * a command (a sequence of strings, or the path of a built binary): run as a
          subprocess, with the job's arguments appended (``{KeeperApiBaseUrl}`` substituted).

        ``job`` is a job JSON file, a mapping or a :class:`~keeper_task.jobs.Job`; by default
        :func:`default_job` (id ``test-task``, publishes to ``KeeperLogger`` and its event
        topic).
    :class:`TaskResult`: ``exit_code``, ``logs`` (KeeperLogger payloads, parsed),
        ``messages`` (the log messages' ``message`` fields), ``publishes`` (other topics),
        ``denied`` (refused connections/publishes/subscriptions), ``stdout``, ``stderr``,
        ``requests`` (the API requests the run made), ``notices``, ``run`` (the
        :class:`~keeper_task.emulator.JobRun` of a subprocess run).
    :func:`default_job` ``(job_id="test-task", **overrides)``: a valid job JSON mapping.

Scripted faults (on the emulator, before or during a run):
    * ``agent.faults.forbid(requests=N)`` / ``forbid(seconds=S)``: 403 (startup window);
    * ``agent.faults.fail(503, requests=N)``: 5xx;
    * ``agent.faults.malformed_settings()``: truncated JSON from Plugin Settings (the
      runtime exits 69); ``malformed_settings(body={"broker.port": "x"})``: settings that
      parse but are invalid (exits 78);
    * ``agent.stop_broker()`` / ``agent.start_broker()``: broker down;
    * ``agent.faults.restart_broker_after(messages=N)``: broker restart mid-run;
    * ``Emulator(register_delay=S)``: launched tasks get 403 for S seconds.

Example::

    from keeper_task.testing import run_task
    from my_task import Hello

    def test_hello(keeper_agent):
        result = run_task(keeper_agent, Hello)
        assert result.exit_code == 0
        assert "hello" in result.messages
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from keeper_task.emulator import (
        BrokerMessage,
        DeniedOperation,
        Emulator,
        JobRun,
        Notice,
        RequestRecord,
    )
    from keeper_task.jobs import Job

__all__ = ["TaskResult", "default_job", "keeper_agent", "keeper_agent_session", "run_task"]

_AGENT_ENV = ("KEEPER_JOB_ID", "KEEPER_JOB_NAME", "KEEPER_API_BASE")


def _emulator_class() -> type[Emulator]:
    """The Emulator class, or an ImportError that says which extra to install."""
    try:
        from keeper_task.emulator import Emulator
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("keeper_task"):
            raise
        raise ImportError(
            f"keeper_task.testing needs the [emulator] extra (module {exc.name!r} is missing): "
            "pip install 'keeper-task[emulator]'"
        ) from exc
    return Emulator


@pytest.fixture
def keeper_agent() -> Iterator[Emulator]:
    """A running emulator (embedded broker, temporary state) for one test."""
    with _emulator_class()() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def keeper_agent_session() -> Iterator[Emulator]:
    """A running emulator shared by the whole test session."""
    with _emulator_class()() as emulator:
        yield emulator


def default_job(job_id: str = "test-task", **overrides: Any) -> dict[str, Any]:
    """A valid job for ``run_task``: one task, ``KeeperLogger`` and the event topic allowed.

    Keyword arguments replace root keys (``mqttTopics=...``, ``enabled=False``...).
    """
    data: dict[str, Any] = {
        "id": job_id,
        "name": job_id.replace("-", " ").capitalize(),
        "enabled": True,
        "events": [{"eventType": "Startup"}],
        "mqttTopics": {
            "allowedPublications": ["KeeperLogger", f"Jobs/{job_id}/events"],
            "allowedSubscriptions": [],
        },
        "tasks": [
            {
                "id": "main",
                "name": "Main",
                "command": job_id,
                "arguments": "--keeper-api-base={KeeperApiBaseUrl}",
                "timeoutSeconds": 60,
                "continueOnFailure": False,
            }
        ],
    }
    data.update(overrides)
    return data


@dataclass
class TaskResult:
    """What one task run did (only records produced during that run)."""

    exit_code: int
    logs: list[dict[str, Any]] = field(default_factory=list)
    publishes: list[BrokerMessage] = field(default_factory=list)
    denied: list[DeniedOperation] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    requests: list[RequestRecord] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    run: JobRun | None = None

    @property
    def messages(self) -> list[str]:
        """The ``message`` field of every KeeperLogger payload, in order."""
        return [str(log.get("message", "")) for log in self.logs]

    def log(self, message: str) -> dict[str, Any]:
        """The first KeeperLogger payload whose ``message`` is ``message``.

        Raises:
            AssertionError: None has it (lists what was logged).
        """
        for entry in self.logs:
            if entry.get("message") == message:
                return entry
        raise AssertionError(f"no KeeperLogger message {message!r}; got {self.messages}")


def _load_job(job: Job | Mapping[str, Any] | str | os.PathLike[str] | None) -> Job:
    from keeper_task.jobs import Job as JobModel
    from keeper_task.jobs import job_from_data, load_job

    if job is None:
        return job_from_data(default_job(), source="default_job()")
    if isinstance(job, JobModel):
        return job
    if isinstance(job, Mapping):
        return job_from_data(dict(job), source="job")
    return load_job(job)


def _is_task_class(task: Any) -> bool:
    return isinstance(task, type) and callable(getattr(task, "execute", None))


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_task(
    agent: Emulator,
    task: Any,
    *,
    job: Job | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> TaskResult:
    """Run ``task`` once under ``agent`` as the agent's job runner would.

    Args:
        agent: A running emulator (the ``keeper_agent`` or ``keeper_agent_session`` fixture).
        task: A Task subclass (in-process), a ``.py`` file, a command sequence or a binary.
        job: The job to run it as (default :func:`default_job`); only its first task is
            used in-process, every task for a subprocess.
        args: Extra arguments, placed before the job's arguments.
        env: Extra environment variables for the task.
        timeout: Seconds to wait for a subprocess run (its job's ``timeoutSeconds`` still
            applies); an in-process run is bounded by the task's own settings.

    Returns:
        The :class:`TaskResult` of this run only.
    """
    from keeper_task.emulator import KEEPER_LOGGER_TOPIC

    loaded = _load_job(job)
    if loaded.id is None:
        raise ValueError("the job has no id")
    agent.add_job(loaded)
    recorder = agent.recorder
    marks = (
        len(recorder.messages),
        len(recorder.denied),
        len(recorder.requests),
        len(recorder.notices),
    )
    run: JobRun | None = None
    if _is_task_class(task):
        exit_code, stdout, stderr = _run_in_process(agent, task, loaded, args, env)
    else:
        if isinstance(task, (str, os.PathLike)):
            path = Path(task)
            command = [sys.executable, str(path)] if path.suffix == ".py" else [str(path)]
        else:
            command = [str(part) for part in task]
        command.extend(args)
        run = agent.run_job(loaded.id, trigger="run", command=command, env=env, wait=timeout + 30)
        exit_code = run.exit_code
        stdout = "".join(t.stdout for t in run.tasks)
        stderr = "".join(t.stderr for t in run.tasks)
    messages = recorder.messages[marks[0] :]
    logs: list[dict[str, Any]] = []
    for message in messages:
        if message.topic != KEEPER_LOGGER_TOPIC:
            continue
        try:
            body = message.json()
        except ValueError:
            continue
        if isinstance(body, dict):
            logs.append(body)
    return TaskResult(
        exit_code=exit_code,
        logs=logs,
        publishes=[m for m in messages if m.topic != KEEPER_LOGGER_TOPIC],
        denied=recorder.denied[marks[1] :],
        stdout=stdout,
        stderr=stderr,
        requests=recorder.requests[marks[2] :],
        notices=recorder.notices[marks[3] :],
        run=run,
    )


def _run_in_process(
    agent: Emulator,
    task_cls: Any,
    job: Job,
    args: Sequence[str],
    env: Mapping[str, str] | None,
) -> tuple[int, str, str]:
    """Run a Task class in this process, trusted explicitly, with the agent's environment."""
    from keeper_task.emulator.launcher import build_argv

    first = job.tasks[0] if job.tasks else None
    argv, _unknown = build_argv([], first.arguments if first else None, agent.base_url)
    argv = [*args, *argv]
    declared = job.mqtt_topics is not None and job.mqtt_topics.declared
    values: dict[str, str | None] = dict.fromkeys(_AGENT_ENV)
    if declared:
        values["KEEPER_JOB_ID"] = job.id
        values["KEEPER_JOB_NAME"] = job.name or ""
    values.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    import structlog

    # The run configures structlog to write to `err`; the caller's configuration comes back
    # afterwards (a later structlog.get_logger() must not log into this dead StringIO).
    was_configured = structlog.is_configured()
    saved_config = structlog.get_config()
    try:
        with (
            agent.trusting(os.getpid()),
            _environment(values),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                exit_code = int(task_cls.execute(argv))
            except SystemExit as exc:  # --help and friends
                exit_code = exc.code if isinstance(exc.code, int) else 1
    finally:
        if was_configured:
            structlog.configure(**saved_config)
        else:
            structlog.reset_defaults()
    agent.drain()
    return exit_code, out.getvalue(), err.getvalue()
