"""MQTT 3.1.1 topic names, topic filters and the permission check built on them.

One matcher for the whole package: the task runtime checks a publish against the job's
``mqttTopics.allowedPublications`` with it, and the emulator's broker enforces the job's
publications and subscriptions with it, so both always agree.

The rules (MQTT 3.1.1, section 4.7):

* A **topic name** (what a PUBLISH carries) is 1 to 65,535 UTF-8 bytes, has no ``+``, ``#``
  or U+0000. Levels are separated by ``/``; empty levels are legal (``a//b``, ``/a``).
* A **topic filter** (what a SUBSCRIBE or a permission entry carries) follows the same
  length and U+0000 rules; ``+`` must fill a whole level and ``#`` must fill the last level.
  ``#`` also matches the parent level (``a/#`` matches ``a``).
* A filter that starts with a wildcard (``+/x``, ``#``) never matches a topic that starts
  with ``$`` (``$SYS/...``): such topics are matched only by filters that spell out their
  first level (``$SYS/#``).

Malformed input never matches: a malformed filter (``#/a``, ``a+``, ``""``) covers nothing,
not even a topic that equals it character for character, and a malformed topic is covered
by nothing. That is the safe side for a permission check: a typo in a job's
``allowedPublications`` shows up as a denied publish, never as a silently widened grant.
Whether the agent treats ``+``/``#`` in job permission lists as wildcards at all is not
documented; keeper-task does, by these rules.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["covers", "is_valid_filter", "is_valid_topic", "matches", "topic_allowed"]

#: The longest topic name or filter MQTT can carry, in UTF-8 bytes.
MAX_TOPIC_BYTES = 65_535


def _encodable(text: str) -> bool:
    if not text or "\x00" in text:
        return False
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates are not UTF-8
        return False
    return size <= MAX_TOPIC_BYTES


def is_valid_topic(topic: str) -> bool:
    """Whether ``topic`` is a valid topic name for a PUBLISH (no wildcards)."""
    return _encodable(topic) and "+" not in topic and "#" not in topic


def is_valid_filter(topic_filter: str) -> bool:
    """Whether ``topic_filter`` is a valid topic filter (``+`` whole levels, ``#`` last)."""
    if not _encodable(topic_filter):
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the filter matches the topic name (False when either is malformed)."""
    return is_valid_topic(topic) and covers(topic_filter, topic)


def covers(entry: str, requested: str) -> bool:  # noqa: PLR0911 - one return per MQTT rule, in the spec's order
    """Whether every topic that ``requested`` matches is also matched by ``entry``.

    ``requested`` is a topic name or a filter (a subscription); for a topic name this is
    :func:`matches`. A wildcard in ``requested`` is covered only by the same wildcard or a
    wider one (``a/#`` covers ``a/+`` and ``a``; ``a/+`` does not cover ``a/#``).

    Returns:
        False when either argument is malformed.
    """
    if not (is_valid_filter(entry) and is_valid_filter(requested)):
        return False
    have = entry.split("/")
    want = requested.split("/")
    for i, part in enumerate(have):
        # A leading wildcard never reaches a '$' topic; a leading '+'/'#' in ``requested``
        # reaches none either, so only a literal '$...' first level is out of reach.
        dollar = i == 0 and want[0].startswith("$")
        if part == "#":
            return not dollar
        if i >= len(want):
            return False
        if part == "+":
            if dollar:
                return False
            if want[i] == "#":
                # '#' also matches its parent ('a/#' matches 'a'), which '+/#' misses, unless
                # that parent is no topic at all: at the top, or below an empty first level
                # ('/#' cannot match the empty topic ''). Then '+/#' is exactly as wide.
                no_parent = i == 0 or (i == 1 and want[0] == "")
                return no_parent and have[i:] == ["+", "#"]
        elif part != want[i]:
            return False
    return len(want) == len(have)


def topic_allowed(topic: str, allowed: Iterable[str]) -> bool:
    """Whether some entry of ``allowed`` covers ``topic`` (a topic name or a filter).

    Entries are topic filters (a plain topic name is a filter without wildcards); see
    :func:`covers` and the module docstring for ``$`` topics and malformed entries.
    """
    return any(covers(entry, topic) for entry in allowed)
