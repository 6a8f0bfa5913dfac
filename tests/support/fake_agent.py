"""A fake agent for runtime tests: real HTTPS (trustme) serving the Plugin Settings map."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import trustme

from tests.support.https import HttpsServer, Request, Response


@dataclass
class Faults:
    """Scripted answers: the first `forbidden` GETs get 403, then `status` is answered."""

    forbidden: int = 0
    status: int = 200
    body: Any = None
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeAgent(HttpsServer):
    """HTTPS server answering GET /api/PluginSettings/<name> with a broker address."""

    def __init__(self, ca: trustme.CA, settings: dict[str, str]) -> None:
        super().__init__(ca)
        self.settings = settings
        self.faults = Faults()
        self.route("GET", r"/api/PluginSettings/KeeperPrivilegeManager", self._merged)

    def _merged(self, _req: Request) -> Response:
        with self.faults.lock:
            self.faults.seen += 1
            if self.faults.seen <= self.faults.forbidden:
                return Response(403, {"error": "not trusted"})
        if self.faults.status != 200:
            return Response(self.faults.status, self.faults.body)
        return Response(200, self.faults.body if self.faults.body is not None else self.settings)
