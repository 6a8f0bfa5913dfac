"""The one MQTT topic matcher (keeper_task.topics), property-tested against a reference.

The reference below is written from the MQTT 3.1.1 text (section 4.7), independently of the
implementation: a recursive filter matcher, and "covers" checked by brute force over every
topic that can tell two filters apart.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keeper_task import mqtt as runtime_mqtt
from keeper_task.emulator import broker as emulator_broker
from keeper_task.topics import (
    MAX_TOPIC_BYTES,
    covers,
    is_valid_filter,
    is_valid_topic,
    matches,
    topic_allowed,
)

# A small alphabet so that random filters and topics collide often; "" is a legal level.
LITERALS = ["a", "b", "$s", ""]
levels_any = st.lists(st.sampled_from([*LITERALS, "+", "#", "a#", "+b"]), min_size=1, max_size=4)
levels_topic = st.lists(st.sampled_from(LITERALS), min_size=1, max_size=4).filter(
    lambda levels: levels != [""]  # the empty string is not a topic
)


def _ref_valid_filter(levels: list[str]) -> bool:
    joined = "/".join(levels)
    if not joined:
        return False
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif "#" in level or ("+" in level and level != "+"):
            return False
    return True


def _ref_match(flt: list[str], topic: list[str]) -> bool:
    """MQTT 4.7.1: '+' is exactly one level, '#' the parent and any number of children."""
    if not flt:
        return not topic
    head, rest = flt[0], flt[1:]
    if head == "#":
        return True
    if not topic:
        return False
    if head in ("+", topic[0]):
        return _ref_match(rest, topic[1:])
    return False


def ref_matches(flt: str, topic: str) -> bool:
    f_levels, t_levels = flt.split("/"), topic.split("/")
    if not _ref_valid_filter(f_levels) or not topic or "+" in topic or "#" in topic:
        return False
    # MQTT 4.7.2: a filter starting with a wildcard does not match a '$' topic.
    if t_levels[0].startswith("$") and f_levels[0] in ("+", "#"):
        return False
    return _ref_match(f_levels, t_levels)


def _witness_topics(*filters: str) -> list[str]:
    """Every topic deep enough and varied enough to separate the given filters."""
    depth = max(len(f.split("/")) for f in filters) + 1
    alphabet = sorted({*LITERALS, "z", "$z"} | {lvl for f in filters for lvl in f.split("/")})
    alphabet = [a for a in alphabet if "+" not in a and "#" not in a]
    out = []
    for n in range(1, depth + 1):
        out.extend("/".join(p) for p in itertools.product(alphabet, repeat=n))
    return [t for t in out if t]


@settings(max_examples=400)
@given(levels_any, levels_topic)
@example(["#"], ["$s", "a"])
@example(["+", "a"], ["$s", "a"])
@example(["$s", "#"], ["$s"])
@example(["a", "#"], ["a"])
@example(["#", "a"], ["#", "a"])
def test_matches_agrees_with_the_reference(flt: list[str], topic: list[str]) -> None:
    f, t = "/".join(flt), "/".join(topic)
    assert matches(f, t) == ref_matches(f, t)


@settings(max_examples=1000, deadline=None)
@given(levels_any, levels_any)
@example(["a", "#"], ["a"])
@example(["a", "+"], ["a", "#"])
@example(["#"], ["$s", "#"])
@example(["#"], ["+", "#"])
@example(["+"], ["$s"])
@example(["+", "#"], ["#"])  # as wide as '#' (found by this test)
@example(["a", "+", "#"], ["a", "#"])  # not: 'a/#' also matches 'a'
@example(["+", "+", "#"], ["", "#"])  # but '/#' cannot match the empty topic
def test_covers_is_exactly_inclusion_of_matched_topics(entry: list[str], req: list[str]) -> None:
    """covers(E, F) holds iff every topic F matches is matched by E (over separating topics)."""
    e, f = "/".join(entry), "/".join(req)
    if not (_ref_valid_filter(entry) and _ref_valid_filter(req)):
        assert not covers(e, f)
        return
    universe = _witness_topics(e, f)
    included = all(ref_matches(e, t) for t in universe if ref_matches(f, t))
    assert covers(e, f) == included


@given(levels_any)
def test_a_valid_filter_covers_itself_and_a_malformed_one_covers_nothing(flt: list[str]) -> None:
    f = "/".join(flt)
    assert covers(f, f) == is_valid_filter(f) == _ref_valid_filter(flt)
    assert topic_allowed(f, [f]) == is_valid_filter(f)


def _widen(data: st.DataObject, levels: list[str]) -> list[str]:
    """A filter at least as wide: some levels become '+', the tail may become '#'."""
    out = []
    for i, level in enumerate(levels):
        keep_dollar = i == 0 and level.startswith("$")  # a wildcard would not reach it
        if level == "#":
            out.append("#")
            break
        if not keep_dollar and data.draw(st.booleans()):
            if data.draw(st.booleans()):
                out.append("#")
                break
            out.append("+")
        else:
            out.append(level)
    return out


@given(levels_topic, st.data())
def test_widening_covers_and_covers_is_transitive(topic: list[str], data: st.DataObject) -> None:
    """z <= y <= x by construction: covers(y, z), covers(x, y) and so covers(x, z)."""
    z = topic
    y = _widen(data, z)
    x = _widen(data, y)
    zs, ys, xs = "/".join(z), "/".join(y), "/".join(x)
    assert covers(ys, zs) and covers(xs, ys) and covers(xs, zs)
    assert matches(xs, zs)


@given(levels_topic, st.lists(levels_any, max_size=4))
def test_topic_allowed_is_any_entry_matching(topic: list[str], entries: list[list[str]]) -> None:
    t = "/".join(topic)
    allowed = ["/".join(e) for e in entries]
    assert topic_allowed(t, allowed) == any(ref_matches(e, t) for e in allowed)


@given(st.text(max_size=30))
def test_any_text_is_classified_without_error(text: str) -> None:
    """Arbitrary input (wildcards, NUL, unicode) never raises and never matches when invalid."""
    assert is_valid_topic(text) == (
        bool(text) and "\x00" not in text and "+" not in text and "#" not in text
    )
    if not is_valid_filter(text):
        assert not covers(text, text)
    if is_valid_topic(text):
        assert matches(text, text) and matches("#", text) != text.startswith("$")


@pytest.mark.parametrize(
    ("entry", "topic", "expected"),
    [
        ("KeeperLogger", "KeeperLogger", True),
        ("KeeperLogger", "KeeperLoggerX", False),
        ("KeeperLogger", "KeeperLogger/x", False),
        ("Jobs/+/events", "Jobs/a/events", True),
        ("Jobs/+/events", "Jobs/a/b/events", False),
        ("Jobs/#", "Jobs", True),  # '#' includes the parent level
        ("Jobs/#", "Jobs/a/b/c", True),
        ("Jobs/a/events", "Jobs/+/events", False),  # a wildcard request needs a wider entry
        ("Jobs/#", "Jobs/+/events", True),
        ("#", "$SYS/broker/uptime", False),  # '$' topics only by an explicit first level
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("#/a", "#/a", False),  # malformed entries never match, not even themselves
        ("a/#/b", "a/x/b", False),
        ("a+", "a+", False),
        ("", "", False),
        ("Jobs/+/events", "Jobs//events", True),  # an empty level is a level
    ],
)
def test_documented_cases(entry: str, topic: str, expected: bool) -> None:
    assert topic_allowed(topic, [entry]) is expected


def test_length_limit_is_utf8_bytes() -> None:
    assert is_valid_topic("é" * (MAX_TOPIC_BYTES // 2))
    assert not is_valid_topic("é" * (MAX_TOPIC_BYTES // 2 + 1))
    assert not is_valid_topic("\udc80")  # a lone surrogate cannot be sent as UTF-8


def test_runtime_and_emulator_use_this_matcher() -> None:
    """Both former implementations are this one function now (they used to disagree)."""
    assert runtime_mqtt.topic_allowed is topic_allowed
    assert emulator_broker.topic_allowed is topic_allowed
