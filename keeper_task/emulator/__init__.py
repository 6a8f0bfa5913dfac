"""A local agent emulator for developing and testing job tasks (tooling, extra ``[emulator]``).

It behaves like the Keeper EPM agent on the points that matter to a task, on one machine:

* HTTPS API on 127.0.0.1 (certificate from a local CA kept in a state directory): Plugin
  Settings (six endpoints), Job Management (nine endpoints), public ``/health``
  (:mod:`keeper_task.emulator.api`);
* the agent's tiers: Plugin only for processes it launched and their descendants, Admin only
  with a client certificate from its admin CA (:mod:`keeper_task.emulator.tiers`);
* an MQTT broker, embedded amqtt with TLS by default, enforcing client ids and topic
  permissions and reporting every denial (:mod:`keeper_task.emulator.broker`);
* a job runner that starts tasks as the agent does (:mod:`keeper_task.emulator.launcher`);
* scripted faults (:mod:`keeper_task.emulator.faults`).

The runtime never imports this package. Example::

    from keeper_task.emulator import Emulator

    with Emulator() as agent:
        agent.add_job("examples/hello/job.json")
        run = agent.run_job("hello-task", command=["python", "examples/hello/task.py"])
        assert run.exit_code == 0
        print(agent.logs())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keeper_task.emulator.errors import EmulatorError

if TYPE_CHECKING:
    from keeper_task.emulator.behaviour import AgentBehaviour
    from keeper_task.emulator.broker import job_id_of_client, parse_broker_spec, topic_allowed
    from keeper_task.emulator.core import Emulator, parse_setting
    from keeper_task.emulator.faults import Faults, ScriptedFault
    from keeper_task.emulator.launcher import (
        EXIT_NOT_STARTED,
        EXIT_TIMEOUT,
        JobRun,
        TaskRun,
        build_argv,
        resolve_task_command,
    )
    from keeper_task.emulator.records import (
        KEEPER_LOGGER_TOPIC,
        BrokerMessage,
        DeniedOperation,
        Notice,
        OutputLine,
        RequestRecord,
    )
    from keeper_task.emulator.settings_store import AGENT_PLUGIN, SettingsStore
    from keeper_task.emulator.state import EmulatorState
    from keeper_task.emulator.tiers import ProcessRegistry, Tier

# Loaded on first use: `keeper_task.emulator.errors` (what `keeper-task dev` catches) must be
# importable without the [emulator] extra, so that a missing extra is one clear line.
_WHERE = {
    "AGENT_PLUGIN": "settings_store",
    "EXIT_NOT_STARTED": "launcher",
    "EXIT_TIMEOUT": "launcher",
    "KEEPER_LOGGER_TOPIC": "records",
    "AgentBehaviour": "behaviour",
    "BrokerMessage": "records",
    "DeniedOperation": "records",
    "Emulator": "core",
    "EmulatorState": "state",
    "Faults": "faults",
    "JobRun": "launcher",
    "Notice": "records",
    "OutputLine": "records",
    "ProcessRegistry": "tiers",
    "RequestRecord": "records",
    "ScriptedFault": "faults",
    "SettingsStore": "settings_store",
    "TaskRun": "launcher",
    "Tier": "tiers",
    "build_argv": "launcher",
    "job_id_of_client": "broker",
    "parse_broker_spec": "broker",
    "parse_setting": "core",
    "resolve_task_command": "launcher",
    "topic_allowed": "broker",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'keeper_task.emulator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"keeper_task.emulator.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AGENT_PLUGIN",
    "EXIT_NOT_STARTED",
    "EXIT_TIMEOUT",
    "KEEPER_LOGGER_TOPIC",
    "AgentBehaviour",
    "BrokerMessage",
    "DeniedOperation",
    "Emulator",
    "EmulatorError",
    "EmulatorState",
    "Faults",
    "JobRun",
    "Notice",
    "OutputLine",
    "ProcessRegistry",
    "RequestRecord",
    "ScriptedFault",
    "SettingsStore",
    "TaskRun",
    "Tier",
    "build_argv",
    "job_id_of_client",
    "parse_broker_spec",
    "parse_setting",
    "resolve_task_command",
    "topic_allowed",
]
