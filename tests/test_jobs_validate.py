"""Tests for keeper_task.jobs.validate and the binary lookup: the agent's rules, offline."""

from __future__ import annotations

import copy
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeper_task.jobs import (
    Job,
    ValidationReport,
    binary_candidates,
    default_agent_root,
    is_absolute_path,
    normalize_os,
    parse_job,
    resolve_binary,
    validate_job,
)
from keeper_task.jobs.validate import job_id_problems, suggest_job_id
from tests.support.jobs import example_job, json_values, valid_jobs


def _errors(job: Any, **kwargs: Any) -> list[str]:
    report = validate_job(job, **kwargs)
    assert report.valid is (not report.errors)
    return report.errors


def _install(root: Path, command: str, *, exe: bool = True, suffix: str = "") -> Path:
    path = root / "Jobs" / "bin" / command / f"{command}{suffix}"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"#!/bin/sh\nexit 0\n")
    path.chmod(0o755 if exe else 0o644)
    return path


def test_example_job_is_valid_and_clean() -> None:
    """The documented example passes with no errors and no warnings."""
    report = validate_job(example_job(), file_name="Jobs/disk-usage-reporter.json")
    assert report == ValidationReport(valid=True, job_id="disk-usage-reporter")
    assert report.to_agent_json() == {
        "valid": True,
        "errors": [],
        "warnings": [],
        "jobId": "disk-usage-reporter",
    }


def test_a_job_model_is_validated_like_its_json() -> None:
    """validate_job accepts a Job and judges its JSON form."""
    job = parse_job('{"id": "a_b"}')
    assert any("underscore" in e for e in _errors(job))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda j: j.pop("id"), "id is missing"),
        (lambda j: j.update(id=""), "id is empty"),
        (lambda j: j.update(id=7), "id must be a string, got a number"),
        (lambda j: j.update(id="disk_usage"), "contains an underscore"),
        (lambda j: j.update(id="a/b"), "contains '/', which cannot be in a file name"),
        (lambda j: j.pop("name"), "name is missing"),
        (lambda j: j.update(name="  "), "name is empty"),
        (lambda j: j.pop("enabled"), "enabled is missing"),
        (lambda j: j.update(enabled="yes"), "enabled must be true or false"),
        (lambda j: j.pop("tasks"), "tasks is missing"),
        (lambda j: j.update(tasks=[]), "tasks is empty"),
        (lambda j: j.update(tasks=["x"]), "tasks[0] must be an object"),
        (lambda j: (j.pop("schedule"), j.pop("events")), "the job has no trigger"),
        (lambda j: (j.pop("schedule"), j.update(events=[])), "the job has no trigger"),
        (lambda j: j.update(priority=0), "priority must be from 1 to 10, got 0"),
        (lambda j: j.update(priority=11), "priority must be from 1 to 10, got 11"),
        (lambda j: j.update(priority=True), "priority must be an integer"),
        (lambda j: j.update(schedule={}), "schedule names no mode"),
        (
            lambda j: j.update(schedule={"intervalMinutes": 5, "cronExpression": "* * * * *"}),
            "schedule has 2 modes (intervalMinutes, cronExpression)",
        ),
        (lambda j: j.update(schedule={"intervalMinutes": 0}), "intervalMinutes must be a positive"),
        (lambda j: j.update(schedule={"cronExpression": "* * * *"}), "has 4 fields"),
        (lambda j: j.update(schedule={"cronExpression": "* * * * * *"}), "has 6 fields"),
        (lambda j: j.update(schedule={"cronExpression": "* * * * $"}), "invalid characters"),
        (lambda j: j.update(schedule={"runAt": 5}), "runAt must be a non-empty string"),
        (lambda j: j.update(events=[5]), "events[0] must be an event name or an object"),
        (lambda j: j.update(events=[{}]), "events[0] has no eventType"),
        (lambda j: j.update(events=[{"eventType": ""}]), "events[0].eventType must be"),
        (lambda j: j.update(events="Startup"), "events must be an array"),
        (lambda j: j["tasks"][0].update(timeoutSeconds=0), "timeoutSeconds must be a positive"),
        (lambda j: j["tasks"][0].update(timeoutSeconds=-5), "timeoutSeconds must be a positive"),
        (lambda j: j["tasks"][0].update(timeoutSeconds=1.5), "timeoutSeconds must be a positive"),
        (lambda j: j["tasks"][0].pop("command"), "tasks[0].command is missing"),
        (
            lambda j: j["tasks"][0].update(command="DiskUsageReporter.exe"),
            "must be the bare name without extension: 'DiskUsageReporter'",
        ),
        (lambda j: j["tasks"][0].update(command="tool.sh"), "without extension: 'tool'"),
        (lambda j: j["tasks"][0].update(command="/usr/bin/tool"), "must be a bare name"),
        (lambda j: j["tasks"][0].update(command="bin\\tool"), "must be a bare name"),
        (lambda j: j["tasks"][0].update(executablePath="bin/tool"), "must be absolute"),
        (lambda j: j["tasks"][0].update(executablePath="C:tool.exe"), "must be absolute"),
        (lambda j: j["tasks"][0].update(ExecutionType="Root"), "is not one of Service"),
        (
            lambda j: j["tasks"][0].update(executionType="User"),
            "'ExecutionType' and 'executionType' are the same key spelled twice",
        ),
        (lambda j: j["tasks"][0].update(continueOnFailure="no"), "continueOnFailure must be"),
        (lambda j: j["tasks"][0].update(arguments=["--x"]), "arguments must be one string"),
        (lambda j: j.update(eventTopic="Other/topic"), "is not in mqttTopics.allowedPublications"),
        (
            lambda j: j.pop("mqttTopics"),
            "eventTopic 'Jobs/disk-usage-reporter/events' needs mqttTopics",
        ),
        (lambda j: j.update(osFilter={"linux": "yes"}), "osFilter.linux must be true or false"),
        (lambda j: j.update(mqttTopics=[]), "mqttTopics must be an object"),
        (
            lambda j: j["mqttTopics"].update(allowedPublications="KeeperLogger"),
            "allowedPublications must be an array",
        ),
        (lambda j: j.update(parameters={}), "parameters must be an array"),
    ],
)
def test_each_broken_rule_is_an_error(mutate: Callable[[dict], Any], expected: str) -> None:
    """Each single rule violation makes the job invalid with a message naming the problem."""
    job = example_job()
    mutate(job)
    errors = _errors(job, file_name="disk-usage-reporter.json")
    assert any(expected in e for e in errors), errors


def test_id_must_equal_the_file_name() -> None:
    """The id must equal the file name without .json (case-sensitively)."""
    errors = _errors(example_job(), file_name="/x/Jobs/Disk-Usage-Reporter.json")
    assert errors == [
        "id 'disk-usage-reporter' does not match the file name 'Disk-Usage-Reporter.json'; the "
        "agent requires Jobs/<id>.json (rename the file to disk-usage-reporter.json)"
    ]
    report = validate_job(example_job(id="a"), file_name="a.txt")
    assert any("does not end in .json" in w for w in report.warnings)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda j: j.update(enabled=False), "enabled is false"),
        (lambda j: j.pop("mqttTopics") and j.pop("eventTopic"), "does not set KEEPER_JOB_ID"),
        (
            lambda j: j["mqttTopics"].update(allowedPublications=[j["eventTopic"]]),
            "KeeperLogger is not in mqttTopics.allowedPublications",
        ),
        (lambda j: j["tasks"][0].update(arguments="--x 1"), "never passes {KeeperApiBaseUrl}"),
        (lambda j: j["tasks"][0].pop("arguments"), "never passes {KeeperApiBaseUrl}"),
        (
            lambda j: j["tasks"][0].update(arguments="--a={keeperapibaseurl}"),
            "with different casing",
        ),
        (lambda j: j["tasks"][0].pop("timeoutSeconds"), "has no timeoutSeconds"),
        (lambda j: j["tasks"][0].update(timeout_seconds=5), "did you mean 'timeoutSeconds'?"),
        (
            lambda j: j.update(osFilter={"windows": False, "linux": False, "macOS": False}),
            "excludes every OS",
        ),
        (lambda j: j.update(osFilter={"freebsd": True}), "osFilter key 'freebsd' is unknown"),
        (lambda j: j.update(schedule={"runAt": "tomorrow"}), "runAt 'tomorrow' is not ISO 8601"),
        (lambda j: j["tasks"][0].update(command="My.Tool"), "contains a dot"),
        (
            lambda j: j["tasks"][0].update(executablePath="/opt/x/Other"),
            "names a different file than command",
        ),
        (lambda j: j["mqttTopics"]["allowedPublications"].append("a/#"), "has a wildcard"),
    ],
)
def test_advice_is_a_warning_not_an_error(mutate: Callable[[dict], Any], expected: str) -> None:
    """Problems the agent accepts are warnings; the job stays valid."""
    job = example_job()
    mutate(job)
    report = validate_job(job)
    assert report.valid, report.errors
    assert any(expected in w for w in report.warnings), report.warnings


def test_keeper_logger_warning_follows_logs_via_mqtt() -> None:
    """Without MQTT logging, a missing KeeperLogger publication is not worth a warning."""
    job = example_job()
    job["mqttTopics"]["allowedPublications"] = [job["eventTopic"]]
    assert validate_job(job, logs_via_mqtt=False).warnings == []


def test_builtin_commands_need_no_binary_and_no_api_token(tmp_path: Path) -> None:
    """The agent's built-in task commands skip the binary and argument checks."""
    job = example_job()
    job["tasks"][0] = {"command": "log-message", "arguments": "hello", "timeoutSeconds": 5}
    report = validate_job(job, agent_root=tmp_path, current_os="linux")
    assert report.valid and report.warnings == []


@pytest.mark.parametrize("value", [None, 5, "job", [example_job()], 1.5, True])
def test_non_objects_are_an_error_not_an_exception(value: Any) -> None:
    """A JSON value that is not an object yields one error."""
    report = validate_job(value)
    assert not report.valid
    assert report.errors[0].startswith("a job must be a JSON object")
    assert report.job_id is None


def test_unknown_current_os_is_a_value_error() -> None:
    """A bad current_os argument is a caller bug and raises ValueError."""
    with pytest.raises(ValueError, match="unknown OS 'beos'"):
        validate_job(example_job(), current_os="beos")


# -- binaries --------------------------------------------------------------------------------


def test_binary_under_jobs_bin_is_found(tmp_path: Path) -> None:
    """With an agent root, a binary at Jobs/bin/<command>/<command> passes the check."""
    assert any("not found" in e for e in _errors(example_job(), agent_root=tmp_path))
    binary = _install(tmp_path, "DiskUsageReporter")
    assert _errors(example_job(), agent_root=tmp_path, current_os="linux") == []
    assert resolve_binary(example_job()["tasks"][0], tmp_path, "linux") == binary


def test_missing_binary_names_the_place_looked(tmp_path: Path) -> None:
    """Without executablePath the error names Jobs/bin/<command>/<command>."""
    errors = _errors(example_job(), agent_root=tmp_path, current_os="linux")
    expected = tmp_path / "Jobs/bin/DiskUsageReporter/DiskUsageReporter"
    assert errors == [
        f"tasks[0]: binary for command 'DiskUsageReporter' not found at {expected}; "
        "deploy the binary first (keeper-task job deploy --binary)"
    ]


def test_executable_path_must_exist_even_when_jobs_bin_has_the_binary(tmp_path: Path) -> None:
    """The reference: the binary must exist at the path in the job JSON; Jobs/bin/ does not
    stand in for a missing executablePath."""
    _install(tmp_path, "DiskUsageReporter")
    job = example_job()
    job["tasks"][0]["executablePath"] = "/nowhere/DiskUsageReporter"
    errors = _errors(job, agent_root=tmp_path, current_os="linux")
    assert errors == [
        "tasks[0]: binary for command 'DiskUsageReporter' not found at "
        "/nowhere/DiskUsageReporter; deploy the binary first (keeper-task job deploy --binary)"
    ]
    job["tasks"][0]["executablePath"] = str(
        tmp_path / "Jobs/bin/DiskUsageReporter/DiskUsageReporter"
    )
    assert _errors(job, agent_root=tmp_path, current_os="linux") == []


def test_windows_binary_needs_exe_suffix(tmp_path: Path) -> None:
    """For Windows the agent looks for <command>.exe."""
    job = example_job(osFilter={"windows": True})
    _install(tmp_path, "DiskUsageReporter")
    assert any("not found" in e for e in _errors(job, agent_root=tmp_path, current_os="windows"))
    (tmp_path / "Jobs/bin/DiskUsageReporter/DiskUsageReporter.exe").write_bytes(b"MZ")
    assert _errors(job, agent_root=tmp_path, current_os="windows") == []


def test_executable_path_is_the_fallback(tmp_path: Path) -> None:
    """A binary at an absolute executablePath satisfies the check; {approot} is expanded."""
    binary = tmp_path / "elsewhere" / "DiskUsageReporter"
    binary.parent.mkdir()
    binary.write_bytes(b"x")
    binary.chmod(0o755)
    job = example_job()
    job["tasks"][0]["executablePath"] = str(binary)
    assert _errors(job, agent_root=tmp_path / "root", current_os="linux") == []
    job["tasks"][0]["executablePath"] = "{approot}/elsewhere/DiskUsageReporter"
    assert _errors(job, agent_root=tmp_path, current_os="linux") == []


def test_os_filter_excluding_this_os_skips_the_binary_check(tmp_path: Path) -> None:
    """A Windows-only job registers from Linux without its binary (documented)."""
    job = example_job(osFilter={"windows": True, "linux": False, "macOS": False})
    assert _errors(job, agent_root=tmp_path, current_os="linux") == []
    assert _errors(job, agent_root=tmp_path, current_os="windows") != []


def test_without_agent_root_there_is_no_binary_check() -> None:
    """Offline validation without a root does not look for binaries."""
    assert _errors(example_job(), current_os="linux") == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_non_executable_binary_is_an_error(tmp_path: Path) -> None:
    """A binary the agent cannot execute is reported with the fix."""
    binary = _install(tmp_path, "DiskUsageReporter", exe=False)
    this_os = normalize_os(os.uname().sysname)
    errors = _errors(example_job(), agent_root=tmp_path, current_os=this_os)
    assert errors == [f"tasks[0]: binary {binary} is not executable; run chmod +x on it"]
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)


def test_binary_candidates_skip_bad_commands(tmp_path: Path) -> None:
    """A command with a path yields no Jobs/bin candidate; a relative executablePath none."""
    assert binary_candidates({"command": "a/b", "executablePath": "rel"}, tmp_path, "linux") == []
    assert binary_candidates({"command": "T"}, None, "linux") == []


@pytest.mark.parametrize(
    ("path", "absolute"),
    [
        ("/opt/x", True),
        ("C:\\Program Files\\x.exe", True),
        ("c:/x", True),
        ("\\\\server\\share\\x.exe", True),
        ("{approot}/Jobs/bin/x", True),
        ("C:x.exe", False),
        ("bin/x", False),
        ("x", False),
    ],
)
def test_is_absolute_path_accepts_both_os_forms(path: str, absolute: bool) -> None:
    """Absolute paths are recognised in POSIX and Windows forms on any host."""
    assert is_absolute_path(path) is absolute


def test_default_agent_roots_per_os() -> None:
    """The documented default install roots."""
    assert str(default_agent_root("linux")) == "/opt/KeeperPrivilegeManager"
    assert str(default_agent_root("darwin")) == "/usr/local/KeeperPrivilegeManager"
    assert "KeeperPrivilegeManager" in str(default_agent_root("Windows"))


def test_agent_report_reads_any_casing_and_object_items() -> None:
    """from_agent_json accepts PascalCase keys and object-shaped errors."""
    report = ValidationReport.from_agent_json(
        {"Valid": False, "Errors": [{"message": "binary missing"}, 3], "JobId": "a"}
    )
    assert report.valid is False
    assert report.errors == ["binary missing", "3"]
    assert report.job_id == "a"
    with pytest.raises(ValueError, match="expected a JSON object"):
        ValidationReport.from_agent_json([])


# -- properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(valid_jobs())
def test_any_valid_job_is_valid(data: dict) -> None:
    """Strategy-built valid jobs pass, and parse into the model without error."""
    report = validate_job(data, file_name=f"{data['id']}.json")
    assert report.valid, report.errors
    assert report.job_id == data["id"]
    Job.model_validate(data)


def _set_task(key: str, value: Any) -> Callable[[dict], None]:
    def mutate(job: dict) -> None:
        job["tasks"][0][key] = value

    return mutate


def _drop_triggers(job: dict) -> None:
    job.pop("schedule", None)
    job.pop("events", None)


def _bad_event_topic(job: dict) -> None:
    job["eventTopic"] = "Not/Declared"
    job["mqttTopics"] = {"allowedPublications": ["KeeperLogger"]}


def _two_spellings(job: dict) -> None:
    job["tasks"][0]["ExecutionType"] = "Service"
    job["tasks"][0]["executionType"] = "Service"
    for key in [k for k in job["tasks"][0] if k.lower() == "executiontype"]:
        if key not in ("ExecutionType", "executionType"):
            del job["tasks"][0][key]


MUTATIONS: dict[str, Callable[[dict], None]] = {
    "no id": lambda j: j.pop("id"),
    "underscore": lambda j: j.update(id=j["id"] + "_x"),
    "no name": lambda j: j.pop("name"),
    "no enabled": lambda j: j.pop("enabled"),
    "enabled string": lambda j: j.update(enabled="true"),
    "no tasks": lambda j: j.pop("tasks"),
    "empty tasks": lambda j: j.update(tasks=[]),
    "no trigger": _drop_triggers,
    "two modes": lambda j: j.update(schedule={"intervalMinutes": 1, "runAt": "2030-01-01"}),
    "priority high": lambda j: j.update(priority=11),
    "priority low": lambda j: j.update(priority=0),
    "timeout zero": _set_task("timeoutSeconds", 0),
    "timeout string": _set_task("timeoutSeconds", "60"),
    "command exe": lambda j: j["tasks"][0].update(command=j["tasks"][0]["command"] + ".exe"),
    "command path": lambda j: j["tasks"][0].update(command="/bin/" + j["tasks"][0]["command"]),
    "relative path": _set_task("executablePath", "Jobs/bin/x"),
    "event topic": _bad_event_topic,
    "cron fields": lambda j: j.update(schedule={"cronExpression": "* * *"}),
    "bad event": lambda j: j.update(events=[{"name": "Startup"}]),
    "execution type": _set_task("executionType", "Admin"),
    "two spellings": _two_spellings,
}


@settings(max_examples=200, deadline=None)
@given(valid_jobs(), st.sampled_from(sorted(MUTATIONS)))
def test_any_rule_breaking_mutation_is_reported(data: dict, name: str) -> None:
    """Breaking any one rule in any valid job makes it invalid."""
    job = copy.deepcopy(data)
    if name == "execution type":
        _two_spellings(job)
        job["tasks"][0].pop("executionType")
    MUTATIONS[name](job)
    report = validate_job(job, file_name=f"{data['id']}.json")
    assert not report.valid, (name, job)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_never_crashes_the_validator(value: Any) -> None:
    """Any JSON value gives a report, never an exception or an internal error."""
    report = validate_job(value)
    assert not any("internal validator error" in e for e in report.errors)


_JOB_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        for key in [
            "id",
            "name",
            "description",
            "enabled",
            "priority",
            "schedule",
            "events",
            "parameters",
            "tasks",
            "condition",
            "alternateJobId",
            "osFilter",
            "mqttTopics",
            "eventTopic",
        ]
    },
)
_TASK_SHAPED = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        for key in [
            "id",
            "name",
            "ExecutionType",
            "executionType",
            "command",
            "executablePath",
            "arguments",
            "timeoutSeconds",
            "continueOnFailure",
            "scriptType",
        ]
    },
)


@settings(max_examples=200, deadline=None)
@given(
    _JOB_SHAPED,
    st.lists(_TASK_SHAPED, max_size=2),
    st.booleans(),
    st.one_of(st.none(), json_values),
)
def test_job_shaped_garbage_never_crashes(
    job: dict, tasks: list, use_tasks: bool, schedule: Any
) -> None:
    """Known keys holding garbage give a report; a valid verdict implies the model parses."""
    if use_tasks:
        job["tasks"] = tasks
    if schedule is not None:
        job["schedule"] = schedule
    report = validate_job(job, agent_root="/nonexistent-root", current_os="linux")
    assert not any("internal validator error" in e for e in report.errors)
    if report.valid:
        Job.model_validate(job)


# -- ids that cannot be file names -----------------------------------------------------------


@pytest.mark.parametrize(
    ("job_id", "reason", "suggestion"),
    [
        ("x" * 251, "251 bytes long in UTF-8; at most 250", "x" * 250),
        ("\u00e9" * 126, "252 bytes long in UTF-8", "\u00e9" * 125),
        ("a\x00b", "contains '\\x00'", "a-b"),
        ("..", "is not a file name", None),
        (".", "is not a file name", None),
        ('a:b*c<d>|e"', "contains '\"' '*' ':' '<' '>' '|'", "a-b-c-d-e"),
        ("a?b", "contains '?'", "a-b"),
        ("CON", "reserved Windows device name CON", "CON-job"),
        ("nul", "reserved Windows device name NUL", "nul-job"),
        ("com1", "reserved Windows device name COM1", "com1-job"),
        ("LPT9.report", "reserved Windows device name LPT9", "LPT9-job.report"),
        ("trailing.", "ends with a dot", "trailing"),
        ("trailing ", "leading or trailing spaces", "trailing"),
        ("my_job", "contains an underscore", "my-job"),
        ("bad_id:x", "contains an underscore", "bad-id-x"),
        ("a\ud800b", "unpaired UTF-16 surrogate", "a-b"),
    ],
)
def test_ids_that_cannot_be_file_names_are_errors(
    job_id: str, reason: str, suggestion: str | None
) -> None:
    """Every id that is not a file name on Linux, macOS and Windows is refused with the reason
    and, where one exists, a valid suggestion (itself accepted)."""
    problems = job_id_problems(job_id)
    assert any(reason in p for p in problems), problems
    assert any(reason in e for e in _errors(example_job(job_id)))
    assert suggest_job_id(job_id) == suggestion
    if suggestion is not None:
        # A suggestion too long to read (the over-long ids) is not printed.
        shown = any(f"for example {suggestion!r}" in p for p in problems)
        assert shown == (len(suggestion) <= 64), problems
        assert job_id_problems(suggestion) == []


@pytest.mark.parametrize(
    "job_id",
    ["disk-usage-reporter", "x" * 250, "68112CE4-A2A8-4243-83C9-90BF8D2188A0", "v1.2", "CONSOLE"],
)
def test_ids_that_are_file_names_everywhere_pass(job_id: str) -> None:
    """Long-but-fitting ids, GUIDs, dots inside and names merely starting with CON pass."""
    assert job_id_problems(job_id) == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_suggested_ids_are_always_valid(job_id: str) -> None:
    """Whatever the id, a suggestion (when there is one) passes every id rule."""
    suggestion = suggest_job_id(job_id)
    assert suggestion is None or job_id_problems(suggestion) == []
