"""Inventory report: what takes the space in a directory of this host.

Progress goes to the job's event topic (``Jobs/<job id>/events``) as the items are collected;
the results go to KeeperLogger, one message per item plus a summary. Options (each also an
environment variable ``KEEPER_TASK_<NAME>``):

* ``--scan-dir DIR``: the directory to inventory (default: the system temp directory);
* ``--max-items N``: report the N largest entries (default 10);
* ``--dry-run``: collect and log, but publish nothing on the event topic.

Run it under the emulator: ``keeper-task dev run examples/inventory/job.json``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from keeper_task import Task, TaskContext, TaskSettings


class InventorySettings(TaskSettings):
    """Inventory report: the largest entries of a directory, reported to the agent."""

    # --scan-dir DIR, env KEEPER_TASK_SCAN_DIR
    scan_dir: str = Field(default_factory=tempfile.gettempdir, description="directory to inventory")
    # --max-items N, env KEEPER_TASK_MAX_ITEMS; outside 1-1000 the task exits 78
    max_items: int = Field(default=10, ge=1, le=1000, description="how many entries to report")
    # --dry-run / --no-dry-run, env KEEPER_TASK_DRY_RUN
    dry_run: bool = Field(
        default=False, description="collect and log, but publish nothing on the event topic"
    )


def _entry_size(path: Path) -> int:
    """Size in bytes of a file, or of everything under a directory (symlinks not followed)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda _exc: None):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # vanished or unreadable while we walked: not worth failing for
    return total


class Inventory(Task[InventorySettings]):
    """Reports the largest entries of ``--scan-dir``."""

    publishes = ("Jobs/{job_id}/events",)

    def run(self, ctx: TaskContext[InventorySettings]) -> None:
        """Collect, report progress on the event topic, report results to KeeperLogger."""
        settings = ctx.settings
        root = Path(settings.scan_dir)
        if not root.is_dir():
            ctx.fail(f"--scan-dir {root} is not a directory", exit_code=2)
        entries = sorted(root.iterdir(), key=lambda p: p.name)
        total = min(len(entries), settings.max_items)
        publish = not settings.dry_run and ctx.event_topic is not None and ctx.mqtt is not None
        if publish:
            ctx.publish_event({"event": "started", "entries": len(entries), "report": total})

        sized = []
        for done, entry in enumerate(entries, start=1):
            sized.append((_entry_size(entry), entry))
            if publish and (done == len(entries) or done % 50 == 0):
                ctx.publish_event({"event": "progress", "scanned": done, "of": len(entries)})
        sized.sort(key=lambda item: (-item[0], item[1].name))

        for rank, (size, entry) in enumerate(sized[: settings.max_items], start=1):
            kind = "dir" if entry.is_dir() and not entry.is_symlink() else "file"
            ctx.log.info("inventory.item", rank=rank, name=entry.name, kind=kind, bytes=size)
        usage = shutil.disk_usage(root)
        ctx.log.info(
            "inventory.summary",
            host=platform.node(),
            system=platform.system(),
            entries=len(entries),
            reported=total,
            disk_total_bytes=usage.total,
            disk_free_bytes=usage.free,
            dry_run=settings.dry_run,
        )
        if publish:
            # Wait for the broker's ack: the last event is the one subscribers act on.
            ctx.publish_event({"event": "finished", "reported": total}, wait=True)


if __name__ == "__main__":
    Inventory.main()
