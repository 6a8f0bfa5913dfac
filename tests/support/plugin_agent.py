"""A fake Plugin Settings API on the real HTTPS test server, with failure injection.

Serves the six ``/api/PluginSettings`` endpoints from an in-memory store and can answer a
chosen status for the next N requests (or forever), or hold requests until released (for
client timeouts).
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import unquote

from tests.support.https import HttpsServer, Request, Response

PREFIX = "/api/PluginSettings"
SEG = r"([^/]+)"


class PluginSettingsAgent:
    """Plugin Settings routes on ``server``; ``plugins`` maps plugin name to its settings.

    Attributes:
        plugins: The store; PUT writes into it.
        puts: ``(plugin, setting, parsed body)`` for each PUT.
        reverts: Plugin names reverted; ``"*"`` for revert-all.
    """

    def __init__(self, server: HttpsServer, plugins: dict[str, dict[str, Any]]) -> None:
        self.server = server
        self.plugins = plugins
        self.puts: list[tuple[str, str, Any]] = []
        self.reverts: list[str] = []
        self.status_body: Any = {"changed": False, "hash": "abc123"}
        self.setting_response: Response | None = None
        self._lock = threading.Lock()
        self._fail: Response | None = None
        self._fail_left: int | None = None
        self.release = threading.Event()
        self._hang = False
        # Later routes win (HttpsServer.route inserts first), so the most specific go last.
        server.route("GET", PREFIX + "/" + SEG, self._gated(self._get_all))
        server.route("GET", PREFIX + "/" + SEG + "/" + SEG, self._gated(self._get_one))
        server.route("PUT", PREFIX + "/" + SEG + "/" + SEG, self._gated(self._put))
        server.route("GET", PREFIX + "/" + SEG + "/status", self._gated(self._status))
        server.route("POST", PREFIX + "/" + SEG + "/revert", self._gated(self._revert))
        server.route("POST", PREFIX + "/revert-all", self._gated(self._revert_all))

    # --- failure injection --------------------------------------------------------------------

    def fail(self, status: int, *, count: int | None = None, body: Any = None) -> None:
        """Answer ``status`` to the next ``count`` requests (``None``: to every request)."""
        with self._lock:
            self._fail = Response(status, body if body is not None else {"error": status})
            self._fail_left = count

    def hang(self) -> None:
        """Hold every request until :attr:`release` is set (the client times out first)."""
        self._hang = True

    @property
    def requests(self) -> list[Request]:
        return list(self.server.requests)

    def _gated(self, handler: Any) -> Any:
        def gate(req: Request) -> Response:
            if self._hang:
                self.release.wait(10)
                return Response(503, {"error": "released"})
            with self._lock:
                if self._fail is not None and (self._fail_left is None or self._fail_left > 0):
                    if self._fail_left is not None:
                        self._fail_left -= 1
                    return self._fail
            return handler(req)

        return gate

    # --- endpoints ------------------------------------------------------------------------------

    def _plugin(self, req: Request) -> tuple[str, dict[str, Any] | None]:
        assert req.match is not None
        name = unquote(req.match.group(1))
        return name, self.plugins.get(name)

    def _get_all(self, req: Request) -> Response:
        _name, store = self._plugin(req)
        if store is None:
            return Response(404, {"error": "plugin not found"})
        return Response(200, dict(store))

    def _get_one(self, req: Request) -> Response:
        _name, store = self._plugin(req)
        assert req.match is not None
        setting = unquote(req.match.group(2))
        if store is None or setting not in store:
            return Response(404, {"error": "not found"})
        if self.setting_response is not None:
            return self.setting_response
        return Response(200, store[setting])

    def _put(self, req: Request) -> Response:
        name, store = self._plugin(req)
        assert req.match is not None
        setting = unquote(req.match.group(2))
        if store is None:
            return Response(404, {"error": "plugin not found"})
        body = req.json()
        self.puts.append((name, setting, body))
        store[setting] = body.get("value") if isinstance(body, dict) else body
        return Response(200, {"ok": True})

    def _status(self, req: Request) -> Response:
        _name, store = self._plugin(req)
        if store is None:
            return Response(404, {"error": "plugin not found"})
        return Response(200, self.status_body)

    def _revert(self, req: Request) -> Response:
        name, store = self._plugin(req)
        if store is None:
            return Response(404, {"error": "plugin not found"})
        self.reverts.append(name)
        return Response(200, None)

    def _revert_all(self, req: Request) -> Response:
        self.reverts.append("*")
        return Response(200, None)
