"""Tests of AgentSettings, the typed view of the KeeperPrivilegeManager settings map."""

from __future__ import annotations

import pytest

from keeper_task.agent_settings import AgentSettings
from keeper_task.errors import SettingsError
from keeper_task.exit_codes import ExitCode

SECRET = "hunter2-do-not-echo"


def test_documented_defaults_apply_when_keys_are_absent():
    """An empty map gives the agent's documented broker 127.0.0.1:8675 with TLS."""
    s = AgentSettings.from_map({})
    assert (s.broker_host, s.broker_port, s.broker_tls) == ("127.0.0.1", 8675, True)
    assert dict(s.raw) == {}


def test_broker_keys_are_typed():
    """broker.host and broker.port become a str and an int."""
    s = AgentSettings.from_map({"broker.host": " localhost ", "broker.port": " 18883 "})
    assert s.broker_host == "localhost"
    assert s.broker_port == 18883


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("abc", "is not an integer"),
        ("", "is not an integer"),
        ("86.75", "is not an integer"),
        ("8_675", "is not an integer"),
        ("-1", "is not an integer"),
        ("0", "is below 1"),
        ("65536", "is above 65535"),
        ("999999999999", "is above 65535"),
    ],
)
def test_invalid_port_names_the_key_and_the_problem_but_no_values(value, problem):
    """A bad broker.port is a SettingsError naming the key; it echoes no setting value."""
    with pytest.raises(SettingsError) as info:
        AgentSettings.from_map({"broker.port": value, "api.token": SECRET})
    message = str(info.value)
    assert "broker.port" in message
    assert problem in message
    assert SECRET not in message
    assert info.value.exit_code == ExitCode.BAD_SETTINGS


@pytest.mark.parametrize("port", ["1", "65535"])
def test_port_range_edges_are_accepted(port):
    """1 and 65535 are valid ports."""
    assert AgentSettings.from_map({"broker.port": port}).broker_port == int(port)


def test_unknown_keys_are_kept_read_only():
    """Every key of the map survives in raw, which cannot be modified."""
    s = AgentSettings.from_map({"broker.port": "8675", "policy.x": "1", "log.level": "Warning"})
    assert dict(s.raw) == {"broker.port": "8675", "policy.x": "1", "log.level": "Warning"}
    assert s.get("policy.x") == "1"
    assert s.get("missing") is None
    assert s.get("missing", "dflt") == "dflt"
    with pytest.raises(TypeError):
        s.raw["policy.x"] = "2"  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("true", True),
        ("1", True),
        ("Yes", True),
    ],
)
def test_broker_tls_convention(value, expected):
    """broker.tls (our dev-broker convention) turns TLS off only for false/0/no/off."""
    assert AgentSettings.from_map({"broker.tls": value}).broker_tls is expected


def test_unrecognised_broker_tls_is_an_error():
    """A broker.tls word that is neither true nor false is refused, not guessed."""
    with pytest.raises(SettingsError, match=r"broker\.tls must be one of"):
        AgentSettings.from_map({"broker.tls": "maybe"})


def test_empty_broker_host_is_an_error():
    """A present but empty broker.host is a SettingsError naming the key."""
    with pytest.raises(SettingsError, match=r"broker\.host is empty"):
        AgentSettings.from_map({"broker.host": "  "})


def test_numbers_and_booleans_are_accepted_as_their_text():
    """from_map takes JSON scalars too and keeps them as the agent's string spelling."""
    s = AgentSettings.from_map({"broker.port": 1883, "broker.tls": False, "ratio": 0.5})
    assert (s.broker_port, s.broker_tls) == (1883, False)
    assert dict(s.raw) == {"broker.port": "1883", "broker.tls": "false", "ratio": "0.5"}


def test_nested_values_are_refused_naming_the_key():
    """A non-scalar value cannot be a setting: SettingsError naming its key."""
    with pytest.raises(SettingsError, match="agent setting deep holds a dict"):
        AgentSettings.from_map({"deep": {"x": SECRET}})


def test_repr_does_not_show_raw_values():
    """repr (which ends up in logs) leaves out the raw map's values."""
    s = AgentSettings.from_map({"api.token": SECRET})
    assert SECRET not in repr(s)


def test_direct_construction_validates_too():
    """Building the model directly applies the same port check as from_map."""
    with pytest.raises(SettingsError, match=r"broker\.port is above 65535"):
        AgentSettings(broker_port=70000)


def test_view_is_immutable():
    """The view is frozen: a setting cannot be changed after it was read."""
    s = AgentSettings.from_map({})
    with pytest.raises(AttributeError, match="frozen"):
        s.broker_port = 1  # type: ignore[misc]
