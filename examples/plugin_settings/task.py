"""Plugin settings demo: reads and writes its own plugin-scoped settings.

Exercises the whole Plugin Settings API of the agent (Plugin tier) on the plugin named by
``--plugin`` (default ``KeeperTaskDemo``):

1. ``status``  -- ``GET /api/PluginSettings/{plugin}/status`` before any change;
2. ``get_all`` -- ``GET /api/PluginSettings/{plugin}``: the merged settings;
3. ``put``     -- ``PUT /api/PluginSettings/{plugin}/demo.runs`` (a run counter) and
   ``demo.lastJob``;
4. ``get``     -- ``GET /api/PluginSettings/{plugin}/demo.runs``: read back what was written;
5. ``status``  -- again, now reporting the changed keys;
6. ``revert``  -- with ``--reset``: ``POST /api/PluginSettings/{plugin}/revert``, back to the
   plugin's JSON on disk; ``revert_all`` with ``--reset-all``:
   ``POST /api/PluginSettings/revert-all``.

Run it under the emulator, which loads the plugin's on-disk settings from the ``plugins/``
folder beside the job file::

    keeper-task dev run examples/plugin_settings/job.json
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from keeper_task import Task, TaskContext, TaskSettings

RUNS_KEY = "demo.runs"
LAST_JOB_KEY = "demo.lastJob"


class PluginSettingsDemoSettings(TaskSettings):
    """Plugin settings demo: counts its runs in its own plugin-scoped settings."""

    plugin: str = Field(default="KeeperTaskDemo", description="plugin whose settings we own")
    reset: bool = Field(default=False, description="revert the plugin to its on-disk JSON")
    reset_all: bool = Field(default=False, description="revert every plugin (revert-all)")


def _changed_keys(status: Any) -> list[str]:
    """The changed keys of a status answer, when it says (its shape is undocumented)."""
    if isinstance(status, dict):
        keys = status.get("changedKeys")
        if isinstance(keys, list):
            return [str(k) for k in keys]
    return []


class PluginSettingsDemo(Task[PluginSettingsDemoSettings]):
    """Reads, writes, verifies and optionally reverts its own plugin settings."""

    publishes = ("Jobs/{job_id}/events",)

    def run(self, ctx: TaskContext[PluginSettingsDemoSettings]) -> None:
        """Walk through every Plugin Settings endpoint once."""
        api = ctx.plugin_settings
        plugin = ctx.settings.plugin

        before = api.status(plugin)
        ctx.log.info(
            "settings.status", plugin=plugin, phase="before", changed=_changed_keys(before)
        )

        current = api.get_all(plugin)
        try:
            runs = int(current.get(RUNS_KEY, "0"))
        except ValueError:
            ctx.fail(f"{plugin}/{RUNS_KEY} is not an integer; run with --reset", exit_code=3)
        ctx.log.info("settings.read", plugin=plugin, keys=sorted(current), runs=runs)

        api.put(plugin, RUNS_KEY, runs + 1)
        api.put(plugin, LAST_JOB_KEY, ctx.job_id or "manual")
        stored = api.get(plugin, RUNS_KEY)
        if str(stored) != str(runs + 1):
            ctx.fail(f"{plugin}/{RUNS_KEY} reads back {stored!r}, wrote {runs + 1}", exit_code=4)
        after = api.status(plugin)
        ctx.log.info("settings.written", plugin=plugin, runs=runs + 1, changed=_changed_keys(after))

        if ctx.settings.reset:
            api.revert(plugin)
            reverted = api.get_all(plugin)
            ctx.log.info("settings.reverted", plugin=plugin, runs=reverted.get(RUNS_KEY))
        if ctx.settings.reset_all:
            api.revert_all()
            ctx.log.info("settings.reverted_all")
        if ctx.event_topic is not None and ctx.mqtt is not None:
            ctx.publish_event({"event": "finished", "runs": runs + 1}, wait=True)


if __name__ == "__main__":
    PluginSettingsDemo.main()
