"""Redaction: no secret value reaches stderr or KeeperLogger, in any container, at any depth."""

from __future__ import annotations

import dataclasses
import io
import json
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from keeper_task.agent_settings import AgentSettings
from keeper_task.emulator import Emulator
from keeper_task.emulator.settings_store import AGENT_PLUGIN
from keeper_task.logging import (
    MAX_DEPTH,
    MAX_NODES,
    REDACTED,
    configure_logging,
    redact,
    redacted_traceback,
)
from keeper_task.testing import run_task

MARK = "SEKRIT"  # every generated secret starts with it; nothing else contains it

SECRET_KEYS = [
    "password",
    "db_passwd",
    "api.token",
    "refreshToken",
    "X-Api-Key",
    "apikey",
    "accessKey",
    "client_secret",
    "Authorization",
    "cookie",
    "private_key",
    "key",
    "credentials",
]
PLAIN_KEYS = ["user", "item", "count", "note", "host", "monkey", "keyboard", "raw"]


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


# -- the container types a secret may hide in --------------------------------------------


class Creds(BaseModel):
    user: str = "bob"
    token: str  # secret by its name


class Hidden(BaseModel):
    pin: str = Field(repr=False)  # secret by its marker, not by its name


class Wrapped(BaseModel):
    value: SecretStr


class Box(BaseModel):
    inner: Any


class Extra(BaseModel):
    model_config = ConfigDict(extra="allow")


class Conf(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEEPER_TEST_REDACTION_")
    api_key: str = "unset"


class Declared(BaseSettings):
    """secret_fields, the TaskSettings convention, is honoured on any settings class."""

    model_config = SettingsConfigDict(env_prefix="KEEPER_TEST_REDACTION_")
    secret_fields: ClassVar[frozenset[str]] = frozenset({"pin"})
    pin: str = "unset"


@dataclasses.dataclass
class DC:
    user: str
    password: Any


@dataclasses.dataclass
class DCHidden:
    pin: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Frozen:
    token: str


@dataclasses.dataclass
class DCBox:
    inner: Any


class Pair(NamedTuple):
    user: str
    token: str


class Obj:
    """A plain object whose repr shows its secret attribute."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"Obj(token={self.token})"

    __str__ = __repr__


class Slotted:
    __slots__ = ("secret",)

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return f"Slotted({self.secret})"


class ObjBox:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"ObjBox({self.inner!r})"

    __str__ = __repr__


class MyMapping(Mapping[str, Any]):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"MyMapping({self._data!r})"


class AuthError(Exception):
    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.token = token

    def __str__(self) -> str:
        return f"{self.args[0]} (token {self.token})"


def _extra(secret: str) -> Extra:
    return Extra(session_token=secret)  # type: ignore[call-arg]


secrets_ = st.text(alphabet="abcdefghij0123456789", min_size=6, max_size=12).map(lambda s: MARK + s)
secret_keys = st.sampled_from(SECRET_KEYS)
plain_keys = st.sampled_from(PLAIN_KEYS)
plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.text(alphabet="xyz _-.", max_size=8),
)

#: Values that hold one secret directly.
secret_atoms = st.one_of(
    st.builds(lambda k, s: {k: s}, secret_keys, secrets_),
    st.builds(lambda s: Creds(token=s), secrets_),
    st.builds(lambda s: Hidden(pin=s), secrets_),
    st.builds(lambda s: Wrapped(value=SecretStr(s)), secrets_),
    st.builds(lambda s: Conf(api_key=s), secrets_),
    st.builds(lambda s: Declared(pin=s), secrets_),
    st.builds(_extra, secrets_),
    st.builds(lambda s: DC(user="bob", password=s), secrets_),
    st.builds(DCHidden, secrets_),
    st.builds(Frozen, secrets_),
    st.builds(lambda s: Pair("bob", s), secrets_),
    st.builds(Obj, secrets_),
    st.builds(Slotted, secrets_),
    st.builds(lambda s: AgentSettings.from_map({"api.token": s, "broker.host": "h"}), secrets_),
    st.builds(lambda s: AgentSettings.from_map({"api.token": s}).raw, secrets_),
    st.builds(lambda k, s: ValueError({k: s}), secret_keys, secrets_),
    st.builds(lambda s: AuthError("denied", s), secrets_),
    st.builds(lambda s: SecretStr(s), secrets_),
)
#: Hashable values holding a secret (members of sets).
hashable_atoms = st.one_of(
    st.builds(Frozen, secrets_),
    st.builds(lambda s: Pair("bob", s), secrets_),
    st.tuples(st.builds(Frozen, secrets_), plain),
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    small = {"max_size": 3}
    return st.one_of(
        st.lists(children, **small),
        st.lists(children, **small).map(tuple),
        st.lists(children, **small).map(deque),
        st.lists(st.lists(children, **small), **small),  # lists nested in lists
        st.dictionaries(plain_keys, children, **small),
        st.dictionaries(plain_keys, children, **small).map(OrderedDict),
        st.dictionaries(plain_keys, children, **small).map(MappingProxyType),
        st.dictionaries(plain_keys, children, **small).map(MyMapping),
        st.builds(lambda k, v: {k: v}, secret_keys, children),  # a container under a secret key
        st.lists(hashable_atoms, **small).map(set),
        st.lists(hashable_atoms, **small).map(frozenset),
        children.map(lambda c: Box(inner=c)),
        children.map(DCBox),
        children.map(ObjBox),
        children.map(lambda c: RuntimeError("failed", c)),
    )


values = st.recursive(st.one_of(plain, secret_atoms), _containers, max_leaves=10)


def _log_everywhere(fmt: str, value: Any, key: str, secret: str) -> tuple[str, bytes]:
    """Log ``value`` every way a task can; return (stderr text, KeeperLogger payloads)."""
    err = io.StringIO()
    pipeline = configure_logging(fmt=fmt, stream=err)  # type: ignore[arg-type]
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    log = pipeline.get_logger()
    log.info("as.field", data=value, **{key: secret})
    log.bind(ctx=value).info("as.bound")
    log.info(value)  # as the event itself
    structlog.get_logger("lib").warning("via.structlog", data=[value])
    try:
        raise RuntimeError("failed", value)
    except RuntimeError:
        log.exception("as.exception")
    try:
        try:
            raise ValueError({key: secret})
        except ValueError as inner:
            raise RuntimeError("outer", value) from inner
    except RuntimeError as exc:
        log.error("as.exc_info", exc_info=exc)
    pipeline.detach()
    return err.getvalue(), b"\n".join(sent)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(value=values, key=secret_keys, secret=secrets_, fmt=st.sampled_from(["json", "console"]))
def test_no_generated_secret_reaches_either_output(
    value: Any, key: str, secret: str, fmt: str
) -> None:
    """Property: a secret under a secret-looking key, or marked secret by its type, in any
    container type and nesting, never reaches stderr nor the KeeperLogger payload."""
    out, payloads = _log_everywhere(fmt, value, key, secret)
    assert MARK not in out
    assert MARK.encode() not in payloads
    assert REDACTED in out  # the top-level secret field at least
    assert len(payloads.splitlines()) == 6  # every event was published


def test_the_property_test_would_see_a_leak() -> None:
    """The same outputs without the processor do show the secrets (the test has teeth)."""
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    pipeline.processors.remove(pipeline.processors[0])
    pipeline.get_logger().info("x", data=MappingProxyType({"api.token": MARK + "1"}))
    assert MARK in err.getvalue()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (OrderedDict(token="t", user="u"), {"token": REDACTED, "user": "u"}),
        (MappingProxyType({"api.token": "t", "a": 1}), {"api.token": REDACTED, "a": 1}),
        ([[{"password": "p"}]], [[{"password": REDACTED}]]),
        (({"secret": "s"},), ({"secret": REDACTED},)),
        (Pair("u", "t"), {"user": "u", "token": REDACTED}),
        ({Frozen("t")}, [{"token": REDACTED}]),
        (deque([{"cookie": "c"}]), [{"cookie": REDACTED}]),
        (Creds(token="t"), {"user": "bob", "token": REDACTED}),
        (Hidden(pin="1234"), {"pin": REDACTED}),
        (Wrapped(value=SecretStr("s")), {"value": REDACTED}),
        (Declared(pin="1234"), {"pin": REDACTED}),
        (DC(user="u", password="p"), {"user": "u", "password": REDACTED}),
        (DCHidden(pin="1"), {"pin": REDACTED}),
        (Obj("t"), {"token": REDACTED}),
        (Slotted("s"), {"secret": REDACTED}),
        (ValueError({"token": "t"}), "{'token': '[redacted]'}"),
        (AuthError("denied", "t"), "denied"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_each_container_type_is_redacted(value: Any, expected: Any) -> None:
    """Each container type becomes plain data with the secret replaced; the caller's value
    is not changed."""
    before = repr(value)
    assert redact(value) == expected
    assert repr(value) == before


def test_values_without_secrets_keep_their_text() -> None:
    """Objects that hold no secret are left alone (shown as their str()), scalars too."""
    path = Path("/tmp/x")
    err = ValueError("plain")
    assert redact(path) is path
    assert redact(err) is err
    assert redact(AgentSettings.from_map({"broker.host": "h"})) is not None
    assert redact({"user": "bob", "n": 1.5}) == {"user": "bob", "n": 1.5}


def test_agent_settings_raw_is_redacted_but_other_keys_shown() -> None:
    """AgentSettings.raw (a MappingProxyType): secret keys redacted, the others shown."""
    raw = AgentSettings.from_map({"api.token": "tok-1", "broker.host": "h"}).raw
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err)
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    pipeline.get_logger().info("settings", raw=raw)
    (doc,) = [json.loads(line) for line in err.getvalue().splitlines()]
    assert doc["properties"]["raw"] == {"api.token": REDACTED, "broker.host": "h"}
    assert json.loads(sent[0]) == doc


def test_cycles_are_cut_and_do_not_hang() -> None:
    """A value containing itself is shown once, the repeat as "[cycle]"; secrets redacted."""
    loop: dict[str, Any] = {"token": "t", "user": "u"}
    loop["self"] = loop
    items: list[Any] = [{"password": "p"}]
    items.append(items)
    assert redact(loop) == {"token": REDACTED, "user": "u", "self": "[cycle]"}
    assert redact(items) == [{"password": REDACTED}, "[cycle]"]
    box = ObjBox(None)
    box.inner = [box, {"secret": "s"}]  # an object in a cycle with a secret below it
    assert redact(box) == {"inner": ["[cycle]", {"secret": REDACTED}]}


def test_deep_nesting_is_bounded_and_hides_what_is_cut() -> None:
    """Containers deeper than MAX_DEPTH become "[too deep]" (content not shown); a value
    nested 100,000 levels deep is logged without RecursionError."""
    deep: Any = {"token": "deep-secret"}
    for _ in range(100_000):
        deep = [deep]
    err = io.StringIO()
    configure_logging(fmt="json", stream=err).get_logger().info("deep", value=deep)
    (doc,) = [json.loads(line) for line in err.getvalue().splitlines()]
    value = doc["properties"]["value"]
    levels = 0
    while isinstance(value, list):
        (value,) = value
        levels += 1
    assert (levels, value) == (MAX_DEPTH, "[too deep]")
    assert "deep-secret" not in err.getvalue()


def test_huge_containers_are_truncated_after_max_nodes() -> None:
    """After MAX_NODES items the rest is "[truncated]": a 10**9-item sequence is not walked."""
    out = redact(range(10**9))
    assert len(out) == MAX_NODES + 1 and out[-1] == "[truncated]"
    assert out[:3] == [0, 1, 2]


def test_redacted_traceback_hides_args_in_the_whole_chain() -> None:
    """exc_info tracebacks: messages of the exception, its cause and context are redacted."""
    inner_secret, outer_secret = "inner-" + "secret", "outer-" + "secret"
    try:
        try:
            raise KeyError({"password": inner_secret})
        except KeyError as inner:
            raise AuthError("denied", outer_secret) from inner
    except AuthError as exc:
        text = redacted_traceback(exc)
    assert "inner-secret" not in text and "outer-secret" not in text
    assert "AuthError: denied" in text
    assert "{'password': '[redacted]'}" in text
    assert "The above exception was the direct cause" in text


def test_unwalkable_values_never_fail_the_log_call() -> None:
    """A Mapping whose items() raises is shown as <unloggable ...>, the event still logged."""

    class Broken(MyMapping):
        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("no")

    err = io.StringIO()
    configure_logging(fmt="json", stream=err).get_logger().info("x", value=Broken({}))
    (doc,) = [json.loads(line) for line in err.getvalue().splitlines()]
    assert doc["properties"]["value"] == "<unloggable Broken>"


# -- across a real process and the emulator's broker --------------------------------------

LEAKY_TASK = """
import dataclasses
from keeper_task import Task


@dataclasses.dataclass
class Probe:
    note: str
    settings: object


class Leaky(Task):
    def run(self, ctx):
        raw = ctx.agent_settings.raw
        ctx.log.info("raw.settings", raw=raw)
        ctx.log.info("nested", items=[[raw]], pair=(raw,), probe=Probe("p", ctx.agent_settings))
        ctx.log.info("settings.object", settings=ctx.settings, agent=ctx.agent_settings)
        try:
            raise RuntimeError("lookup failed", dict(raw))
        except RuntimeError:
            ctx.log.exception("with.traceback")


if __name__ == "__main__":
    Leaky.main()
"""


def test_agent_settings_token_reaches_neither_stderr_nor_the_broker(
    keeper_agent: Emulator, tmp_path: Path
) -> None:
    """A task (its own process) logs ctx.agent_settings.raw holding api.token, in several
    containers and in an exception: the token is on neither stderr nor KeeperLogger."""
    token = "tok-" + "9f8e7d6c5b4a"
    keeper_agent.settings.set_policy(AGENT_PLUGIN, "api.token", token)
    keeper_agent.settings.set_policy(AGENT_PLUGIN, "visible.setting", "shown-value")
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY_TASK)
    result = run_task(keeper_agent, script, env={"KEEPER_TASK_LOG_FORMAT": "json"})
    assert result.exit_code == 0, result.stderr
    received = json.dumps(result.logs)
    messages = [log["message"] for log in result.logs]
    for name in ("raw.settings", "nested", "settings.object", "with.traceback"):
        assert name in messages, messages
    assert token not in result.stderr
    assert token not in received
    raw = result.log("raw.settings")["properties"]["raw"]
    assert raw["api.token"] == REDACTED
    assert raw["visible.setting"] == "shown-value"  # non-secret values are shown
    assert "[redacted]" in result.log("with.traceback")["exception"]
