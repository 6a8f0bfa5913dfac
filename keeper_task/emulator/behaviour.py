"""The emulator's model of the agent behaviour the agent's documentation leaves open.

Each field is one undocumented behaviour, with the emulator's historical behaviour as the
default. ``keeper-task doctor probe`` measures the real values on an endpoint; an emulator
built with :meth:`AgentBehaviour.from_probe_report` (``dev agent --like REPORT.json``,
``Emulator.from_probe_report(...)``) then behaves like that endpoint's agent.

Behaviours:

* ``client_id_format``: the MQTT client id the broker accepts. ``None`` (default): any id
  whose first ``_``-separated segment is a known job id. A template (fields ``{job_id}``,
  ``{job_name}``, ``{pid}``): the id must be exactly that, for the connecting process's PID.
* ``register_delay``: seconds between a task's launch and its trust (the startup 403 window).
* ``context_via``: how a trigger's event context reaches the task: ``none`` (default: not
  passed), ``args`` (the context JSON as one extra argument after the job's arguments),
  ``env`` (the JSON in the environment variable ``context_env_var``), ``stdin`` (the JSON on
  standard input, then end of file) or ``file`` (the JSON in a temporary file whose path is
  in ``context_env_var``, removed when the task ends).
* ``signal_before_kill`` and ``kill_grace``: on ``timeoutSeconds``, a terminate signal
  (SIGTERM; CTRL_BREAK on Windows) first and the kill ``kill_grace`` seconds later, or the
  kill at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keeper_task.emulator.errors import EmulatorError

__all__ = [
    "CONTEXT_MODES",
    "DEFAULT_CONTEXT_ENV",
    "AgentBehaviour",
    "ContextDelivery",
    "write_appsettings",
]

#: How trigger context can reach a task.
CONTEXT_MODES = ("none", "args", "env", "stdin", "file")
#: The variable the emulator uses for ``env``/``file`` context (the agent's is undocumented).
DEFAULT_CONTEXT_ENV = "KEEPER_JOB_CONTEXT"

_FIELDS = ("job_id", "job_name", "pid")
_NAME_OK = re.compile(r"[^A-Za-z0-9-]")


@dataclass
class ContextDelivery:
    """What the launcher adds to one task start to pass the trigger context."""

    args: list[str]
    env: dict[str, str]
    stdin: bytes | None = None
    temp_file: Path | None = None

    def cleanup(self) -> None:
        """Remove the temporary context file, if any."""
        if self.temp_file is not None:
            with contextlib.suppress(OSError):
                self.temp_file.unlink()


@dataclass(frozen=True)
class AgentBehaviour:
    """One set of agent behaviours (see the module docstring)."""

    client_id_format: str | None = None
    register_delay: float = 0.0
    context_via: str = "none"
    context_env_var: str = DEFAULT_CONTEXT_ENV
    signal_before_kill: bool = True
    kill_grace: float = 2.0

    def __post_init__(self) -> None:
        if self.context_via not in CONTEXT_MODES:
            raise EmulatorError(
                f"context delivery {self.context_via!r} is not one of {', '.join(CONTEXT_MODES)}"
            )
        if self.register_delay < 0 or self.kill_grace < 0:
            raise EmulatorError("register_delay and kill_grace must be >= 0 seconds")
        if not self.context_env_var or "=" in self.context_env_var:
            raise EmulatorError(f"invalid context variable name {self.context_env_var!r}")
        if self.client_id_format is not None:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.client_id_format) if f]
            except ValueError as exc:
                raise EmulatorError(f"client id format {self.client_id_format!r}: {exc}") from exc
            unknown = [n for n in names if n not in _FIELDS]
            if unknown or "job_id" not in names:
                raise EmulatorError(
                    f"client id format {self.client_id_format!r}: needs {{job_id}} and only "
                    "the fields {job_id}, {job_name}, {pid}"
                )

    # --- broker -----------------------------------------------------------------------------

    def client_id_problem(
        self, client_id: str, job_id: str, job_name: str | None, pid: int | None
    ) -> str | None:
        """Why the broker refuses ``client_id`` for that job, or None when it accepts it."""
        if self.client_id_format is None:
            return None
        name = _NAME_OK.sub("-", job_name or "") or "task"
        pattern = re.escape(self.client_id_format)
        for field_name, value in (("job_id", job_id), ("job_name", name)):
            pattern = pattern.replace(re.escape("{" + field_name + "}"), re.escape(value))
        pid_text = re.escape(str(pid)) if pid is not None else r"\d+"
        pattern = pattern.replace(re.escape("{pid}"), pid_text)
        if re.fullmatch(pattern, client_id):
            return None
        return (
            f"client id {client_id!r} does not have the form {self.client_id_format!r} this "
            "broker enforces"
        )

    # --- context ----------------------------------------------------------------------------

    def deliver_context(self, context: Mapping[str, Any] | None) -> ContextDelivery:
        """The arguments, environment and stdin that carry ``context`` to a task."""
        if context is None or self.context_via == "none":
            return ContextDelivery([], {})
        text = json.dumps(dict(context), separators=(",", ":"))
        if self.context_via == "args":
            return ContextDelivery([text], {})
        if self.context_via == "env":
            return ContextDelivery([], {self.context_env_var: text})
        if self.context_via == "stdin":
            return ContextDelivery([], {}, stdin=text.encode() + b"\n")
        fd, name = tempfile.mkstemp(prefix="keeper-context-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        return ContextDelivery([], {self.context_env_var: name}, temp_file=Path(name))

    # --- probe reports ----------------------------------------------------------------------

    @classmethod
    def from_probe_report(
        cls, report: Mapping[str, Any] | str | os.PathLike[str]
    ) -> AgentBehaviour:
        """The behaviour a ``keeper-task doctor probe`` report measured.

        Args:
            report: The report (parsed JSON) or the path of its file.

        Raises:
            EmulatorError: The file cannot be read or is not a probe report.
        """
        data = _load_probe_report(report)
        kwargs: dict[str, Any] = {
            **_client_id_settings(data.get("mqtt") or {}),
            **_trust_settings(data.get("trust") or {}),
            **_context_settings(data.get("context") or {}),
            **_timeout_settings(data.get("timeout") or {}),
        }
        return cls(**kwargs)


def _load_probe_report(report: Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
    """The report itself, read from its file when given a path.

    Raises:
        EmulatorError: The file cannot be read or is not a probe report.
    """
    if not isinstance(report, Mapping):
        path = Path(report)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EmulatorError(f"cannot read probe report {path}: {exc}") from exc
        if not isinstance(data, Mapping):
            raise EmulatorError(f"{path} is not a probe report (expected a JSON object)")
        report = data
    if report.get("kind") != "keeper-task-probe-report":
        raise EmulatorError(
            'not a probe report (no "kind": "keeper-task-probe-report"); '
            "make one with `keeper-task doctor probe --output REPORT.json`"
        )
    return report


def _client_id_settings(mqtt: Mapping[str, Any]) -> dict[str, Any]:
    """``client_id_format`` when the broker refused some client-id formats but not all."""
    candidates = mqtt.get("clientIds") or []
    accepted = [c.get("template") for c in candidates if c.get("accepted")]
    if candidates and accepted and len(accepted) < len(candidates):
        return {"client_id_format": accepted[0]}
    return {}


def _trust_settings(trust: Mapping[str, Any]) -> dict[str, Any]:
    """``register_delay`` when Plugin Settings refused the task for a while after start."""
    window = trust.get("windowSeconds")
    if isinstance(window, (int, float)) and trust.get("forbidden", 0) > 0:
        return {"register_delay": round(float(window), 1)}
    return {}


def _context_settings(context: Mapping[str, Any]) -> dict[str, Any]:
    """``context_via`` (and its variable) from the first place the trigger context arrived."""
    found = context.get("found") or []
    if not found:
        return {}
    first = found[0]
    settings: dict[str, Any] = {"context_via": first.get("via", "none")}
    where = str(first.get("name") or "")
    if where.startswith("env:"):
        settings["context_env_var"] = where[4:]
    elif first.get("via") == "env" and where:
        settings["context_env_var"] = where
    return settings


def _timeout_settings(timeout: Mapping[str, Any]) -> dict[str, Any]:
    """``signal_before_kill`` and ``kill_grace`` when the probe measured a timeout."""
    if not timeout.get("measured"):
        return {}
    if not timeout.get("signal"):
        return {"signal_before_kill": False}
    settings: dict[str, Any] = {"signal_before_kill": True}
    grace = timeout.get("secondsBeforeKill")
    if isinstance(grace, (int, float)):
        settings["kill_grace"] = round(float(grace), 1)
    return settings


def write_appsettings(
    root: Path,
    *,
    https_port: int,
    http_port: int | None,
    broker_host: str,
    broker_port: int,
) -> Path:
    """Write the emulated agent's ``appsettings.json`` into its root (what ``doctor`` reads).

    ``Settings:KestrelHttpsPort``/``KestrelHttpPort`` are the agent's documented keys (the
    HTTP one only when the emulator serves that port); the broker's port key is undocumented,
    so ``MqttBrokerSettings:Port`` is an emulator convention that ``doctor`` reads.
    """
    path = root / "appsettings.json"
    settings: dict[str, int] = {"KestrelHttpsPort": https_port}
    if http_port is not None:
        settings["KestrelHttpPort"] = http_port
    data = {
        "Settings": settings,
        "MqttBrokerSettings": {"IpAddress": broker_host, "Port": broker_port},
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
