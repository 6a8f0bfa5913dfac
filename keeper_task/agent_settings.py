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

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

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


class AgentSettings(BaseModel):
    """The agent's settings with the broker fields typed; build it with :meth:`from_map`.

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

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    broker_host: str = DEFAULT_BROKER_HOST
    broker_port: int = Field(default=DEFAULT_BROKER_PORT, ge=1, le=65535)
    broker_tls: bool = True
    # Hidden from repr: the map holds the agent's values, and reprs end up in logs.
    raw: Mapping[str, str] = Field(default_factory=dict, repr=False)

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

    # SettingsError is not a ValueError, so pydantic lets it through unwrapped: the caller
    # gets one line naming the agent's key instead of a pydantic report naming our field.

    @field_validator("broker_host", mode="before")
    @classmethod
    def _check_host(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise SettingsError(f"agent setting {BROKER_HOST_KEY} must be a string")
        host = value.strip()
        if not host or any(ch.isspace() for ch in host):
            raise SettingsError(
                f"agent setting {BROKER_HOST_KEY} is empty or contains spaces; expected a "
                "host name or IP address"
            )
        return host

    @field_validator("broker_port", mode="before")
    @classmethod
    def _check_port(cls, value: Any) -> int:
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

    @field_validator("broker_tls", mode="before")
    @classmethod
    def _check_tls(cls, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _FALSE:
            return False
        if word in _TRUE:
            return True
        raise SettingsError(
            f"setting {BROKER_TLS_KEY} must be one of true/false, 1/0, yes/no, on/off"
        )

    @field_validator("raw", mode="after")
    @classmethod
    def _freeze_raw(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        return types.MappingProxyType(dict(value))

    @field_serializer("raw")
    def _dump_raw(self, value: Mapping[str, str]) -> dict[str, str]:
        return dict(value)


def _text(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise SettingsError(f"agent setting {key} holds a {type(value).__name__}; expected a string")
