"""The emulator's Plugin Settings storage: defaults, on-disk plugin JSON, unified storage.

Precedence follows the agent's documentation: unified storage (policy or ``PUT``) first, then
the plugin's JSON on disk, then compiled defaults. The emulator's layers:

* **defaults**: ``broker.host``, ``broker.port`` and ``broker.tls`` of its own broker, under
  ``KeeperPrivilegeManager``;
* **disk**: ``<plugins dir>/<name>.json``, read at start and on ``revert``/``revert-all``.
  The settings are the file's ``settings`` (or ``Settings``) object when it has one, else the
  whole object; nested objects are flattened with ``.`` and every value becomes a string;
* **unified**: what ``PUT`` wrote, over the policy values (``--setting``) which the emulator
  treats like policy-delivered settings: ``revert`` drops the ``PUT`` values of a plugin but
  re-applies its policy values.

Emulator conventions where the agent's shape is undocumented (see agent-facts.md):

* ``GET /{plugin}/{setting}`` answers the value as a bare JSON string;
* ``PUT`` takes ``{"value": x}`` (any letter case of ``value``) or a bare JSON scalar;
* ``GET /{plugin}/status`` answers ``{"pluginName", "hash", "changed", "changedKeys",
  "lastModified"}``: ``hash`` is the SHA-256 of the merged map, ``changed`` says whether
  unified storage differs from the on-disk JSON.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["AGENT_PLUGIN", "SettingsStore", "flatten_settings", "setting_text"]

#: The plugin name whose merged settings hold the broker address.
AGENT_PLUGIN = "KeeperPrivilegeManager"


def setting_text(value: Any) -> str:
    """A JSON scalar as the agent's flat map writes it (``true``, ``8675``, ``text``)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value)


def flatten_settings(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested objects into ``a.b`` keys with string values (lists as JSON text).

    ``null`` values are left out (the merged map holds strings only).
    """
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if value is None:
            # null means "not set": left out, as the runtime client drops null keys too.
            continue
        if isinstance(value, Mapping):
            out.update(flatten_settings(value, prefix=name + "."))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = setting_text(value)
    return out


class SettingsStore:
    """Thread-safe plugin settings with the agent's layers (see the module docstring).

    Args:
        plugins_dir: Directory of ``<name>.json`` files (may not exist).
        defaults: Compiled defaults per plugin name.
        policy: Policy values per plugin name (``--setting``), re-applied on revert.
    """

    def __init__(
        self,
        plugins_dir: Path | None,
        *,
        defaults: Mapping[str, Mapping[str, str]] | None = None,
        policy: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.plugins_dir = plugins_dir
        self._lock = threading.RLock()
        self._defaults: dict[str, dict[str, str]] = {
            k: dict(v) for k, v in (defaults or {}).items()
        }
        self._policy: dict[str, dict[str, str]] = {k: dict(v) for k, v in (policy or {}).items()}
        self._disk: dict[str, dict[str, str]] = {}
        self._unified: dict[str, dict[str, str]] = {}
        self._modified: dict[str, float] = {}
        self.load_errors: list[str] = []
        self.revert_all()

    # --- layers ---------------------------------------------------------------------------

    def set_default(self, plugin: str, key: str, value: str) -> None:
        """Set a compiled default (the emulator's broker address)."""
        with self._lock:
            self._defaults.setdefault(plugin, {})[key] = value

    def set_policy(self, plugin: str, key: str, value: str) -> None:
        """Set a policy value (like ``--setting``): in unified storage, survives revert."""
        with self._lock:
            self._policy.setdefault(plugin, {})[key] = value
            self._unified.setdefault(plugin, {})[key] = value
            self._modified[plugin] = time.time()

    def _read_disk(self, plugin: str) -> dict[str, str] | None:
        if self.plugins_dir is None:
            return None
        path = self.plugins_dir / f"{plugin}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            self.load_errors.append(f"{path}: {exc}")
            return None
        if not isinstance(data, dict):
            self.load_errors.append(f"{path}: not a JSON object")
            return None
        section = data.get("settings", data.get("Settings", data))
        return flatten_settings(section) if isinstance(section, dict) else {}

    def _disk_names(self) -> list[str]:
        if self.plugins_dir is None or not self.plugins_dir.is_dir():
            return []
        return sorted(p.stem for p in self.plugins_dir.glob("*.json"))

    # --- the six endpoints ----------------------------------------------------------------

    def known(self, plugin: str) -> bool:
        """Whether ``plugin`` is in the emulator's plugin registry (else the API answers 404)."""
        with self._lock:
            return (
                plugin in self._defaults
                or plugin in self._disk
                or plugin in self._unified
                or plugin in self._policy
            )

    def plugins(self) -> list[str]:
        """Every known plugin name."""
        with self._lock:
            names = set(self._defaults) | set(self._disk) | set(self._unified)
            return sorted(names | set(self._policy))

    def merged(self, plugin: str) -> dict[str, str]:
        """The merged effective settings of ``plugin`` (empty when unknown)."""
        with self._lock:
            out = dict(self._defaults.get(plugin, {}))
            out.update(self._disk.get(plugin, {}))
            out.update(self._unified.get(plugin, {}))
            return out

    def get(self, plugin: str, key: str) -> str | None:
        """One merged value, or None."""
        return self.merged(plugin).get(key)

    def put(self, plugin: str, key: str, value: Any) -> None:
        """Write ``value`` into unified storage (converted to the agent's string form)."""
        with self._lock:
            self._unified.setdefault(plugin, {})[key] = setting_text(value)
            self._modified[plugin] = time.time()

    def revert(self, plugin: str) -> None:
        """Re-import ``plugin``'s on-disk JSON into unified storage (policy re-applied)."""
        with self._lock:
            disk = self._read_disk(plugin)
            if disk is None:
                self._disk.pop(plugin, None)
            else:
                self._disk[plugin] = disk
            self._unified[plugin] = dict(disk or {})
            self._unified[plugin].update(self._policy.get(plugin, {}))
            self._modified[plugin] = time.time()

    def revert_all(self) -> None:
        """Re-import every plugin's on-disk JSON."""
        with self._lock:
            self.load_errors.clear()
            names: Iterable[str] = set(self._disk_names()) | set(self._unified) | set(self._policy)
            self._disk.clear()
            for name in sorted(names):
                self.revert(name)

    def status(self, plugin: str) -> dict[str, Any]:
        """The emulator's status object (shape undocumented by the agent)."""
        with self._lock:
            merged = self.merged(plugin)
            digest = hashlib.sha256(
                json.dumps(merged, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest()
            disk = self._disk.get(plugin, {})
            unified = self._unified.get(plugin, {})
            changed_keys = sorted(k for k, v in unified.items() if disk.get(k) != v)
            modified = self._modified.get(plugin)
            return {
                "pluginName": plugin,
                "hash": digest,
                "changed": bool(changed_keys),
                "changedKeys": changed_keys,
                "lastModified": (
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(modified)) if modified else None
                ),
            }
