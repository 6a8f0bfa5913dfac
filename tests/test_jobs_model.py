"""Tests for keeper_task.jobs.model: parsing, typed access, and lossless round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings

from keeper_task.errors import JobDefinitionError
from keeper_task.jobs import (
    Job,
    JobEvent,
    JobTask,
    MqttTopics,
    load_job,
    parse_job,
    parse_job_json,
)
from tests.support.jobs import example_job, valid_jobs


def test_typed_fields_read_the_documented_keys() -> None:
    """Every documented key is reachable as a typed attribute."""
    job = parse_job(json.dumps(example_job()))
    assert job.id == "disk-usage-reporter"
    assert job.enabled is True
    assert job.priority == 4
    assert job.schedule is not None and job.schedule.interval_minutes == 240
    assert job.schedule.modes == ["intervalMinutes"]
    assert job.os_filter is not None and job.os_filter.allows("linux")
    assert not job.os_filter.allows("windows")
    assert isinstance(job.mqtt_topics, MqttTopics)
    assert job.mqtt_topics.allowed_publications[0] == "KeeperLogger"
    task = job.tasks[0]
    assert isinstance(task, JobTask)
    assert task.execution_type == "Service"
    assert task.timeout_seconds == 900
    assert task.continue_on_failure is False
    assert task.script_type == "Auto"
    assert job.event_names == ["Startup"]


def test_round_trip_keeps_casing_order_unknown_keys_and_event_forms() -> None:
    """to_json_dict writes back exactly what was read, including keys the model doesn't know."""
    data = example_job()
    data["events"] = ["Startup", {"eventType": "Custom", "note": 1}]
    data["futureKey"] = {"nested": [1, 2.5, None, "x"]}
    data["tasks"][0]["MergeStdoutJsonIntoContext"] = True
    data["tasks"].append({"command": "Other", "executionType": "User", "timeoutSeconds": 5})
    data["alternateJobId"] = None
    job = parse_job(json.dumps(data))
    out = job.to_json_dict()
    assert out == data
    assert list(out) == list(data)
    assert list(out["tasks"][0]) == list(data["tasks"][0])
    assert "ExecutionType" in out["tasks"][0] and "executionType" in out["tasks"][1]
    assert isinstance(job.events, list) and isinstance(job.events[1], JobEvent)
    assert job.events[1].extra_keys == {"note": 1}


def test_keys_match_case_insensitively() -> None:
    """A known key in another casing fills the typed field and is written back as spelled."""
    job = parse_job('{"ID": "a", "TimeoutSeconds": 1, "tasks": [{"COMMAND": "x"}]}')
    assert job.id == "a"
    assert job.tasks[0].command == "x"
    assert job.extra_keys == {"TimeoutSeconds": 1}  # a task key at job level is unknown there
    assert job.to_json_dict() == {"ID": "a", "TimeoutSeconds": 1, "tasks": [{"COMMAND": "x"}]}


def test_two_spellings_of_one_key_are_both_kept() -> None:
    """Both spellings survive a round trip; the first fills the field."""
    text = '{"tasks": [{"ExecutionType": "User", "executionType": "Service"}]}'
    job = parse_job(text)
    assert job.tasks[0].execution_type == "User"
    assert job.to_json_dict() == json.loads(text)


def test_snake_case_json_keys_stay_unknown() -> None:
    """A JSON key spelled like the Python field name is not mistaken for the agent's key."""
    job = parse_job('{"tasks": [{"timeout_seconds": 5}]}')
    assert job.tasks[0].timeout_seconds is None
    assert job.tasks[0].extra_keys == {"timeout_seconds": 5}


def test_python_construction_uses_field_names_and_writes_canonical_keys() -> None:
    """Built from Python, fields go out under the agent's camelCase keys; unset ones are omitted."""
    task = JobTask(command="Tool", timeout_seconds=60, execution_type="Service")
    job = Job(id="j", name="J", enabled=True, events=["Startup"], tasks=[task])
    assert job.to_json_dict() == {
        "id": "j",
        "name": "J",
        "enabled": True,
        "events": ["Startup"],
        "tasks": [{"command": "Tool", "timeoutSeconds": 60, "executionType": "Service"}],
    }


def test_assignment_after_load_is_written_back() -> None:
    """Changing a field after loading shows up in to_json_dict under the author's key."""
    job = parse_job(json.dumps(example_job()))
    job.tasks[0].timeout_seconds = 30
    job.priority = 9
    out = job.to_json_dict()
    assert out["tasks"][0]["timeoutSeconds"] == 30
    assert out["priority"] == 9


def test_to_json_dict_is_a_deep_copy() -> None:
    """Mutating the output never changes the model."""
    job = parse_job('{"x": {"y": [1]}}')
    job.to_json_dict()["x"]["y"].append(2)
    assert job.to_json_dict() == {"x": {"y": [1]}}


def test_effective_event_topic_defaults_to_jobs_id_events() -> None:
    """Without eventTopic the agent's default topic is used."""
    assert parse_job('{"id": "a-b"}').effective_event_topic == "Jobs/a-b/events"
    assert parse_job('{"id": "a", "eventTopic": "t"}').effective_event_topic == "t"


def test_malformed_json_names_line_and_column() -> None:
    """A syntax error points at the line and column, prefixed with the source."""
    with pytest.raises(JobDefinitionError, match=r"^jobs/x\.json:3:1: malformed JSON"):
        parse_job('{\n  "id": "x",\n}', source="jobs/x.json")


def test_wrong_types_are_not_coerced() -> None:
    """A string where a number belongs is an error, named by its JSON path."""
    with pytest.raises(JobDefinitionError, match=r"tasks\[0\]\.timeoutSeconds must be an integer"):
        parse_job('{"tasks": [{"timeoutSeconds": "900"}]}')
    with pytest.raises(JobDefinitionError, match=r"events\[0\] must be a string or an object"):
        parse_job('{"events": [5]}')
    with pytest.raises(JobDefinitionError, match="enabled must be a boolean"):
        parse_job('{"enabled": 1}')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "a job must be a JSON object, got an array"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": NaN}', "NaN is not valid JSON"),
        ("", "malformed JSON"),
    ],
)
def test_invalid_documents_are_refused(text: str, message: str) -> None:
    """Non-objects, duplicate keys, NaN and empty input raise JobDefinitionError."""
    with pytest.raises(JobDefinitionError, match=message):
        parse_job(text)


def test_bytes_with_bom_and_non_utf8() -> None:
    """A UTF-8 BOM is accepted; bytes that are not UTF-8 are a clear error."""
    assert parse_job(b'\xef\xbb\xbf{"id": "a"}').id == "a"
    with pytest.raises(JobDefinitionError, match="not UTF-8"):
        parse_job(b'{"id": "\xff"}')


def test_load_job_reads_a_file_and_reports_missing_ones(tmp_path: Path) -> None:
    """load_job parses a file; a missing path or a directory is a JobDefinitionError."""
    path = tmp_path / "a.json"
    path.write_text('{"id": "a"}', encoding="utf-8")
    assert load_job(path).id == "a"
    with pytest.raises(JobDefinitionError, match="does not exist"):
        load_job(tmp_path / "missing.json")
    with pytest.raises(JobDefinitionError, match="is a directory"):
        load_job(tmp_path)
    (tmp_path / "bad.json").write_text('{"id": }', encoding="utf-8")
    with pytest.raises(JobDefinitionError, match=r"bad\.json:1:8: malformed JSON"):
        load_job(tmp_path / "bad.json")


def test_parse_job_json_returns_plain_values() -> None:
    """parse_job_json gives dicts/lists, for validating without the model."""
    assert parse_job_json('{"tasks": [1]}') == {"tasks": [1]}


@settings(max_examples=150, deadline=None)
@given(valid_jobs())
def test_any_valid_job_round_trips_unchanged(data: dict) -> None:
    """Any valid job (unknown keys, either casing, both event forms) survives parse and dump."""
    job = parse_job(json.dumps(data))
    out = job.to_json_dict()
    assert out == data
    assert list(out) == list(data)
    assert json.loads(job.to_json()) == data


def _every_field_job() -> dict:
    """A job using every key of agent-facts.md section 3, with unknown keys at every level."""
    return {
        "Id": "every-field",
        "name": "Every field",
        "description": "SCENARIO: all keys",
        "enabled": False,
        "priority": 10,
        "schedule": {"cronExpression": "0 3 * * 1-5", "timeZone": "UTC"},
        "events": ["Startup", {"eventType": "PolicyEvaluationPending", "source": "policy"}],
        "parameters": [{"name": "threshold", "type": "int", "defaultValue": 90, "required": True}],
        "condition": {"setting": "x.enabled", "equals": "true", "nested": [None, 1.5]},
        "alternateJobId": "fallback-job",
        "osFilter": {"windows": True, "linux": False, "macOS": True, "freebsd": False},
        "mqttTopics": {
            "allowedPublications": ["KeeperLogger", "Jobs/every-field/events"],
            "allowedSubscriptions": ["Jobs/every-field/commands/+"],
            "qos": 1,
        },
        "eventTopic": "Jobs/every-field/events",
        "tasks": [
            {
                "id": "a",
                "name": "A",
                "ExecutionType": "UserDesktop",
                "command": "ToolA",
                "executablePath": "C:\\KeeperPrivilegeManager\\Jobs\\bin\\ToolA\\ToolA.exe",
                "arguments": "--keeper-api-base={KeeperApiBaseUrl}",
                "timeoutSeconds": 3600,
                "continueOnFailure": True,
                "scriptType": "Auto",
                "MergeStdoutJsonIntoContext": True,
            },
            {
                "command": "log-message",
                "executionType": "Service",
                "SkipWhenPluginSettingFalse": "x",
            },
        ],
        "futureRootKey": {"deep": {"er": [1, {"x": None}]}},
    }


def test_every_documented_field_round_trips_and_is_typed() -> None:
    """Each section-3 key is typed on load and written back unchanged, unknown keys included."""
    data = _every_field_job()
    job = parse_job(json.dumps(data))
    assert job.to_json_dict() == data
    assert list(job.to_json_dict()) == list(data)
    assert (job.id, job.description, job.enabled, job.priority) == (
        "every-field",
        "SCENARIO: all keys",
        False,
        10,
    )
    assert job.schedule is not None and job.schedule.modes == ["cronExpression"]
    assert job.schedule.extra_keys == {"timeZone": "UTC"}
    assert job.event_names == ["Startup", "PolicyEvaluationPending"]
    assert job.parameters == data["parameters"] and job.condition == data["condition"]
    assert job.alternate_job_id == "fallback-job"
    assert job.os_filter is not None and job.os_filter.allows("macos")
    assert job.os_filter.extra_keys == {"freebsd": False}
    assert job.mqtt_topics is not None and job.mqtt_topics.extra_keys == {"qos": 1}
    assert job.mqtt_topics.allowed_subscriptions == ["Jobs/every-field/commands/+"]
    assert job.event_topic == job.effective_event_topic == "Jobs/every-field/events"
    first, second = job.tasks
    assert (first.execution_type, second.execution_type) == ("UserDesktop", "Service")
    assert first.executable_path is not None and first.executable_path.endswith("ToolA.exe")
    assert first.continue_on_failure is True and first.timeout_seconds == 3600
    assert first.extra_keys == {"MergeStdoutJsonIntoContext": True}
    assert second.extra_keys == {"SkipWhenPluginSettingFalse": "x"}


@pytest.mark.parametrize(
    "schedule",
    [
        {"intervalMinutes": 240},
        {"runAt": "2030-01-01T03:00:00Z"},
        {"calendar": {"days": ["Mon"], "at": "03:00"}},
        {"intervalMinutes": None, "cronExpression": "*/5 * * * *"},
    ],
)
def test_each_schedule_mode_round_trips(schedule: dict) -> None:
    """interval, runAt, calendar and cron (beside an explicit null) are kept as written."""
    data = example_job(schedule=schedule)
    job = parse_job(json.dumps(data))
    assert job.to_json_dict() == data
    assert job.schedule is not None and len(job.schedule.modes) == 1


@pytest.mark.parametrize(
    "key", ["model_config", "model_fields_set", "_keys", "_order", "__class__", "extra_keys"]
)
def test_keys_named_like_model_internals_stay_plain_unknown_keys(key: str) -> None:
    """A JSON key that looks like a pydantic/private attribute is data, kept as written."""
    data = {"id": "a", key: {"v": 1}, "tasks": [{"command": "x", key: 2}]}
    job = parse_job(json.dumps(data))
    assert job.to_json_dict() == data
    assert job.extra_keys == {key: {"v": 1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"priority": ' + "9" * 5000 + "}", "an integer has 5000 digits; at most 4300"),
        ('{"priority": -' + "9" * 4301 + "}", "an integer has 4301 digits"),
        ('{"priority": 1e999}', "the number 1e999 is out of range"),
        ('{"name": "a\\ud800"}', "unpaired UTF-16 surrogate \\\\ud800"),
        ('{"tasks": [{"\\udfff": 1}]}', "unpaired UTF-16 surrogate \\\\udfff"),
    ],
)
def test_numbers_python_cannot_hold_are_one_clear_error(text: str, message: str) -> None:
    """A huge integer (Python's 4300-digit guard) or an overflowing double is a
    JobDefinitionError naming the problem, never a bare ValueError."""
    with pytest.raises(JobDefinitionError, match=message):
        parse_job_json(text, source="big.json")
