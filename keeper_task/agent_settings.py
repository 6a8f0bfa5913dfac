"""A typed view of the agent's merged settings (the ``KeeperPrivilegeManager`` string map).

``GET /api/PluginSettings/KeeperPrivilegeManager`` answers a flat JSON object whose values are
all strings. Only ``broker.host`` and ``broker.port`` are documented; every other key is kept
in :attr:`AgentSettings.raw`, untouched, because other keys appear depending on the agent
version and policy.

Error messages name the key and what is wrong with it, never a value: values of the agent's
settings are not ours to print.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import Any, overload

from keeper_task.errors import SettingsError

__all__ = [
    "BROKER_HOST_KEY",
    "BROKER_PORT_KEY",
    "BROKER_TLS_KEY",
    "DEFAULT_BROKER_HOST",
    "DEFAULT_BROKER_PORT",
    "AgentSettings",
]

#: Documented key of the broker's host.
BROKER_HOST_KEY = "broker.host"
#: Documented key of the broker's port (a string holding an integer).
BROKER_PORT_KEY = "broker.port"
#: Our development-broker convention, not an agent key: ``false`` means plain TCP.
BROKER_TLS_KEY = "broker.tls"
#: The agent's documented broker address, used when its key is absent.
DEFAULT_BROKER_HOST = "127.0.0.1"
DEFAULT_BROKER_PORT = 8675

_DIGITS = re.compile(r"[0-9]+")
_FALSE = frozenset({"false", "0", "no", "off"})
_TRUE = frozenset({"true", "1", "yes", "on"})


class AgentSettings:
    """The agent's settings with the broker fields typed; build it with :meth:`from_map`.

    A plain immutable class rather than a pydantic model: it is built once per run and a
    model class costs ~10 ms of import time in every task binary's cold start.

    Attributes:
        broker_host: ``broker.host``; ``"127.0.0.1"`` (the agent's documented default) when
            absent.
        broker_port: ``broker.port`` as an int in 1-65535; 8675 (documented default) when
            absent.
        broker_tls: False only when ``broker.tls`` is ``false``/``0``/``no``/``off`` (any
            case). ``broker.tls`` is **not** a documented agent key: the agent's broker always
            speaks TLS. It is keeper-task's convention for development brokers that speak
            plain TCP (the emulator sets it).
        raw: Every key of the map, unknown ones included, read-only.

    Example:
        >>> s = AgentSettings.from_map({"broker.host": "127.0.0.1", "broker.port": "8675"})
        >>> (s.broker_host, s.broker_port, s.broker_tls)
        ('127.0.0.1', 8675, True)
    """

    __slots__ = ("broker_host", "broker_port", "broker_tls", "raw")

    broker_host: str
    broker_port: int
    broker_tls: bool
    raw: Mapping[str, str]

    def __init__(
        self,
        *,
        broker_host: Any = DEFAULT_BROKER_HOST,
        broker_port: Any = DEFAULT_BROKER_PORT,
        broker_tls: Any = True,
        raw: Mapping[str, str] | None = None,
    ) -> None:
        """Validate and store the fields (keyword arguments only).

        Raises:
            SettingsError: A field is invalid; the message names the agent's key.
        """
        for name, value in (
            ("broker_host", _check_host(broker_host)),
            ("broker_port", _check_port(broker_port)),
            ("broker_tls", _check_tls(broker_tls)),
            ("raw", types.MappingProxyType(dict(raw or {}))),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def from_map(cls, mapping: Mapping[str, Any]) -> AgentSettings:
        """Build the view from the agent's flat map (``PluginSettingsClient.get_all``).

        Numbers and booleans are accepted as values and kept as their JSON text.

        Raises:
            SettingsError: A broker key holds an invalid value, or a value is not a scalar.
        """
        raw: dict[str, str] = {}
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise SettingsError(
                    f"agent setting keys must be strings, got a {type(key).__name__}"
                )
            raw[key] = _text(key, value)
        fields: dict[str, Any] = {"raw": raw}
        if BROKER_HOST_KEY in raw:
            fields["broker_host"] = raw[BROKER_HOST_KEY]
        if BROKER_PORT_KEY in raw:
            fields["broker_port"] = raw[BROKER_PORT_KEY]
        if BROKER_TLS_KEY in raw:
            fields["broker_tls"] = raw[BROKER_TLS_KEY]
        return cls(**fields)

    @overload
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    @overload
    def get(self, key: str, default: None) -> str | None: ...

    def get(self, key: str, default: str | None = None) -> str | None:
        """Return the raw string value of ``key``, or ``default`` when absent."""
        return self.raw.get(key, default)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"AgentSettings is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"AgentSettings is frozen: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AgentSettings):
            return NotImplemented
        return (self.broker_host, self.broker_port, self.broker_tls, dict(self.raw)) == (
            other.broker_host,
            other.broker_port,
            other.broker_tls,
            dict(other.raw),
        )

    def __hash__(self) -> int:
        return hash((self.broker_host, self.broker_port, self.broker_tls))

    def __repr__(self) -> str:
        # The raw map's values stay out: reprs end up in logs.
        return (
            f"AgentSettings(broker_host={self.broker_host!r}, broker_port={self.broker_port}, "
            f"broker_tls={self.broker_tls}, raw=<{len(self.raw)} keys>)"
        )


def _check_host(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingsError(f"agent setting {BROKER_HOST_KEY} must be a string")
    host = value.strip()
    if not host or any(ch.isspace() for ch in host):
        raise SettingsError(
            f"agent setting {BROKER_HOST_KEY} is empty or contains spaces; expected a "
            "host name or IP address"
        )
    return host


def _check_port(value: Any) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"agent setting {BROKER_PORT_KEY} is a boolean, not a port")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        port = int(value.strip())
    else:
        raise SettingsError(
            f"agent setting {BROKER_PORT_KEY} is not an integer; expected a port number 1-65535"
        )
    if port < 1:
        raise SettingsError(
            f"agent setting {BROKER_PORT_KEY} is below 1; expected a port number 1-65535"
        )
    if port > 65535:
        raise SettingsError(
            f"agent setting {BROKER_PORT_KEY} is above 65535; expected a port number 1-65535"
        )
    return port


def _check_tls(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _FALSE:
        return False
    if word in _TRUE:
        return True
    raise SettingsError(f"setting {BROKER_TLS_KEY} must be one of true/false, 1/0, yes/no, on/off")


def _text(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise SettingsError(f"agent setting {key} holds a {type(value).__name__}; expected a string")
