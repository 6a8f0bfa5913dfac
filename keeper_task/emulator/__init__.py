"""A local agent emulator for developing and testing job tasks (tooling, extra ``[dev]``).

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

__all__ = [
    "AGENT_PLUGIN",
    "EXIT_NOT_STARTED",
    "EXIT_TIMEOUT",
    "KEEPER_LOGGER_TOPIC",
    "BrokerMessage",
    "DeniedOperation",
    "Emulator",
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
