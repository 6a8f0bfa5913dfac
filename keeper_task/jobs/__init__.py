"""Job definitions: the JSON model, offline validation, and where a task's binary lives.

Runtime-side (no tooling imports): the emulator and the ``keeper-task job`` command build on it.
"""

from keeper_task.jobs.binary import (
    BUILTIN_COMMANDS,
    OS_NAMES,
    binary_candidates,
    binary_file_name,
    default_agent_root,
    expand_path_variables,
    host_os,
    is_absolute_path,
    is_builtin_command,
    normalize_os,
    resolve_binary,
)
from keeper_task.jobs.install import InstallResult, install_binary
from keeper_task.jobs.model import (
    EXECUTION_TYPES,
    Job,
    JobEvent,
    JobSchedule,
    JobTask,
    MqttTopics,
    OsFilter,
    job_from_data,
    load_job,
    parse_job,
    parse_job_json,
    read_job_json,
)
from keeper_task.jobs.validate import (
    API_BASE_TOKEN,
    LOGGER_TOPIC,
    ValidationReport,
    validate_job,
)

__all__ = [
    "API_BASE_TOKEN",
    "BUILTIN_COMMANDS",
    "EXECUTION_TYPES",
    "LOGGER_TOPIC",
    "OS_NAMES",
    "InstallResult",
    "Job",
    "JobEvent",
    "JobSchedule",
    "JobTask",
    "MqttTopics",
    "OsFilter",
    "ValidationReport",
    "binary_candidates",
    "binary_file_name",
    "default_agent_root",
    "expand_path_variables",
    "host_os",
    "install_binary",
    "is_absolute_path",
    "is_builtin_command",
    "job_from_data",
    "load_job",
    "normalize_os",
    "parse_job",
    "parse_job_json",
    "read_job_json",
    "resolve_binary",
    "validate_job",
]
