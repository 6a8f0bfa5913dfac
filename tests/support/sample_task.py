"""A task whose behaviour is chosen by --behaviour; run as a subprocess by the runtime tests."""

from __future__ import annotations

import sys
import threading
import time
from typing import Literal

from keeper_task import Task, TaskContext, TaskSettings


class SampleSettings(TaskSettings):
    """Settings of the sample task."""

    behaviour: Literal[
        "ok",
        "fail",
        "publish-fail",
        "crash",
        "sleep",
        "swallow",
        "publish",
        "undeclared",
        "teardown-crash",
        "setup-sleep",
    ] = "ok"
    count: int = 1
    #: A secret-looking setting: its value must never reach a log line or an error message.
    api_token: str | None = None
    #: Teardown says TEARDOWN-START on stdout, waits for a line on stdin, then publishes
    #: ``count`` events (drives "a second signal during teardown").
    teardown_wait: bool = False


class Sample(Task[SampleSettings]):
    """Does what --behaviour says, so each exit path can be driven from a test."""

    publishes = ("Jobs/{job_id}/events",)

    def setup(self, ctx: TaskContext[SampleSettings]) -> None:
        ctx.log.info("sample.setup")
        if ctx.settings.behaviour == "setup-sleep":
            print("READY", flush=True)
            time.sleep(3600)  # setup "hangs": ended by a signal

    def run(self, ctx: TaskContext[SampleSettings]) -> None:
        behaviour = ctx.settings.behaviour
        if behaviour in ("ok", "teardown-crash"):
            ctx.log.info("hello", broker=ctx.agent_settings.broker_host)
        elif behaviour == "fail":
            ctx.fail("disk is full", exit_code=3)
        elif behaviour == "publish-fail":
            for i in range(ctx.settings.count):
                ctx.publish_event({"i": i})
            ctx.fail("inventory incomplete")
        elif behaviour == "crash":
            raise ZeroDivisionError("boom")
        elif behaviour == "sleep":
            print("READY", flush=True)
            time.sleep(3600)  # the work "hangs": ended by a signal or the deadline
        elif behaviour == "swallow":
            # Task code that catches every Exception must still be stoppable by a signal.
            print("READY", flush=True)
            while True:
                try:
                    threading.Event().wait()
                except Exception as exc:
                    ctx.log.warning("sample.swallowed", error=type(exc).__name__)
        elif behaviour == "publish":
            for i in range(ctx.settings.count):
                ctx.publish_event({"i": i})
            ctx.log.info("published", count=ctx.settings.count)
        elif behaviour == "undeclared":
            ctx.publish("Some/other/topic", "x")

    def teardown(self, ctx: TaskContext[SampleSettings]) -> None:
        ctx.log.info("sample.teardown")
        if ctx.settings.teardown_wait:
            print("TEARDOWN-START", flush=True)
            sys.stdin.readline()
            for i in range(ctx.settings.count):
                ctx.publish_event({"i": i})
            ctx.log.info("sample.teardown_done")
        print("TEARDOWN", file=sys.stderr, flush=True)
        if ctx.settings.behaviour == "teardown-crash":
            raise RuntimeError("teardown failed")


if __name__ == "__main__":
    Sample.main()
