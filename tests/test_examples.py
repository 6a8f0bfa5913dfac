"""The examples under examples/ run under the local agent emulator and do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keeper_task.jobs import load_job, validate_job
from keeper_task.testing import run_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
INVENTORY = EXAMPLES / "inventory"
PLUGIN = EXAMPLES / "plugin_settings"


@pytest.mark.parametrize("name", ["inventory", "plugin_settings"])
def test_example_job_is_valid(name: str) -> None:
    """Each example's job.json passes the offline validator with no errors or warnings."""
    report = validate_job(load_job(EXAMPLES / name / "job.json"))
    assert report.valid and not report.errors and not report.warnings, report
    assert "_" not in str(report.job_id)


@pytest.fixture
def scan_dir(tmp_path: Path) -> Path:
    root = tmp_path / "scan"
    root.mkdir()
    (root / "big.bin").write_bytes(b"x" * 3000)
    (root / "small.txt").write_bytes(b"x" * 10)
    (root / "folder").mkdir()
    (root / "folder" / "inner.bin").write_bytes(b"x" * 2000)
    return root


def _events(result: Any, job_id: str) -> list[dict[str, Any]]:
    return [m.json() for m in result.publishes if m.topic == f"Jobs/{job_id}/events"]


def test_inventory_reports_progress_and_results(keeper_agent: Any, scan_dir: Path) -> None:
    """Inventory publishes progress on its event topic and the largest items to KeeperLogger."""
    result = run_task(
        keeper_agent,
        INVENTORY / "task.py",
        job=INVENTORY / "job.json",
        args=["--scan-dir", str(scan_dir), "--max-items", "2"],
    )
    assert result.exit_code == 0, result.stderr
    items = [log["properties"] for log in result.logs if log["message"] == "inventory.item"]
    assert [(i["rank"], i["name"], i["bytes"]) for i in items] == [
        (1, "big.bin", 3000),
        (2, "folder", 2000),
    ]
    summary = result.log("inventory.summary")["properties"]
    assert summary["entries"] == 3 and summary["reported"] == 2 and summary["dry_run"] is False
    events = _events(result, "inventory-report")
    assert events[0] == {"event": "started", "entries": 3, "report": 2}
    assert {"event": "progress", "scanned": 3, "of": 3} in events
    assert events[-1] == {"event": "finished", "reported": 2}
    assert not result.denied


def test_inventory_dry_run_publishes_no_events(keeper_agent: Any, scan_dir: Path) -> None:
    """``--dry-run`` (here via its env variable) still logs but publishes nothing on the topic."""
    result = run_task(
        keeper_agent,
        INVENTORY / "task.py",
        job=INVENTORY / "job.json",
        args=["--scan-dir", str(scan_dir)],
        env={"KEEPER_TASK_DRY_RUN": "true"},
    )
    assert result.exit_code == 0, result.stderr
    assert result.log("inventory.summary")["properties"]["dry_run"] is True
    assert _events(result, "inventory-report") == []


def test_inventory_rejects_a_missing_directory(keeper_agent: Any, tmp_path: Path) -> None:
    """A scan directory that does not exist is an expected failure with its own exit code."""
    result = run_task(
        keeper_agent,
        INVENTORY / "task.py",
        job=INVENTORY / "job.json",
        args=["--scan-dir", str(tmp_path / "nope")],
    )
    assert result.exit_code == 2
    assert "not a directory" in result.log("task.failed")["properties"]["reason"]


def test_inventory_bad_max_items_is_a_settings_error(keeper_agent: Any) -> None:
    """``--max-items 0`` is refused before run() with the bad-settings exit code."""
    result = run_task(
        keeper_agent, INVENTORY / "task.py", job=INVENTORY / "job.json", args=["--max-items", "0"]
    )
    assert result.exit_code == 78
    assert "--max-items" in result.stderr


def test_plugin_settings_exercises_the_whole_api(tmp_path: Path) -> None:
    """The demo reads, writes, checks status and reverts its own plugin settings (all 6 calls)."""
    from keeper_task.emulator import Emulator

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "KeeperTaskDemo.json").write_text(
        (PLUGIN / "plugins" / "KeeperTaskDemo.json").read_text()
    )
    with Emulator(plugins_dir=plugins) as keeper_agent:
        first = run_task(keeper_agent, PLUGIN / "task.py", job=PLUGIN / "job.json")
        assert first.exit_code == 0, first.stderr
        assert first.log("settings.read")["properties"]["runs"] == 0
        assert sorted(first.log("settings.written")["properties"]["changed"]) == [
            "demo.lastJob",
            "demo.runs",
        ]
        second = run_task(
            keeper_agent,
            PLUGIN / "task.py",
            job=PLUGIN / "job.json",
            args=["--reset", "--reset-all"],
        )
        assert second.exit_code == 0, second.stderr
        # The counter survived between runs (PUT), then --reset reverted it to the disk value.
        assert second.log("settings.read")["properties"]["runs"] == 1
        assert second.log("settings.reverted")["properties"]["runs"] == "0"
        assert "settings.reverted_all" in second.messages
        assert _events(second, "plugin-settings-demo")[-1] == {"event": "finished", "runs": 2}
        calls = {(r.method, r.path) for r in first.requests + second.requests}
    base = "/api/PluginSettings/KeeperTaskDemo"
    for call in [
        ("GET", base),
        ("GET", f"{base}/demo.runs"),
        ("PUT", f"{base}/demo.runs"),
        ("POST", f"{base}/revert"),
        ("POST", "/api/PluginSettings/revert-all"),
        ("GET", f"{base}/status"),
    ]:
        assert call in calls, (call, sorted(calls))


def test_inventory_under_dev_run(scan_dir: Path) -> None:
    """``keeper-task dev run examples/inventory/job.json`` runs the task.py next to the job."""
    done = subprocess.run(
        [sys.executable, "-m", "keeper_task.cli", "dev", "run", str(INVENTORY / "job.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KEEPER_TASK_SCAN_DIR": str(scan_dir)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inventory.summary" in done.stdout
    assert json.dumps({"event": "finished", "reported": 3}, separators=(",", ":")) in done.stdout


def test_every_example_runs_with_the_command_the_readme_shows(tmp_path: Path) -> None:
    """Each `keeper-task dev run examples/...` command of the README, run as written (the
    venv's keeper-task is this one), exits 0: one per example directory."""
    import re
    import shlex

    readme = " ".join((EXAMPLES.parent / "README.md").read_text(encoding="utf-8").split())
    pattern = r"(?:\.venv/bin/)?keeper-task dev run examples/[^`#]*"
    commands = sorted({c.strip() for c in re.findall(pattern, readme)})
    covered = {shlex.split(c)[3].split("/")[1] for c in commands}
    assert covered == {p.name for p in EXAMPLES.iterdir() if p.is_dir()}, commands
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["TMPDIR"] = str(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run(
            [sys.executable, "-m", "keeper_task.cli", *argv[1:]],
            cwd=EXAMPLES.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
        assert done.returncode == 0, (command, done.stdout + done.stderr)
        assert "--- job " in done.stdout and ": succeeded" in done.stdout, done.stdout
