"""keeper_task.signals in-process: where a stop request is raised, and where it never is.

Each test raises a real signal in this process (``os.kill`` of our own pid, handled by the
main thread at its next bytecode) and counts what happened: which code ran to its end, where
the exception surfaced, and how many exceptions Python dropped ("Exception ignored").
"""

from __future__ import annotations

import os
import signal
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from keeper_task.signals import Canceller, InterruptOnce, defer_stop, stop_boundary


class _Stop(BaseException):
    pass


@pytest.fixture
def canceller() -> Iterator[Canceller]:
    """A Canceller fed by SIGUSR1; no periodic re-raise within a test (interval 3600 s)."""
    cancel = Canceller(_Stop, _Stop, interval=3600, kick_signal=signal.SIGUSR1)

    def handler(signum: int, frame: Any) -> None:
        cancel.take_kick(signum)
        cancel.request()
        cancel.deliver(frame)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield cancel
    finally:
        cancel.close()
        signal.signal(signal.SIGUSR1, previous)


@pytest.fixture
def dropped(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Exceptions Python reports as unraisable (after the Canceller's own hook)."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


def _signal_self() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)


class _Finalized:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __del__(self) -> None:
        self.log.append("del-start")
        _signal_self()  # the handler runs inside this finalizer
        for _ in range(1000):  # pure-Python work the stop must not cut short
            pass
        self.log.append("del-end")


def test_stop_is_raised_after_a_finalizer_returns(dropped: list[Any], canceller: Canceller) -> None:
    """A signal inside __del__: the finalizer runs to its end, the caller gets the stop."""
    log: list[str] = []
    with pytest.raises(_Stop):
        _Finalized(log)  # freed at once: __del__ runs here
        log.append("after-del")  # the caller's next instruction raises first
    assert log == ["del-start", "del-end"]
    assert dropped == []


def test_stop_swallowed_by_a_weakref_callback_is_raised_again(
    dropped: list[Any], canceller: Canceller
) -> None:
    """A weakref callback (not recognisable from its frame) swallows the stop: raised again."""
    log: list[str] = []

    class Plain:
        pass

    def callback(_ref: Any) -> None:
        log.append("callback")
        _signal_self()
        for _ in range(1000):
            pass
        log.append("not reached: the stop is raised in the callback, Python drops it")

    obj = Plain()
    ref = weakref.ref(obj, callback)
    with pytest.raises(_Stop):
        del obj
        log.append("after-del")
    assert ref() is None
    assert log == ["callback"]
    assert dropped == []  # the Canceller took it; Python printed nothing
    assert canceller.redelivered == 1


def test_defer_stop_holds_the_stop_until_the_function_returns(canceller: Canceller) -> None:
    """A function marked defer_stop is never interrupted; its caller gets the stop."""
    log: list[str] = []

    @defer_stop
    def bookkeeping() -> None:
        log.append("start")
        _signal_self()
        for _ in range(1000):
            pass
        log.append("end")

    def caller() -> None:
        bookkeeping()
        log.append("not reached")

    with pytest.raises(_Stop):
        caller()
    assert log == ["start", "end"]


def test_boundary_frame_is_never_a_raise_target(canceller: Canceller) -> None:
    """A stop_boundary function's own code is not interrupted; it stays pending for later."""
    log: list[str] = []

    @stop_boundary
    def boundary() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this frame (a callee would raise)
        for _ in range(1000):
            pass
        log.append("boundary-end")

    boundary()
    assert log == ["boundary-end"]
    assert canceller.pending
    with pytest.raises(_Stop):  # the next re-raise (the kicker's) lands in ordinary code
        canceller.kick()
        for _ in range(1000):
            pass


def test_close_ends_delivery(canceller: Canceller) -> None:
    """After close(), signals raise nothing: teardown and the flush run undisturbed."""
    canceller.close()
    _signal_self()
    for _ in range(1000):
        pass
    assert not canceller.pending
    assert canceller.request() is False


def test_interrupt_once_raises_once_then_only_records() -> None:
    """dev's helper: the first SIGTERM raises KeyboardInterrupt; later ones are noted only."""
    with InterruptOnce() as signals:
        assert signals.installed
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised
        for _ in range(1000):
            pass
        assert signals.name == "SIGTERM"
    assert not signals.installed
