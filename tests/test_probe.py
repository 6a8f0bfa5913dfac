"""The probe job measures the emulator's configured behaviours exactly; --apply closes the loop.

Each configuration is an :class:`AgentBehaviour` the emulator is started with; ``keeper-task
doctor probe`` deploys the probe through the Admin API, and its report must name exactly
that behaviour (and ``AgentBehaviour.from_probe_report`` must give it back).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from keeper_task.cli import main
from keeper_task.emulator import Emulator
from keeper_task.emulator.behaviour import AgentBehaviour
from keeper_task.probe import MAIN_JOB_ID, TIMEOUT_JOB_ID
from keeper_task.probe.task import CLIENT_ID_CANDIDATES

pytestmark = pytest.mark.slow

SECRET = "s3cret-value-never-shown"

CONFIGS = {
    "defaults": AgentBehaviour(),
    "job-id-only, 403 window, env context, SIGTERM": AgentBehaviour(
        client_id_format="{job_id}",
        register_delay=4.0,
        context_via="env",
        signal_before_kill=True,
        kill_grace=1.5,
    ),
    "pid, stdin context, hard kill": AgentBehaviour(
        client_id_format="{job_id}_{pid}", context_via="stdin", signal_before_kill=False
    ),
    "name and pid, args context, long grace": AgentBehaviour(
        client_id_format="{job_id}_{job_name}_{pid}",
        context_via="args",
        signal_before_kill=True,
        kill_grace=3.0,
    ),
    "file context in a custom variable": AgentBehaviour(
        client_id_format="{job_id}_{job_name}",
        context_via="file",
        context_env_var="AGENT_CONTEXT_FILE",
        signal_before_kill=False,
    ),
}


def probe(agent: Emulator, tmp_path: Path, capsys, *extra: str) -> dict:
    out = tmp_path / "report.json"
    code = main(
        [
            "doctor",
            "probe",
            "--agent-root",
            str(agent.agent_root),
            "--cert",
            str(agent.admin_cert),
            "--key",
            str(agent.admin_key),
            "--ca-bundle",
            str(agent.ca_bundle),
            "--output",
            str(out),
            "--wait",
            "60",
            *extra,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    report["_printed"] = printed
    return report


@pytest.mark.parametrize("label", list(CONFIGS))
def test_probe_reports_the_configured_behaviour(label: str, tmp_path: Path, capsys) -> None:
    behaviour = CONFIGS[label]
    secrets = {"KEEPER_API_TOKEN": SECRET, "DB_PASSWORD": SECRET, "KEEPER_TASK_MODE": "fast"}
    with Emulator(behaviour=behaviour, task_env=secrets) as agent:
        report = probe(agent, tmp_path, capsys)
        # The probe jobs were removed again (no --keep).
        assert agent.job(MAIN_JOB_ID) is None
        assert agent.job(TIMEOUT_JOB_ID) is None
        base_url = agent.base_url

    assert report["kind"] == "keeper-task-probe-report"
    assert report["process"]["apiBaseArgument"] == base_url
    assert report["environment"]["keeperValues"]["KEEPER_JOB_ID"] == MAIN_JOB_ID
    # Names only for what may be secret: the names are there, the values nowhere.
    names = report["environment"]["names"]
    assert {"KEEPER_API_TOKEN", "DB_PASSWORD"} <= set(names)
    assert report["environment"]["keeperValues"]["KEEPER_TASK_MODE"] == "fast"
    assert SECRET not in json.dumps(report)

    # Client ids: exactly the enforced format is accepted (all of them without a rule).
    accepted = [c["template"] for c in report["mqtt"]["clientIds"] if c["accepted"]]
    expected = (
        list(CLIENT_ID_CANDIDATES)
        if behaviour.client_id_format is None
        else [behaviour.client_id_format]
    )
    assert accepted == expected
    assert all(c["logAcked"] for c in report["mqtt"]["clientIds"] if c["accepted"])
    assert report["mqtt"]["undeclaredPublish"]["outcome"] == "dropped-silently"

    # Context: where the marker arrived, and only there.
    context = report["context"]
    if behaviour.context_via == "none":
        assert context["found"] == []
        assert context["marker"] is None
    else:
        assert context["matched"] is True
        name = {
            "env": behaviour.context_env_var,
            "file": f"env:{behaviour.context_env_var}",
            "stdin": "stdin",
        }.get(behaviour.context_via)
        [found] = context["found"]
        assert found["via"] == behaviour.context_via
        if name is not None:
            assert found["name"] == name

    # The 403 window: refusals while the launch was not registered yet, none without delay.
    trust = report["trust"]
    if behaviour.register_delay:
        assert trust["forbidden"] > 0
        assert trust["windowSeconds"] >= behaviour.register_delay - 0.1
    else:
        assert trust["forbidden"] == 0

    # Timeout: a signal first (and the grace until the kill), or a kill without one.
    timeout = report["timeout"]
    assert timeout["measured"] is True
    if behaviour.signal_before_kill:
        assert timeout["signal"] == "SIGTERM"
        grace = behaviour.kill_grace
        assert grace - 0.5 <= timeout["secondsBeforeKill"] <= grace + 0.5
    else:
        assert timeout["signal"] is None

    # The report gives the behaviour back.
    measured = AgentBehaviour.from_probe_report(report)
    assert measured.client_id_format == behaviour.client_id_format
    assert measured.context_via == behaviour.context_via
    if behaviour.context_via in ("env", "file"):
        assert measured.context_env_var == behaviour.context_env_var
    assert measured.signal_before_kill == behaviour.signal_before_kill
    assert (measured.register_delay > 0) == (behaviour.register_delay > 0)

    # Printed: the measurement and the recommended client-id template.
    template = report["recommended"]["mqttClientIdTemplate"]
    assert template == (behaviour.client_id_format or "{job_id}_{job_name}")
    assert f"--mqtt-client-id-template={template}" in report["_printed"]


def _generated_project(tmp_path: Path) -> Path:
    assert main(["new", "demo-task", "--os", "linux", "--dir", str(tmp_path / "demo")]) == 0
    return tmp_path / "demo"


def test_apply_makes_a_generated_task_connect_where_defaults_failed(tmp_path: Path, capsys) -> None:
    project = _generated_project(tmp_path)
    capsys.readouterr()
    job_file = project / "jobs" / "linux" / "demo-task.json"
    task_py = project / "src" / "demo_task" / "task.py"
    behaviour = CONFIGS["job-id-only, 403 window, env context, SIGTERM"]
    with Emulator(behaviour=behaviour) as agent:
        agent.add_job(job_file)
        before = agent.run_job("demo-task", command=[sys.executable, str(task_py)], wait=120)
        assert before.exit_code == 75  # the default client id is refused by this broker
        assert not [m for m in agent.logs() if m.get("message") == "demo_task.finished"]

        report = probe(agent, tmp_path, capsys, "--apply", str(project))
        assert "applied to" in report["_printed"]
        arguments = json.loads(job_file.read_text())["tasks"][0]["arguments"]
        assert "--mqtt-client-id-template={job_id}" in arguments

        agent.add_job(job_file)
        after = agent.run_job("demo-task", command=[sys.executable, str(task_py)], wait=120)
        assert after.exit_code == 0, after.tasks[0].stderr
        finished = [m for m in agent.logs() if m.get("message") == "demo_task.finished"]
        assert len(finished) == 1


def test_dev_agent_like_report(tmp_path: Path) -> None:
    report = {
        "kind": "keeper-task-probe-report",
        "mqtt": {
            "clientIds": [
                {"template": "{job_id}", "accepted": False},
                {"template": "{job_id}_{pid}", "accepted": True, "logAcked": True},
            ]
        },
        "trust": {"windowSeconds": 0.8, "forbidden": 5},
        "context": {"found": [{"via": "stdin", "name": "stdin"}]},
        "timeout": {"measured": True, "signal": None},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    agent = Emulator.from_probe_report(path)
    assert agent.behaviour == AgentBehaviour(
        client_id_format="{job_id}_{pid}",
        register_delay=0.8,
        context_via="stdin",
        signal_before_kill=False,
    )
    assert agent.register_delay == 0.8


def test_dev_run_like_report_passes_the_context_on_stdin(tmp_path: Path, capsys) -> None:
    report = {
        "kind": "keeper-task-probe-report",
        "context": {"found": [{"via": "stdin", "name": "stdin"}]},
    }
    like = tmp_path / "report.json"
    like.write_text(json.dumps(report))
    job = tmp_path / "like-job.json"
    job.write_text(
        json.dumps(
            {
                "id": "like-job",
                "name": "Like",
                "enabled": True,
                "events": [{"eventType": "Startup"}],
                "tasks": [{"id": "t", "command": "echoer", "arguments": "{KeeperApiBaseUrl}"}],
            }
        )
    )
    script = tmp_path / "echoer.py"
    script.write_text("import sys\nprint('GOT', sys.stdin.read().strip())\n")
    args = ["dev", "run", str(job), "--task", f"{sys.executable} {script}"]
    assert main([*args, "--context", '{"k": "v"}', "--like", str(like)]) == 0
    assert 'GOT {"k":"v"}' in capsys.readouterr().out
    # Without the report the emulator's default passes no context.
    assert main([*args, "--context", '{"k": "v"}']) == 0
    out = capsys.readouterr().out
    assert "GOT" in out
    assert '"k"' not in out


def test_probe_needs_the_admin_certificate(capsys, monkeypatch) -> None:
    monkeypatch.delenv("KEEPER_ADMIN_CERT", raising=False)
    assert main(["doctor", "probe", "--agent-root", "."]) == 64
    err = capsys.readouterr().err
    assert "needs --cert" in err
    assert "Traceback" not in err


def test_probe_refused_by_the_agent_is_one_line_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    with Emulator() as agent:
        code = main(
            [
                "doctor",
                "probe",
                "--agent-root",
                str(agent.agent_root),
                "--cert",
                str(agent.admin_cert),
                "--key",
                str(agent.admin_key),
                "--python",
                str(tmp_path / "no-such-python"),
            ]
        )
        err = capsys.readouterr().err
        assert code == 69
        assert "refused probe job 'keeper-task-probe'" in err
        assert "Traceback" not in err
        assert agent.jobs() == []
