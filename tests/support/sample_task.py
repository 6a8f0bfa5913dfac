"""A task whose behaviour is chosen by --behaviour; run as a subprocess by the runtime tests."""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Literal

from keeper_task import Task, TaskContext, TaskSettings


class SampleSettings(TaskSettings):
    """Settings of the sample task."""

    behaviour: Literal[
        "ok",
        "fail",
        "publish-fail",
        "crash",
        "crash-secret",
        "sleep",
        "swallow",
        "publish",
        "undeclared",
        "teardown-crash",
        "setup-sleep",
        "finalizers",
        "weakref-finalizers",
        "generator-finalizers",
        "swallow-all",
        "sys-exit",
        "sys-exit-text",
    ] = "ok"
    count: int = 1
    #: A secret-looking setting: its value must never reach a log line or an error message.
    api_token: str | None = None
    #: Teardown says TEARDOWN-START on stdout, waits for a line on stdin, then publishes
    #: ``count`` events (drives "a second signal during teardown").
    teardown_wait: bool = False
    #: Teardown says TEARDOWN-HANG on stdout, then never returns.
    teardown_hang: bool = False


def _busy(seconds: float = 0.02) -> None:
    """Pure-Python work (no blocking call) for about ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _SlowDel:
    """An object whose finalizer does ~20 ms of pure-Python work."""

    def __del__(self) -> None:
        _busy()


class _Plain:
    pass


def _slow_generator() -> Iterator[int]:
    try:
        yield 1
    finally:  # runs when the generator is closed on being freed
        _busy()


def _finalizer_loop(kind: str) -> None:
    """Make garbage whose finalizers take almost all of the time, forever."""
    keep: list[Any] = []
    rounds = 0
    while True:
        rounds += 1
        if rounds == 5:  # in the loop's steady state: most of the time is in finalizers
            print("READY", flush=True)
        if kind == "finalizers":
            _SlowDel()
        elif kind == "weakref-finalizers":
            obj = _Plain()
            keep.append(weakref.ref(obj, lambda _ref: _busy()))
            del obj
            if len(keep) > 1000:
                keep.clear()
        else:
            gen = _slow_generator()
            next(gen)
            del gen


class Sample(Task[SampleSettings]):
    """Does what --behaviour says, so each exit path can be driven from a test."""

    publishes = ("Jobs/{job_id}/events",)
    stop_grace = float(os.environ.get("SAMPLE_STOP_GRACE", "10"))

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
        elif behaviour == "crash-secret":
            # A library error carrying the settings it was given, secrets included.
            raise ValueError({"api.token": ctx.settings.api_token, "host": "example"})
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
        elif behaviour in ("finalizers", "weakref-finalizers", "generator-finalizers"):
            _finalizer_loop(behaviour)
        elif behaviour == "swallow-all":
            # The worst task code: every stop request is swallowed, forever. (A raise
            # landing in the handler of the inner try is swallowed by the outer one.)
            ready = False
            while True:
                try:
                    while True:
                        try:
                            if not ready:  # inside the try: a stop right after it is swallowed
                                ready = True
                                print("READY", flush=True)
                            threading.Event().wait()
                        except BaseException:
                            print("SWALLOWED", file=sys.stderr, flush=True)
                except BaseException:
                    pass
        elif behaviour == "sys-exit":
            sys.exit(ctx.settings.count)
        elif behaviour == "sys-exit-text":
            sys.exit("the inventory file is locked")

    def teardown(self, ctx: TaskContext[SampleSettings]) -> None:
        ctx.log.info("sample.teardown")
        if ctx.settings.teardown_wait:
            print("TEARDOWN-START", flush=True)
            sys.stdin.readline()
            for i in range(ctx.settings.count):
                ctx.publish_event({"i": i})
            ctx.log.info("sample.teardown_done")
        if ctx.settings.teardown_hang:
            print("TEARDOWN-HANG", flush=True)
            while True:
                time.sleep(3600)
        print("TEARDOWN", file=sys.stderr, flush=True)
        if ctx.settings.behaviour == "teardown-crash":
            raise RuntimeError("teardown failed")


if __name__ == "__main__":
    Sample.main()
