"""Emulated triggers: the Startup event and interval/cron schedules, counted by runs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from keeper_task.emulator import Emulator
from keeper_task.emulator.errors import EmulatorError
from keeper_task.emulator.schedule import CronError, CronExpression
from tests.support.emulator import job_data, write_job


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "Jobs"
    binary = directory / "bin" / "probe" / "probe"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return directory


def scheduled(job_id: str, schedule: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    data = job_data(job_id, schedule=schedule, **overrides)
    del data["events"]
    return data


def step(emu: Emulator, minutes: int) -> list[int]:
    """Advance one tick at a time, letting each run end; return the ticks that started one."""
    fired: list[int] = []
    for _ in range(minutes):
        runs = emu.advance_schedule(1)
        for run in runs:
            assert run.done.wait(30) and run.exit_code == 0, run
            fired.append(emu.schedule_minute)
    return fired


@pytest.fixture
def emu(jobs_dir: Path) -> Iterator[Emulator]:
    with Emulator(jobs_dir=jobs_dir, schedule_start=datetime(2026, 1, 1, 0, 0)) as agent:
        yield agent


def test_startup_event_runs_once_at_start(jobs_dir: Path) -> None:
    """A job with the Startup event runs once when the emulator starts; a schedule-only
    job and a disabled Startup job do not."""
    write_job(jobs_dir, job_data("on-start"))
    write_job(jobs_dir, job_data("off-start", enabled=False))
    write_job(jobs_dir, scheduled("interval-only", {"intervalMinutes": 1}))
    with Emulator(jobs_dir=jobs_dir, startup_events=True) as emu:
        assert emu.wait_for(lambda: len(emu.runs) >= 1 and emu.runs[0].done.is_set(), 30)
        assert [(r.job_id, r.trigger, r.exit_code) for r in emu.runs] == [
            ("on-start", "startup", 0)
        ]


def test_startup_event_is_off_unless_asked(jobs_dir: Path) -> None:
    """An Emulator built for tests fires nothing by itself."""
    write_job(jobs_dir, job_data("on-start"))
    with Emulator(jobs_dir=jobs_dir) as emu:
        assert emu.jobs()[0].id == "on-start"
        assert emu.runs == []


def test_interval_fires_every_n_ticks_from_the_start(emu: Emulator, jobs_dir: Path) -> None:
    """intervalMinutes 2: runs at ticks 2, 4, 6 (not at start, not aligned to the clock)."""
    write_job(jobs_dir, scheduled("every-two", {"intervalMinutes": 2}))
    emu.reload_jobs()
    assert step(emu, 6) == [2, 4, 6]
    assert [r.trigger for r in emu.runs] == ["schedule"] * 3


def test_cron_matches_the_emulated_clock(emu: Emulator, jobs_dir: Path) -> None:
    """*/3 from 00:00: ticks 3 and 6 (00:03, 00:06); a weekday-only cron on a Thursday."""
    write_job(jobs_dir, scheduled("cron-three", {"cronExpression": "*/3 * * * *"}))
    write_job(jobs_dir, scheduled("cron-monday", {"cronExpression": "0-59 * * * MON"}))
    emu.reload_jobs()
    assert step(emu, 6) == [3, 6]
    assert {r.job_id for r in emu.runs} == {"cron-three"}  # 2026-01-01 is a Thursday


def test_a_run_still_going_is_not_started_twice(emu: Emulator, jobs_dir: Path) -> None:
    """Ticks that pass while the previous run lasts skip the job, with a notice."""
    write_job(jobs_dir, scheduled("every-one", {"intervalMinutes": 1}))
    emu.reload_jobs()
    runs = emu.advance_schedule(3)  # three ticks at once: the first run cannot have ended
    assert len(runs) == 1
    skipped = [n.text for n in emu.notices if "previous run still runs" in n.text]
    assert len(skipped) == 2


def test_disabled_and_unsupported_schedules_never_fire(emu: Emulator, jobs_dir: Path) -> None:
    """A disabled job never runs; runAt (format undocumented) is reported, not guessed."""
    write_job(jobs_dir, scheduled("off", {"intervalMinutes": 1}, enabled=False))
    write_job(jobs_dir, scheduled("at-once", {"runAt": "2026-01-01T00:01:00"}))
    emu.reload_jobs()
    assert step(emu, 3) == []
    assert any("runAt/calendar schedules are not emulated" in n.text for n in emu.notices)


def test_ticker_with_time_scale_fires_without_waiting_minutes(jobs_dir: Path) -> None:
    """schedules=True with time_scale 6000: a tick every 10 ms; count runs, not seconds."""
    write_job(jobs_dir, scheduled("fast", {"intervalMinutes": 1}))
    with Emulator(jobs_dir=jobs_dir, schedules=True, time_scale=6000) as emu:
        assert emu.wait_for(lambda: sum(r.done.is_set() for r in emu.runs) >= 3, 60)
        assert {r.trigger for r in emu.runs} == {"schedule"}


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf"), 1e9])
def test_time_scale_out_of_range_is_refused(scale: float) -> None:
    """time_scale must be above 0 and at most 100000."""
    with pytest.raises(EmulatorError, match="time_scale"):
        Emulator(time_scale=scale)


@pytest.mark.parametrize(
    ("expression", "when", "fires"),
    [
        ("*/15 * * * *", datetime(2026, 1, 1, 10, 45), True),
        ("*/15 * * * *", datetime(2026, 1, 1, 10, 44), False),
        ("0 9 * * MON-FRI", datetime(2026, 1, 5, 9, 0), True),  # a Monday
        ("0 9 * * MON-FRI", datetime(2026, 1, 4, 9, 0), False),  # a Sunday
        ("0 0 1 JAN *", datetime(2026, 1, 1, 0, 0), True),
        ("0 0 13 * 5", datetime(2026, 2, 13, 0, 0), True),  # day 13 OR Friday
        ("0 0 13 * 5", datetime(2026, 2, 6, 0, 0), True),  # a Friday
        ("0 0 13 * 5", datetime(2026, 2, 7, 0, 0), False),
        ("0 0 * * 7", datetime(2026, 1, 4, 0, 0), True),  # 7 is Sunday too
    ],
)
def test_cron_expression_matching(expression: str, when: datetime, fires: bool) -> None:
    assert CronExpression(expression).matches(when) is fires


@pytest.mark.parametrize(
    "expression", ["* * * *", "61 * * * *", "*/0 * * * *", "5-1 * * * *", "L * * * *"]
)
def test_cron_expression_errors(expression: str) -> None:
    with pytest.raises(CronError):
        CronExpression(expression)


def test_dev_agent_runs_startup_jobs_and_fast_schedules(tmp_path: Path) -> None:
    """`keeper-task dev agent --time-scale 6000`: the Startup job runs once at start and an
    intervalMinutes job fires repeatedly, shown as run lines (counted, not timed)."""
    import queue
    import signal
    import subprocess
    import sys
    import threading

    state = tmp_path / "state"
    jobs = state / "Jobs"
    binary = jobs / "bin" / "probe" / "probe"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    write_job(jobs, job_data("on-start"))
    write_job(jobs, scheduled("every-minute", {"intervalMinutes": 1}))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "keeper_task.cli", "dev", "agent"),
            *("--state-dir", str(state), "--port", "0", "--time-scale", "6000"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    ended: dict[str, int] = {}
    try:
        while ended.get("every-minute", 0) < 3:
            line = lines.get(timeout=60)
            assert line is not None, proc.stderr.read() if proc.stderr else ""
            for job_id in ("on-start", "every-minute"):
                if line.startswith(f"[run] job {job_id} ") and "succeeded" in line:
                    ended[job_id] = ended.get(job_id, 0) + 1
                    trigger = "(startup)" if job_id == "on-start" else "(schedule)"
                    assert trigger in line, line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert ended["on-start"] == 1


def test_jobs_added_after_start_get_no_startup_run(jobs_dir: Path) -> None:
    """Startup fires for the jobs loaded at start only, not for jobs created later."""
    with Emulator(jobs_dir=jobs_dir, startup_events=True) as emu:
        emu.add_job(job_data("late"))
        assert emu.job("late") is not None
        assert emu.advance_schedule(1) == []
        assert emu.runs == []
