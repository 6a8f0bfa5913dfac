"""Stop signals: installed in one place, never lost, never raised inside our own bookkeeping.

Used by the task runtime (:mod:`keeper_task.task`) and by ``keeper-task dev``; it imports
nothing from either.

Why this is more than ``signal.signal``: a Python signal handler runs between two bytecodes
of whatever the main thread is executing, and an exception it raises is lost when that code
is a finalizer (a ``__del__`` method, a weakref callback, a generator closed by the garbage
collector): Python prints "Exception ignored" and carries on. :class:`Canceller` therefore

* never raises inside a frame that cannot propagate the exception (a ``__del__`` method) or
  that is marked with :func:`defer_stop` (our own bookkeeping). Like trio, which keeps
  ``KeyboardInterrupt`` out of its internals by a flag found on the frame stack, it walks
  the stack from the interrupted frame; when an unsafe frame is on it, the exception is
  raised in the nearest caller of the outermost unsafe frame, at that caller's next
  instruction (a one-shot trace function on that one frame);
* watches ``sys.unraisablehook``: a stop swallowed by a finalizer it could not recognise
  (a weakref callback, a generator finalizer) is raised again the same way;
* raises the stop again every ``interval`` seconds while the cancellable work goes on, so
  code that swallows it (``except BaseException: pass``) cannot keep the work alive;
* stops all of this at :meth:`Canceller.close`: what follows (teardown, the flush) is never
  interrupted.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType, TracebackType
from typing import Any, TypeVar

__all__ = [
    "STOP_SIGNAL_NAMES",
    "Canceller",
    "InterruptOnce",
    "SignalHandlers",
    "defer_stop",
    "raise_in_thread",
    "start_shielded",
    "stop_boundary",
]

#: The signals that ask a process to stop (SIGBREAK: Ctrl-Break on Windows).
STOP_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGBREAK")

_F = TypeVar("_F", bound=Callable[..., Any])
_Handler = Callable[[int, "FrameType | None"], Any]

#: Functions whose frames, and everything they call, a stop is never raised in.
_PROTECTED: set[CodeType] = set()
#: Functions a stop is never raised in directly (their callees stay cancellable).
_BOUNDARY: set[CodeType] = set()


def defer_stop(func: _F) -> _F:
    """Mark ``func`` as a critical section: a stop request waits until it has returned.

    A stop that arrives while ``func`` (or anything it calls) runs is raised in its caller,
    at the caller's next instruction after ``func`` returned.
    """
    _PROTECTED.add(func.__code__)
    return func


def stop_boundary(func: _F) -> _F:
    """Mark ``func`` so that a stop is raised only inside what it calls, never in its own code.

    Its ``try``/``except`` bookkeeping around the cancellable calls then runs atomically;
    a stop that arrives in its own code stays pending and is raised again later.
    """
    _BOUNDARY.add(func.__code__)
    return func


def _stop_signals() -> list[int]:
    return [int(getattr(signal, n)) for n in STOP_SIGNAL_NAMES if hasattr(signal, n)]


def start_shielded(thread: threading.Thread) -> None:
    """Start ``thread`` with the stop signals blocked in it, so they reach the main thread.

    Why: the OS may hand a process-directed SIGTERM/SIGINT to any thread that does not block
    it. Python then runs the handler only when the main thread next runs bytecode, so a main
    thread blocked in ``time.sleep()`` or a lock wait would sleep on, the stop unseen (seen
    here: a task in ``time.sleep(3600)`` ignored SIGTERM while a helper thread took it). A
    new thread inherits its creator's mask: block, start, restore. A signal that arrives
    meanwhile stays pending and is delivered when the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: signals are emulated in the main thread
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SignalHandlers:
    """Routes SIGTERM, SIGINT and SIGBREAK to ``handler`` while active (a context manager).

    Only the main thread may install signal handlers; elsewhere this does nothing and
    :attr:`installed` stays False. The previous handlers come back on exit.
    """

    def __init__(self, handler: _Handler) -> None:
        self._handler = handler
        self._previous: dict[int, Any] = {}
        self._poker: _Poker | None = None

    @property
    def installed(self) -> bool:
        """True while at least one handler is installed."""
        return bool(self._previous)

    def install(self) -> None:
        """Install the handler for every stop signal this platform has."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _stop_signals():
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except (OSError, ValueError):
                continue
        if self._previous:
            self._poker = _Poker.start()

    def restore(self) -> None:
        """Put the previous handlers back."""
        if self._poker is not None:
            self._poker.stop()
            self._poker = None
        for signum, previous in self._previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> SignalHandlers:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


class _Poker:
    """Makes sure a stop signal's Python handler runs even when it arrived just too late.

    Why: Python runs a signal handler at the main thread's next bytecode. A signal that
    lands after the last check before a blocking call (``time.sleep()``, a lock wait) has
    already interrupted nothing: the handler then waits for the call to return — seen here
    when SIGTERM followed a task's last print by microseconds, and the task slept on. The C
    handler writes each signal's number to a wakeup fd; this thread reads it and sends the
    main thread a no-op signal (SIGURG), which interrupts the blocking call so that Python
    runs the pending handler. When the handler had already run, the poke changes nothing.
    """

    def __init__(
        self, poke: int, reader: socket.socket, writer: socket.socket, previous: Any, old: Any
    ) -> None:
        self._poke, self._reader, self._writer = poke, reader, writer
        self._previous_fd, self._old_handler = previous, old
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="keeper-task-signals", daemon=True)

    @classmethod
    def start(cls) -> _Poker | None:
        poke = getattr(signal, "SIGURG", None)
        if poke is None or not hasattr(signal, "pthread_kill"):
            return None  # Windows: signals are handled in the main thread's own loop
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            old = signal.signal(poke, _no_op)
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError):
            reader.close()
            writer.close()
            return None
        poker = cls(int(poke), reader, writer, previous, old)
        start_shielded(poker._thread)
        return poker

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            signal.set_wakeup_fd(self._previous_fd)
            signal.signal(self._poke, self._old_handler)
        with contextlib.suppress(OSError):
            self._writer.close()  # the thread's read then ends

    def _run(self) -> None:
        stops = set(_stop_signals())
        with self._reader:
            while True:
                try:
                    data = self._reader.recv(64)
                except OSError:
                    return
                if not data:
                    return
                if stops.intersection(data) and self._main is not None:
                    with contextlib.suppress(OSError, ValueError):
                        signal.pthread_kill(self._main, self._poke)


def _no_op(signum: int, frame: FrameType | None) -> None:
    """The poke's handler: its only job is to interrupt a blocking call."""


class InterruptOnce(SignalHandlers):
    """The first stop signal raises ``KeyboardInterrupt`` in the main thread; later ones are noted.

    For a foreground tool: every path then runs its cleanup, and a second Ctrl-C cannot
    abort that cleanup half-way. After :meth:`shield` (the cleanup has started) even the
    first signal is only noted.
    """

    def __init__(self) -> None:
        super().__init__(self._on_signal)
        #: The first stop signal received, if any.
        self.signum: int | None = None
        self._shielded = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if not self._shielded:
                raise KeyboardInterrupt

    def shield(self) -> None:
        """From now on signals are only noted."""
        self._shielded = True

    @property
    def name(self) -> str:
        """The first signal's name (``SIGINT``), or an empty string."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> InterruptOnce:
        self.install()
        return self


class Canceller:
    """Delivers one stop request to one thread until the cancellable work there has ended.

    The owner installs a signal handler (:class:`SignalHandlers`) that calls
    :meth:`request` and then :meth:`deliver`, and that first asks :meth:`take_kick` whether
    the signal is only this object waking the main thread to raise the stop again.
    Re-raises in the main thread use ``kick_signal`` (SIGINT for the task runtime).

    Args:
        make_exc: Builds the exception that stops the work (a ``BaseException``).
        exc_type: Its class (to recognise it when a finalizer swallowed it).
        interval: Seconds between two re-raises while the request is pending.
        kick_signal: The signal sent to the main thread to raise again from inside a
            blocking call (its handler must be installed); None off the main thread.
        defer: Asked before a raise in a frame that looks safe: when it returns True it
            has taken the raise (a callable) and runs it when a critical section it
            tracks is left (the log pipeline's ``defer_until_safe``).
    """

    def __init__(
        self,
        make_exc: Callable[[], BaseException],
        exc_type: type[BaseException],
        *,
        interval: float = 0.25,
        kick_signal: int | None = None,
        defer: Callable[[Callable[[], None]], bool] | None = None,
    ) -> None:
        self._defer = defer
        self._make_exc = make_exc
        self._exc_type = exc_type
        self._interval = interval
        self._kick_signal = kick_signal
        self._thread = threading.current_thread()
        # Re-entrant: a handler running in the thread that holds it (a kick sent to oneself)
        # takes it again in take_kick().
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._pending = False
        self._kick = False
        self._kicker: threading.Thread | None = None
        self._armed: FrameType | None = None
        self._old_trace: Any = None
        self._had_trace = False
        self._previous_hook: Any = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        #: How many times the stop was raised again after a swallow or a deferral.
        self.redelivered = 0

    @property
    def pending(self) -> bool:
        """True once a stop was requested while the work was still cancellable."""
        return self._pending

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ended the cancellable part."""
        return self._closed.is_set()

    def request(self) -> bool:
        """Ask the work to stop; returns False when it has already ended (nothing to do)."""
        with self._lock:
            if self._closed.is_set():
                return False
            self._pending = True
            if self._kicker is None:
                self._kicker = threading.Thread(
                    target=self._kick_loop, name="keeper-task-stop", daemon=True
                )
                start_shielded(self._kicker)
        return True

    @defer_stop
    def take_kick(self, signum: int) -> bool:
        """Return True (once) when signal ``signum`` being handled is a re-delivery of ours.

        Only a signal of the kick's own number can be one: another stop signal is always a
        new one. (A kick and a real signal of the same number arriving together are one
        signal for the OS; that one then counts as the kick.)
        """
        with self._lock:
            if not self._kick or signum != self._kick_signal:
                return False
            self._kick = False
        return True

    @defer_stop
    def deliver(self, frame: FrameType | None) -> None:
        """Raise the stop now if ``frame`` is a safe place, else arrange it for the next one.

        Called from the signal handler, in the target thread, with the interrupted frame.
        """
        if not self._pending or self._closed.is_set():
            return
        outer = _outermost_unsafe(frame)
        if outer is None:
            if frame is not None and frame.f_code in _BOUNDARY:
                return  # the kicker raises it again once the work is in a callee
            if self._defer is not None and self._defer(self._raise_if_pending):
                return  # raised when the critical section it was in ends
            self._disarm()
            raise self._make_exc()
        self._arm(outer.f_back)

    @defer_stop
    def kick(self) -> None:
        """Make the target thread raise the pending stop again (callable from any thread)."""
        ident = self._thread.ident
        with self._lock:
            # Under the lock: close() cannot slip in between the check and the raise, so no
            # re-raise reaches the thread once its owner restored the previous handlers.
            if self._closed.is_set() or not self._pending or ident is None:
                return
            if self._kick_signal is None:
                raise_in_thread(self._thread, self._exc_type)
            elif hasattr(signal, "pthread_kill"):
                self._kick = True
                # A real signal interrupts blocking calls (sleep, socket, lock waits) too;
                # the handler only runs later, in the target thread, so holding the lock
                # here cannot deadlock with take_kick().
                signal.pthread_kill(ident, self._kick_signal)
            else:  # Windows: handled at the main thread's next bytecode
                self._kick = True
                _thread.interrupt_main(signal.Signals(self._kick_signal))

    @defer_stop
    def close(self) -> None:
        """End the cancellable part: from now on the stop is never raised again."""
        with self._lock:
            self._closed.set()
        self._disarm()
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._previous_hook
        if self._kick_signal is None and threading.current_thread() is self._thread:
            raise_in_thread(self._thread, None)  # drop a re-raise still in flight
        if self._had_trace and sys.gettrace() is None:
            # A trace function that raises switches tracing off: give a debugger or
            # coverage tool back the trace function it had.
            sys.settrace(self._old_trace)

    # --- internals ------------------------------------------------------------------------

    def _raise_if_pending(self) -> None:
        if self._pending and not self._closed.is_set():
            raise self._make_exc()

    def _kick_loop(self) -> None:
        while not self._closed.wait(self._interval):
            self.kick()

    @defer_stop
    def _unraisable(self, unraisable: Any) -> None:
        exc_type = getattr(unraisable, "exc_type", None)
        ours = isinstance(exc_type, type) and issubclass(exc_type, self._exc_type)
        if ours and not self._closed.is_set() and threading.current_thread() is self._thread:
            # A finalizer swallowed the stop; our caller is the code it interrupted.
            try:
                frame: FrameType | None = sys._getframe(1)
            except ValueError:  # called with no Python frame: only the kicker can help
                return
            outer = _outermost_unsafe(frame)
            self._arm(outer.f_back if outer is not None else frame)
            return
        self._previous_hook(unraisable)

    @defer_stop
    def _arm(self, frame: FrameType | None) -> None:
        """Raise the stop at ``frame``'s next instruction (a one-shot trace function)."""
        if (
            frame is None
            or frame.f_code in _BOUNDARY
            or threading.current_thread() is not (self._thread)
        ):
            return  # the kicker raises it again later
        if self._armed is frame:
            return
        self._disarm()
        self.redelivered += 1
        current = sys.gettrace()
        if not self._had_trace:
            self._had_trace = current is not None
            self._old_trace = current
        frame.f_trace = self._on_trace
        frame.f_trace_opcodes = True
        # Tracing must be on in this thread for f_trace to be called; new frames are not
        # traced (the global function returns None), so only `frame` pays for it.
        sys.settrace(_no_trace)
        self._armed = frame

    @defer_stop
    def _disarm(self) -> None:
        frame, self._armed = self._armed, None
        if frame is None:
            return
        frame.f_trace = None
        frame.f_trace_opcodes = False
        if sys.gettrace() is _no_trace:
            sys.settrace(self._old_trace)

    @defer_stop
    def _on_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        self._disarm()
        self._raise_if_pending()
        return None


@defer_stop
def _no_trace(frame: FrameType, event: str, arg: Any) -> None:
    return None


@defer_stop
def _outermost_unsafe(frame: FrameType | None) -> FrameType | None:
    """The outermost frame on the stack a stop must not be raised in, or None."""
    outer = None
    while frame is not None:
        code = frame.f_code
        if code in _PROTECTED or code.co_name == "__del__":
            outer = frame
        frame = frame.f_back
    return outer


def raise_in_thread(thread: threading.Thread, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` asynchronously in ``thread``; None cancels one still pending.

    It takes effect at the thread's next Python bytecode, not inside a blocking C call.
    """
    import ctypes

    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident),
            ctypes.py_object(exc_type) if exc_type is not None else ctypes.c_void_p(None),
        )
