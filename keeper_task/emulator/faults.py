"""Scripted faults: make the emulator misbehave the way a real agent can.

HTTP faults apply to requests that passed the tier check and whose path starts with the
fault's ``path`` (default ``/api/PluginSettings``); each is consumed request by request:

* :meth:`Faults.forbid`: 403, as during the agent's startup registration window;
* :meth:`Faults.fail`: a 5xx status;
* :meth:`Faults.malformed_settings`: 200 with a truncated JSON body, or with a body of your
  choice (settings that parse but are wrong, e.g. ``{"broker.port": "not-a-port"}``).

Each lasts for ``requests`` requests or ``seconds`` seconds (from the call), whichever ends
first. Broker faults are methods of the emulator (``stop_broker``, ``start_broker``,
``restart_broker``) plus :meth:`Faults.restart_broker_after`, which restarts the broker once
``messages`` publishes were accepted (a restart mid-run).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["Faults", "ScriptedFault"]

# The default "malformed settings" answer: JSON cut off mid-object.
_TRUNCATED = b'{"broker.host": "127.0.0.1", "broker.port": '


@dataclass
class ScriptedFault:
    """One scripted HTTP fault (see the module docstring)."""

    kind: str  # "forbid" | "status" | "malformed"
    path: str
    status: int
    remaining: int | None
    until: float | None
    body: bytes | None = None

    def active(self, now: float) -> bool:
        """Whether the fault still applies."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        return not (self.until is not None and now >= self.until)

    def describe(self) -> str:
        """A short label for the request log."""
        return f"{self.kind} {self.status}"

    def response(self) -> web.Response:
        """The answer this fault gives."""
        if self.kind == "malformed":
            return web.Response(
                status=200,
                body=self.body or _TRUNCATED,
                content_type="application/json",
            )
        if self.kind == "forbid":
            return web.json_response(
                {
                    "error": "Forbidden",
                    "requiredTier": "Plugin",
                    "message": "Process is not Plugin-authenticated (scripted fault).",
                },
                status=403,
            )
        return web.json_response(
            {"error": "ServerError", "message": "scripted fault"}, status=self.status
        )


class Faults:
    """The emulator's fault plan. Thread-safe; every method returns immediately."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[ScriptedFault] = []
        self.broker_restart_after: int | None = None

    def _add(  # noqa: PLR0917 - one private constructor for every fault kind
        self,
        kind: str,
        status: int,
        requests: int | None,
        seconds: float | None,
        path: str,
        body: bytes | None = None,
    ) -> ScriptedFault:
        if requests is None and seconds is None:
            requests = 1
        fault = ScriptedFault(
            kind,
            path,
            status,
            requests,
            time.monotonic() + seconds if seconds is not None else None,
            body,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def forbid(
        self,
        *,
        requests: int | None = None,
        seconds: float | None = None,
        path: str = "/api/PluginSettings",
    ) -> ScriptedFault:
        """Answer 403 for the next ``requests`` requests or for ``seconds`` seconds."""
        return self._add("forbid", 403, requests, seconds, path)

    def fail(
        self,
        status: int = 500,
        *,
        requests: int | None = None,
        seconds: float | None = None,
        path: str = "/api/PluginSettings",
    ) -> ScriptedFault:
        """Answer ``status`` (a 5xx) for the next ``requests`` requests or ``seconds`` s."""
        return self._add("status", status, requests, seconds, path)

    def malformed_settings(
        self,
        *,
        requests: int | None = None,
        seconds: float | None = None,
        path: str = "/api/PluginSettings",
        body: bytes | str | Mapping[str, Any] | None = None,
    ) -> ScriptedFault:
        """Answer 200 with bad settings for the next ``requests`` requests or ``seconds``.

        Args:
            requests: How many requests get the bad answer.
            seconds: For how long (from now).
            path: Requests whose path starts with this (any letter case).
            body: The answer's JSON body (a mapping, text or bytes); default: truncated JSON.
        """
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, Mapping):
            data = json.dumps(dict(body)).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = bytes(body)
        return self._add("malformed", 200, requests, seconds, path, data)

    def restart_broker_after(self, messages: int = 1) -> None:
        """Restart the broker once ``messages`` more publishes have been accepted."""
        with self._lock:
            self.broker_restart_after = messages

    def clear(self) -> None:
        """Remove every scripted fault."""
        with self._lock:
            self._faults.clear()
            self.broker_restart_after = None

    def take(self, path: str) -> ScriptedFault | None:
        """Consume and return the first active fault for ``path`` (None when none applies)."""
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if f.active(now)]
            for fault in self._faults:
                if path.lower().startswith(fault.path.lower()):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    def count_message(self) -> bool:
        """Count one accepted publish; True when the broker should restart now."""
        with self._lock:
            if self.broker_restart_after is None:
                return False
            self.broker_restart_after -= 1
            if self.broker_restart_after > 0:
                return False
            self.broker_restart_after = None
            return True
