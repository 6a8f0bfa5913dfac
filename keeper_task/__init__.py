"""keeper-task: write job tasks for the Keeper Endpoint Privilege Manager agent.

This package's names are the **task runtime**: what code inside a task binary uses. Everything
else lives next to its concern (see docs/architecture.md):

* deployment — the job model, the offline validator and the Admin client — in
  :mod:`keeper_task.jobs` (``Job``, ``load_job``, ``validate_job``, ``JobsClient`` ...);
* the local agent emulator in :mod:`keeper_task.emulator` (extra ``[emulator]``);
* the pytest plugin in :mod:`keeper_task.testing` (fixtures ``keeper_agent``,
  ``keeper_agent_session``).

Importing this package loads runtime code only. The deployment names that 0.1 exported from
here still resolve, with a ``DeprecationWarning``, until 0.3.
"""

from __future__ import annotations

import warnings
from typing import Any

from keeper_task.agent.plugin_settings import PluginSettingsClient
from keeper_task.agent.retry import RetryPolicy
from keeper_task.agent_settings import AgentSettings
from keeper_task.context import TaskContext
from keeper_task.errors import (
    AgentError,
    AgentNotListeningError,
    AgentResponseError,
    AgentTimeoutError,
    AgentUnreachableError,
    BrokerUnavailableError,
    DeadlineExceeded,
    KeeperTaskError,
    MqttError,
    MqttNotAvailableError,
    NotFoundError,
    NotTrustedError,
    PluginNotFoundError,
    PublishError,
    RequestRejectedError,
    SettingsError,
    TaskFailed,
    TaskInterrupted,
    TopicNotDeclaredError,
    UsageError,
)
from keeper_task.exit_codes import ExitCode
from keeper_task.log_schema import KeeperJsonSchema, KeeperLogSchema, LogRecord
from keeper_task.logging import LogPipeline, configure_logging
from keeper_task.mqtt import MqttClient, build_client_id
from keeper_task.settings import TaskSettings
from keeper_task.task import Task
from keeper_task.tls import client_ssl_context

__version__ = "0.1.0"

#: Deployment names exported here in 0.1; they moved to keeper_task.jobs (removed in 0.3).
_MOVED_TO_JOBS = frozenset(
    {
        "Job",
        "JobDefinitionError",
        "JobNotFoundError",
        "JobTask",
        "JobsClient",
        "ValidationFailedError",
        "ValidationReport",
        "load_job",
        "parse_job",
        "validate_job",
    }
)


def __getattr__(name: str) -> Any:
    if name not in _MOVED_TO_JOBS:
        raise AttributeError(f"module 'keeper_task' has no attribute {name!r}")
    warnings.warn(
        f"keeper_task.{name} moved to keeper_task.jobs.{name}; "
        f"import it from there (the old name goes away in 0.3)",
        DeprecationWarning,
        stacklevel=2,
    )
    import importlib

    return getattr(importlib.import_module("keeper_task.jobs"), name)


__all__ = [
    "AgentError",
    "AgentNotListeningError",
    "AgentResponseError",
    "AgentSettings",
    "AgentTimeoutError",
    "AgentUnreachableError",
    "BrokerUnavailableError",
    "DeadlineExceeded",
    "ExitCode",
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
    "RequestRejectedError",
    "RetryPolicy",
    "SettingsError",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskInterrupted",
    "TaskSettings",
    "TopicNotDeclaredError",
    "UsageError",
    "__version__",
    "build_client_id",
    "client_ssl_context",
    "configure_logging",
]
