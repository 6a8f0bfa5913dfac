"""A task whose behaviour is chosen by --behaviour; run as a subprocess by the runtime tests."""

from __future__ import annotations

import sys
import time
from typing import Literal

from keeper_task import Task, TaskContext, TaskSettings


class SampleSettings(TaskSettings):
    """Settings of the sample task."""

    behaviour: Literal[
        "ok", "fail", "crash", "sleep", "publish", "undeclared", "teardown-crash"
    ] = "ok"
    count: int = 1


class Sample(Task[SampleSettings]):
    """Does what --behaviour says, so each exit path can be driven from a test."""

    publishes = ("Jobs/{job_id}/events",)

    def setup(self, ctx: TaskContext[SampleSettings]) -> None:
        ctx.log.info("sample.setup")

    def run(self, ctx: TaskContext[SampleSettings]) -> None:
        behaviour = ctx.settings.behaviour
        if behaviour == "ok":
            ctx.log.info("hello", broker=ctx.agent_settings.broker_host)
        elif behaviour == "fail":
            ctx.fail("disk is full", exit_code=3)
        elif behaviour == "crash":
            raise ZeroDivisionError("boom")
        elif behaviour == "sleep":
            print("READY", flush=True)
            time.sleep(3600)  # the work "hangs": ended by a signal or the deadline
        elif behaviour == "publish":
            for i in range(ctx.settings.count):
                ctx.publish_event({"i": i})
            ctx.log.info("published", count=ctx.settings.count)
        elif behaviour == "undeclared":
            ctx.publish("Some/other/topic", "x")

    def teardown(self, ctx: TaskContext[SampleSettings]) -> None:
        ctx.log.info("sample.teardown")
        print("TEARDOWN", file=sys.stderr, flush=True)


if __name__ == "__main__":
    Sample.main()
