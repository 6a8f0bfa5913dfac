"""keeper-task: write job tasks for the Keeper Endpoint Privilege Manager agent.

The public surface is re-exported here; the implementation lives in private-by-convention
modules named after their concern (``task``, ``context``, ``settings``, ``agent``, ``mqtt``,
``logging``, ``tls``, ``errors``). Importing this package loads runtime code only: the job
model and the Admin client (deployment tooling) are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keeper_task.agent.plugin_settings import PluginSettingsClient
from keeper_task.agent.retry import RetryPolicy
from keeper_task.agent_settings import AgentSettings
from keeper_task.context import TaskContext
from keeper_task.errors import (
    AgentError,
    AgentResponseError,
    AgentUnreachableError,
    BrokerUnavailableError,
    DeadlineExceeded,
    JobDefinitionError,
    JobNotFoundError,
    KeeperTaskError,
    MqttError,
    MqttNotAvailableError,
    NotFoundError,
    NotTrustedError,
    PluginNotFoundError,
    PublishError,
    SettingsError,
    TaskFailed,
    TaskInterrupted,
    TopicNotDeclaredError,
    UsageError,
    ValidationFailedError,
)
from keeper_task.exit_codes import ExitCode
from keeper_task.log_schema import KeeperJsonSchema, KeeperLogSchema, LogRecord
from keeper_task.logging import LogPipeline, configure_logging
from keeper_task.mqtt import MqttClient, build_client_id
from keeper_task.settings import TaskSettings
from keeper_task.task import Task
from keeper_task.tls import client_ssl_context

if TYPE_CHECKING:
    from keeper_task.agent.jobs import JobsClient
    from keeper_task.jobs import Job, JobTask, ValidationReport, load_job, parse_job, validate_job

__version__ = "0.1.0"

# Loaded on first attribute access: a task binary never pays for the job model.
_LAZY = {
    "Job": "keeper_task.jobs",
    "JobTask": "keeper_task.jobs",
    "JobsClient": "keeper_task.agent.jobs",
    "ValidationReport": "keeper_task.jobs",
    "load_job": "keeper_task.jobs",
    "parse_job": "keeper_task.jobs",
    "validate_job": "keeper_task.jobs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keeper_task' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AgentError",
    "AgentResponseError",
    "AgentSettings",
    "AgentUnreachableError",
    "BrokerUnavailableError",
    "DeadlineExceeded",
    "ExitCode",
    "Job",
    "JobDefinitionError",
    "JobNotFoundError",
    "JobTask",
    "JobsClient",
    "KeeperJsonSchema",
    "KeeperLogSchema",
    "KeeperTaskError",
    "LogPipeline",
    "LogRecord",
    "MqttClient",
    "MqttError",
    "MqttNotAvailableError",
    "NotFoundError",
    "NotTrustedError",
    "PluginNotFoundError",
    "PluginSettingsClient",
    "PublishError",
    "RetryPolicy",
    "SettingsError",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskInterrupted",
    "TaskSettings",
    "TopicNotDeclaredError",
    "UsageError",
    "ValidationFailedError",
    "ValidationReport",
    "__version__",
    "build_client_id",
    "client_ssl_context",
    "configure_logging",
    "load_job",
    "parse_job",
    "validate_job",
]
