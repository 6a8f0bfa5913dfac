"""What ``Task.run(ctx)`` receives: settings, agent settings, logger, MQTT and the API client."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Generic, NoReturn

from typing_extensions import TypeVar

from keeper_task.errors import MqttNotAvailableError, TaskFailed
from keeper_task.exit_codes import ExitCode
from keeper_task.settings import TaskSettings

if TYPE_CHECKING:
    from keeper_task.agent.plugin_settings import PluginSettingsClient
    from keeper_task.agent_settings import AgentSettings
    from keeper_task.mqtt import MqttClient

__all__ = ["TaskContext"]

S = TypeVar("S", bound=TaskSettings, default=TaskSettings)


class TaskContext(Generic[S]):
    """Everything a task needs while it runs; built by the framework, passed to ``run(ctx)``.

    Attributes:
        settings: The task's parsed settings (your ``TaskSettings`` subclass).
        agent_settings: Typed view of the agent's merged ``KeeperPrivilegeManager`` settings.
        log: Structured logger; each event goes to stderr and, when MQTT is up, to
            ``KeeperLogger``.
        plugin_settings: Client of the agent's Plugin Settings API (all six endpoints).
        mqtt: The connected MQTT client, or None when MQTT is off for this run.
        job_id: ``KEEPER_JOB_ID`` (None when the job declares no ``mqttTopics``).
        job_name: ``KEEPER_JOB_NAME``.
        event_topic: The job's event topic (``Jobs/{job_id}/events`` by default).
        mqtt_unavailable_reason: Why ``mqtt`` is None, when it is.
    """

    def __init__(
        self,
        *,
        settings: S,
        agent_settings: AgentSettings,
        log: Any,
        plugin_settings: PluginSettingsClient,
        mqtt: MqttClient | None,
        mqtt_unavailable_reason: str | None = None,
        event_topic: str | None = None,
        deadline: float | None = None,
    ) -> None:
        self.settings = settings
        self.agent_settings = agent_settings
        self.log = log
        self.plugin_settings = plugin_settings
        self.mqtt = mqtt
        self.mqtt_unavailable_reason = mqtt_unavailable_reason
        self.job_id = settings.keeper_job_id
        self.job_name = settings.keeper_job_name
        self.event_topic = event_topic or (
            f"Jobs/{self.job_id}/events" if self.job_id is not None else None
        )
        self._deadline = deadline

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any] | list[Any],
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish to the agent's broker.

        Args:
            topic: Must be declared in the task's ``publishes`` (and in the job's
                ``mqttTopics.allowedPublications``: the real broker drops others silently).
            payload: Bytes, text, or a dict/list sent as compact JSON.
            qos: 0, 1 (default) or 2.
            retain: Set the MQTT retain flag.
            wait: Block until the broker acknowledged the message.
            timeout: Seconds to wait when ``wait`` (default: the MQTT flush timeout).

        Raises:
            MqttNotAvailableError: MQTT is off for this run (the message says why).
            TopicNotDeclaredError: ``topic`` is not among the task's declared topics.
            PublishError: Not acknowledged within ``timeout``.
        """
        if self.mqtt is None:
            raise MqttNotAvailableError(
                f"cannot publish to {topic!r}: {self.mqtt_unavailable_reason or 'MQTT is off'}"
            )
        if timeout is None and wait:
            timeout = self.settings.mqtt_flush_timeout
        self.mqtt.publish(topic, payload, qos=qos, retain=retain, wait=wait, timeout=timeout)

    def publish_event(
        self,
        payload: bytes | str | Mapping[str, Any] | list[Any],
        *,
        qos: int = 1,
        wait: bool = False,
    ) -> None:
        """Publish to the job's event topic (``Jobs/{job_id}/events`` unless overridden)."""
        if self.event_topic is None:
            raise MqttNotAvailableError(
                "cannot publish an event: the job has no event topic because KEEPER_JOB_ID "
                "is not set (declare mqttTopics in the job)"
            )
        self.publish(self.event_topic, payload, qos=qos, wait=wait)

    def fail(self, message: str, *, exit_code: int = ExitCode.TASK_FAILED) -> NoReturn:
        """End the run as an expected failure: logged as ``task.failed``, exit ``exit_code``.

        Raises:
            TaskFailed: Always; the framework turns it into the exit code.
            ValueError: ``exit_code`` is outside 1-255: the OS keeps only the low 8 bits,
                so 256 would read as success.
        """
        if isinstance(exit_code, bool) or not 1 <= exit_code <= 255:
            raise ValueError(f"ctx.fail() needs an exit code in 1-255, not {exit_code!r}")
        raise TaskFailed(message, exit_code=exit_code)

    def remaining(self) -> float | None:
        """Seconds left before the task's deadline, or None when no deadline is set."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())
