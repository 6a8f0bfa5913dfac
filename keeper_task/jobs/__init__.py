"""Deployment: job definitions, offline validation, where a binary lives, the Admin client.

The job JSON model, the offline validator and :class:`JobsClient` (the agent's Job Management
API, Admin tier) are what deployment scripts and the ``keeper-task job`` command use; a task
binary never imports this package. No tooling imports either: the emulator builds on it.
"""

from typing import TYPE_CHECKING, Any

from keeper_task.errors import JobDefinitionError, JobNotFoundError, ValidationFailedError
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

if TYPE_CHECKING:
    from keeper_task.agent.jobs import JobsClient


def __getattr__(name: str) -> Any:
    # The Admin client imports this package's model: loaded on first use to avoid a cycle.
    if name == "JobsClient":
        from keeper_task.agent.jobs import JobsClient

        return JobsClient
    raise AttributeError(f"module 'keeper_task.jobs' has no attribute {name!r}")


__all__ = [
    "API_BASE_TOKEN",
    "BUILTIN_COMMANDS",
    "EXECUTION_TYPES",
    "LOGGER_TOPIC",
    "OS_NAMES",
    "InstallResult",
    "Job",
    "JobDefinitionError",
    "JobEvent",
    "JobNotFoundError",
    "JobSchedule",
    "JobTask",
    "JobsClient",
    "MqttTopics",
    "OsFilter",
    "ValidationFailedError",
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
