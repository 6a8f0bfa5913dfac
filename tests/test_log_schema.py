"""The KeeperLogger payload schema: field names, level vocabulary, timestamps, swappability."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Mapping
from typing import Any

import structlog

from keeper_task.log_schema import (
    LEVEL_NAMES,
    KeeperJsonSchema,
    KeeperLogSchema,
    LogRecord,
    format_timestamp,
)
from keeper_task.logging import configure_logging


def record(**over: Any) -> LogRecord:
    rec: LogRecord = {
        "timestamp": 1_700_000_000.25,
        "level": "info",
        "event": "item.processed",
        "logger": "task",
        "job_id": "job-1",
        "job_name": "Job One",
        "exception": None,
        "fields": {"i": 7},
    }
    rec.update(over)  # type: ignore[typeddict-item]
    return rec


def test_default_document_fields():
    """The default schema emits exactly the documented keys, camel-cased for the agent."""
    doc = json.loads(KeeperJsonSchema().serialize(record()))
    assert doc == {
        "timestamp": "2023-11-14T22:13:20.250Z",
        "level": "Information",
        "message": "item.processed",
        "jobId": "job-1",
        "jobName": "Job One",
        "source": "task",
        "properties": {"i": 7},
    }


def test_level_names_follow_dotnet_vocabulary():
    """Every level maps to the agent's .NET name."""
    assert dict(LEVEL_NAMES) == {
        "trace": "Trace",
        "debug": "Debug",
        "info": "Information",
        "warning": "Warning",
        "error": "Error",
        "critical": "Critical",
    }
    schema = KeeperJsonSchema()
    for lvl, name in LEVEL_NAMES.items():
        assert json.loads(schema.serialize(record(level=lvl)))["level"] == name


def test_exception_only_when_present_and_missing_job_is_null():
    """'exception' appears only with a traceback; absent job id/name are null, not omitted."""
    schema = KeeperJsonSchema()
    assert "exception" not in json.loads(schema.serialize(record()))
    doc = json.loads(schema.serialize(record(exception="Traceback...", job_id=None, job_name=None)))
    assert doc["exception"] == "Traceback..."
    assert doc["jobId"] is None and doc["jobName"] is None


def test_timestamp_is_iso8601_utc_with_milliseconds():
    """Timestamps are UTC, millisecond precision, 'Z' suffix, and agree with datetime."""
    for ts in (0.0, 1_700_000_000.999, 1_735_689_599.5, 1_735_689_600.001):
        text = format_timestamp(ts)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
        expect = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        assert text.startswith(expect)


def test_non_json_values_are_stringified_not_fatal():
    """Objects, bytes, sets, non-str keys and cycles never break serialization."""
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    schema = KeeperJsonSchema()
    doc = json.loads(schema.serialize(record(fields={"obj": object(), "raw": b"\xffab", "s": {1}})))
    assert doc["properties"]["raw"] == "\ufffdab" and doc["properties"]["s"] == [1]
    assert doc["properties"]["obj"].startswith("<object object")
    assert json.loads(schema.serialize(record(fields={"k": {1: "a"}})))["properties"] == {
        "k": {"1": "a"}
    }
    assert (
        "self" in json.loads(schema.serialize(record(fields={"c": cyclic})))["properties"]["repr"]
    )


def test_unicode_is_sent_as_utf8():
    """Non-ASCII text is kept as UTF-8, not escaped."""
    payload = KeeperJsonSchema().serialize(record(event="café"))
    assert "café".encode() in payload


class XmlishSchema:
    """A different agent schema: proves the serializer is swappable."""

    def serialize(self, event: Mapping[str, Any]) -> bytes:
        return (
            f"<log level='{event['level']}' job='{event['job_id']}'>{event['event']}</log>".encode()
        )


def test_schema_is_swappable_in_configure_logging():
    """A custom schema object decides the KeeperLogger payload while stderr stays JSON lines."""
    assert isinstance(XmlishSchema(), KeeperLogSchema)
    err = io.StringIO()
    pipeline = configure_logging(fmt="json", stream=err, job_id="j-9", schema=XmlishSchema())
    sent: list[bytes] = []
    pipeline.attach(sent.append)
    pipeline.get_logger().info("hello", secret_token="x")
    structlog.reset_defaults()
    assert sent == [b"<log level='info' job='j-9'>hello</log>"]
    assert json.loads(err.getvalue())["message"] == "hello"
