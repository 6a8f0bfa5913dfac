"""keeper-task: write job tasks for the Keeper Endpoint Privilege Manager agent."""

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
from keeper_task.settings import TaskSettings
from keeper_task.tls import client_ssl_context

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentResponseError",
    "AgentUnreachableError",
    "BrokerUnavailableError",
    "DeadlineExceeded",
    "ExitCode",
    "JobDefinitionError",
    "JobNotFoundError",
    "KeeperTaskError",
    "MqttError",
    "MqttNotAvailableError",
    "NotFoundError",
    "NotTrustedError",
    "PluginNotFoundError",
    "PublishError",
    "SettingsError",
    "TaskFailed",
    "TaskInterrupted",
    "TaskSettings",
    "TopicNotDeclaredError",
    "UsageError",
    "ValidationFailedError",
    "__version__",
    "client_ssl_context",
]
