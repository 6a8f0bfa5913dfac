"""The probe job: deploy it, trigger it, read its report, recommend settings, apply them.

Tooling (``keeper-task doctor probe``). The probe itself is :mod:`keeper_task.probe.task`,
started by the agent as ``<this Python> -m keeper_task.probe`` through the job's
``executablePath`` (so it needs no build step; the agent's service account must be able to
run this Python). Two jobs are deployed through the Admin API:

* ``keeper-task-probe`` measures everything but the timeout and writes ``main.json``;
* ``keeper-task-probe-timeout`` (``timeoutSeconds`` 5) runs past its timeout on purpose and
  logs heartbeats and signals to ``timeout.jsonl``, so the stop can be observed.

Reports land in the report directory, by default ``<agent root>/keeper-task-probe/``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from keeper_task.errors import KeeperTaskError

__all__ = [
    "DEFAULT_TEMPLATE",
    "MAIN_JOB_ID",
    "REPORT_DIR_NAME",
    "TIMEOUT_JOB_ID",
    "ProbeError",
    "analyse_timeout",
    "apply_recommendations",
    "new_marker",
    "probe_jobs",
    "recommend",
    "run_probe",
]

MAIN_JOB_ID = "keeper-task-probe"
TIMEOUT_JOB_ID = "keeper-task-probe-timeout"
#: Default report directory under the agent root.
REPORT_DIR_NAME = "keeper-task-probe"
#: keeper-task's default client-id template (preferred when the broker accepts it).
DEFAULT_TEMPLATE = "{job_id}_{job_name}"
DEFAULT_TRUST_TIMEOUT = 30.0


class ProbeError(KeeperTaskError):
    """The probe could not be deployed, or its report did not arrive."""

    exit_code = 69


def new_marker() -> str:
    """A fresh trigger marker (``ktp-`` and 16 hex digits)."""
    return f"ktp-{secrets.token_hex(8)}"


def probe_jobs(
    report_dir: Path, python: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two probe jobs, with the Python and the report directory filled in."""
    python = python or sys.executable
    jobs = []
    for name in ("job.json", "timeout-job.json"):
        data = json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))
        for task in data["tasks"]:
            task["executablePath"] = python
            task["arguments"] = task["arguments"].replace("{report_dir}", _quote(str(report_dir)))
        jobs.append(data)
    return jobs[0], jobs[1]


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r"\s", text) else text


def analyse_timeout(lines: list[dict[str, Any]], timeout_seconds: float) -> dict[str, Any]:
    """Read ``timeout.jsonl``: was there a signal before the kill, and how long before.

    The kill time is the last heartbeat (they are 0.1 s apart, so the figure is a lower
    bound accurate to 0.1 s).
    """
    alive = [e["t"] for e in lines if e.get("event") in ("alive", "start", "signal")]
    signals = [e for e in lines if e.get("event") == "signal"]
    exited = [e for e in lines if e.get("event") == "exit"]
    result: dict[str, Any] = {
        "measured": bool(alive) and not exited,
        "timeoutSeconds": timeout_seconds,
        "signal": signals[0]["name"] if signals else None,
        "signalAtSeconds": signals[0]["t"] if signals else None,
        "secondsBeforeKill": None,
        "lastSignOfLifeSeconds": max(alive) if alive else None,
    }
    if exited:
        result["note"] = exited[-1].get("reason")
    if signals and alive:
        result["secondsBeforeKill"] = round(max(alive) - signals[0]["t"], 1)
    return result


def recommend(report: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that fit the measured agent (see the README's "First deployment")."""
    rec: dict[str, Any] = {}
    mqtt = report.get("mqtt") or {}
    good = [
        c["template"] for c in mqtt.get("clientIds", []) if c.get("accepted") and c.get("logAcked")
    ]
    if good:
        rec["mqttClientIdTemplate"] = DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in good else good[0]
    else:
        rec["mqttClientIdTemplate"] = None
    trust = report.get("trust") or {}
    window = trust.get("windowSeconds")
    if isinstance(window, (int, float)):
        # Four times the measured window, never below the default budget. Without a single
        # 403 the window was shorter than the probe's own start-up: the default is enough.
        refused = trust.get("forbidden", 0) > 0
        measured = float(math.ceil(window * 4)) if refused else 0.0
        rec["trustTimeout"] = max(DEFAULT_TRUST_TIMEOUT, measured)
    timeout = report.get("timeout") or {}
    if timeout.get("measured"):
        grace = timeout.get("secondsBeforeKill")
        if timeout.get("signal") and isinstance(grace, (int, float)) and grace >= 2:
            rec["deadlineMarginSeconds"] = 5
        else:
            # No signal (or too short a grace to clean up in): finish well before the kill.
            rec["deadlineMarginSeconds"] = 10
    found = (report.get("context") or {}).get("found") or []
    rec["triggerContext"] = found[0] if found else None
    literal = (report.get("process") or {}).get("literalTemplateArgument")
    rec["bracesSurviveInArguments"] = literal == "{job_id}"
    return rec


def run_probe(
    jobs: Any,
    *,
    report_dir: Path,
    keep: bool = False,
    wait: float = 180.0,
    python: str | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Deploy the probe jobs, trigger them, collect and return the combined report.

    Args:
        jobs: A :class:`~keeper_task.agent.jobs.JobsClient` (Admin tier).
        report_dir: Where the probe writes (must be readable from here).
        keep: Leave the probe jobs deployed.
        wait: Seconds to wait for each report.
        python: The interpreter the agent starts (default: this one).
        progress: Called with one line per step.

    Raises:
        ProbeError: A report did not arrive in time.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    main_file, timeout_file = report_dir / "main.json", report_dir / "timeout.jsonl"
    for old in (main_file, timeout_file):
        old.unlink(missing_ok=True)
    main_job, timeout_job = probe_jobs(report_dir, python)
    marker = new_marker()
    context = {"keeperTaskProbe": marker}
    try:
        for job in (main_job, timeout_job):
            verdict = jobs.validate(job)
            if not verdict.valid:
                raise ProbeError(
                    f"the agent refused probe job {job['id']!r}: {'; '.join(verdict.errors)}"
                )
            jobs.create(job)
            progress(f"deployed job {job['id']}")
        jobs.trigger(MAIN_JOB_ID, context)
        progress(f"triggered {MAIN_JOB_ID} with context marker {marker}")
        if not _wait_until(main_file.is_file, wait):
            raise ProbeError(
                f"no probe report at {main_file} within {wait:g} s; check the agent's log for "
                f"job {MAIN_JOB_ID!r} (can its service account run {python or sys.executable}?)"
            )
        report: dict[str, Any] = json.loads(main_file.read_text(encoding="utf-8"))
        report["context"]["sent"] = marker
        report["context"]["matched"] = report["context"].get("marker") == marker
        jobs.trigger(TIMEOUT_JOB_ID, context)
        limit = float(timeout_job["tasks"][0]["timeoutSeconds"])
        progress(f"triggered {TIMEOUT_JOB_ID} (runs past its {limit:g} s timeout on purpose)")
        lines = _follow_until_quiet(timeout_file, wait + limit)
        report["timeout"] = analyse_timeout(lines, limit)
    finally:
        if not keep:
            for job_id in (MAIN_JOB_ID, TIMEOUT_JOB_ID):
                try:
                    jobs.delete(job_id)
                    progress(f"removed job {job_id}")
                except KeeperTaskError:
                    pass
    report["recommended"] = recommend(report)
    return report


def _wait_until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _read_lines(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return out
    for raw in text.splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue  # a line cut by the kill
    return out


def _follow_until_quiet(path: Path, seconds: float, quiet: float = 2.0) -> list[dict[str, Any]]:
    """Read ``path`` until its heartbeats stop for ``quiet`` seconds (the process died)."""
    deadline = time.monotonic() + seconds
    last_size, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.is_file() else -1
        if size != last_size:
            last_size, last_change = size, time.monotonic()
        elif size > 0 and time.monotonic() - last_change >= quiet:
            break
        lines = _read_lines(path)
        if lines and lines[-1].get("event") == "exit":
            break
        time.sleep(0.1)
    return _read_lines(path)


# --- --apply --------------------------------------------------------------------------------

_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "dist", "build", "__pycache__", ".tox"}


def _job_files(project: Path) -> list[Path]:
    files = []
    for path in sorted(project.rglob("*.json")):
        if any(part in _SKIP_DIRS for part in path.relative_to(project).parts):
            continue
        files.append(path)
    return files


def _set_option(arguments: str, option: str, value: str) -> str:
    pattern = re.compile(rf"(^|\s){re.escape(option)}(=|\s+)\S+")
    replacement = f"{option}={value}"
    if pattern.search(arguments):
        return pattern.sub(lambda m: m.group(1) + replacement, arguments, count=1)
    return f"{arguments} {replacement}".strip()


def apply_recommendations(rec: Mapping[str, Any], project: Path) -> list[str]:
    """Write the recommended settings into the job files of ``project``.

    Each task whose ``arguments`` pass ``{KeeperApiBaseUrl}`` (a keeper-task task) gets
    ``--mqtt-client-id-template`` (when it differs from the default and the probe saw braces
    arrive unchanged), ``--trust-timeout`` (when above the default) and ``--deadline``
    (``timeoutSeconds`` minus the recommended margin, unless the task sets one). Returns one
    line per change.
    """
    from keeper_task.jobs import read_job_json

    changes: list[str] = []
    for path in _job_files(project):
        try:
            data = read_job_json(path)
        except KeeperTaskError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            continue
        changed = False
        for task in data["tasks"]:
            new = _apply_to_task(task, rec)
            if new is not None:
                changed = True
                changes.append(f"{path}: task {task.get('id')!r} arguments -> {new}")
        if changed:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return changes


def _apply_to_task(task: Any, rec: Mapping[str, Any]) -> str | None:
    """Update a keeper-task task's ``arguments`` in place; the new value, or None if unchanged."""
    from keeper_task.jobs import API_BASE_TOKEN

    if not isinstance(task, dict):
        return None
    key = next((k for k in task if k.lower() == "arguments"), None)
    args = task.get(key) if key else None
    if not isinstance(args, str) or API_BASE_TOKEN not in args:
        return None
    new = _recommended_arguments(args, task, rec)
    if new == args:
        return None
    task[key] = new
    return new


def _recommended_arguments(args: str, task: Mapping[str, Any], rec: Mapping[str, Any]) -> str:
    """``args`` with the recommended options set (see :func:`apply_recommendations`)."""
    new = args
    template = rec.get("mqttClientIdTemplate")
    if template and template != DEFAULT_TEMPLATE and rec.get("bracesSurviveInArguments"):
        new = _set_option(new, "--mqtt-client-id-template", template)
    trust = rec.get("trustTimeout")
    if isinstance(trust, (int, float)) and trust > DEFAULT_TRUST_TIMEOUT:
        new = _set_option(new, "--trust-timeout", f"{trust:g}")
    margin = rec.get("deadlineMarginSeconds")
    limit = next((v for k, v in task.items() if k.lower() == "timeoutseconds"), None)
    if (
        isinstance(margin, (int, float))
        and isinstance(limit, int)
        and limit > margin
        and "--deadline" not in new
    ):
        new = _set_option(new, "--deadline", f"{limit - margin:g}")
    return new
