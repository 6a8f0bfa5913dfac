"""Cold start: from exec to entering ``run()`` with settings fetched and MQTT connected.

Run from the repository root (the test extra installed)::

    python benchmarks/cold_start.py [--rounds 15]

Three programs are started as fresh processes, each ``--rounds`` times, alternating:

(a) the hello ``Task`` (keeper-task: arguments, TLS policy, Plugin Settings GET, MQTT
    connect over TLS, structured logging);
(a2) the same task with the agent client on httpx's own transport (``httpx.HTTPTransport``)
    instead of keeper-task's (the measurement behind that choice: see
    ``keeper_task/agent/_transport.py``);
(b) a hand-written script doing the same steps with argparse + httpx + paho-mqtt;
(c) the floor: the interpreter plus importing the four runtime dependencies.

Each child prints ``time.time_ns()`` when it reaches its "run" point; the parent subtracts
the time it spawned the child. A real HTTPS server (throwaway CA) serves the agent settings
and a real broker (mosquitto when installed, else amqtt in this process) takes the MQTT
connection. Prints medians and the ratios (goal: a/c <= 1.15).
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.support.brokers import (  # noqa: E402
    AmqttBroker,
    BrokerBase,
    MosquittoBroker,
    find_mosquitto,
    make_ca_files,
)
from tests.support.fake_agent import FakeAgent  # noqa: E402

HELLO_TASK = textwrap.dedent(
    """
    import os, sys, time
    from keeper_task import Task, TaskContext

    class Hello(Task):
        def run(self, ctx: TaskContext) -> None:
            os.write(1, f"{time.time_ns()}\\n".encode())
            ctx.log.info("hello", broker=ctx.agent_settings.broker_host)

    if __name__ == "__main__":
        Hello.main()
    """
)

# (a2): the hello task with the agent client's transport swapped for httpx's own one.
HELLO_ON_HTTPX_TRANSPORT = HELLO_TASK.replace(
    "from keeper_task import Task, TaskContext",
    "from keeper_task import Task, TaskContext\n"
    "import httpx, keeper_task.agent._http as agent_http\n"
    "agent_http.AgentTransport = lambda *, ssl_context: httpx.HTTPTransport(verify=ssl_context)",
)

HAND_WRITTEN = textwrap.dedent(
    """
    import argparse, json, os, socket, ssl, sys, threading, time
    import httpx
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    p = argparse.ArgumentParser()
    p.add_argument("--keeper-api-base", required=True)
    args = p.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with httpx.Client(verify=ctx, timeout=5) as http:
        r = http.get(args.keeper_api_base + "/api/PluginSettings/KeeperPrivilegeManager")
        r.raise_for_status()
        settings = r.json()
    job_id = os.environ["KEEPER_JOB_ID"]
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"{job_id}_hand")
    if settings.get("broker.tls", "true") != "false":
        client.tls_set_context(ctx)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.on_socket_open = lambda c, u, s: s.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.connect(settings["broker.host"], int(settings["broker.port"]), keepalive=30)
    client.loop_start()
    connected.wait(10)
    os.write(1, f"{time.time_ns()}\\n".encode())
    info = client.publish("KeeperLogger", json.dumps({"message": "hello"}), qos=1)
    info.wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    """
)

FLOOR = (
    "import os, time, httpx, paho.mqtt.client, pydantic_settings, structlog; "
    "os.write(1, f'{time.time_ns()}\\n'.encode())"
)


# The transport alone, in a process that has already imported keeper-task (as a task has):
# building httpx's own transport imports httpcore, h11 and anyio; ours imports nothing more.
TRANSPORT_COST = (
    "import os, ssl, time, httpx, keeper_task.agent._transport as t\n"
    "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
    "start = time.perf_counter()\n"
    "{build}\n"
    "os.write(1, f'{{(time.perf_counter() - start) * 1000}}\\n'.encode())\n"
)
TRANSPORTS = {
    "keeper-task's AgentTransport": "t.AgentTransport(ssl_context=ctx)",
    "httpx.HTTPTransport": "httpx.HTTPTransport(verify=ctx)",
}


def _transport_cost(rounds: int, env: dict[str, str]) -> None:
    samples: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    for _ in range(rounds):
        for name, build in TRANSPORTS.items():
            code = TRANSPORT_COST.format(build=build)
            proc = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            samples[name].append(float(proc.stdout))
    print(f"building the agent client's transport, median (min) of {rounds} fresh processes")
    for name, values in samples.items():
        print(f"  {name:<40} {statistics.median(values):8.1f} ms ({min(values):.1f})")


def _start_broker(certs_dir: Path) -> BrokerBase:
    certs = make_ca_files(certs_dir)
    if find_mosquitto() is not None:
        return MosquittoBroker(certs=certs).start()
    return AmqttBroker(certs=certs).start()


def _measure(argv: list[str], env: dict[str, str]) -> float:
    start = time.time_ns()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    reached = int(proc.stdout.strip().splitlines()[0])
    return (reached - start) / 1e6


def main() -> int:
    # pip byte-compiles the dependencies at install time; an editable checkout (and a machine
    # with PYTHONDONTWRITEBYTECODE set) would make every run compile keeper_task from source.
    # A frozen binary ships byte code too, so compare like with like.
    compileall.compile_dir(str(ROOT / "keeper_task"), quiet=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        broker = _start_broker(tmpdir / "certs")
        settings = {
            "broker.host": broker.host,
            "broker.port": str(broker.port),
            "broker.tls": "true" if broker.tls else "false",
        }
        try:
            with FakeAgent(trustme.CA(), settings) as agent:
                hello = tmpdir / "hello.py"
                hello.write_text(HELLO_TASK)
                hello_httpx = tmpdir / "hello_httpx.py"
                hello_httpx.write_text(HELLO_ON_HTTPX_TRANSPORT)
                hand = tmpdir / "hand.py"
                hand.write_text(HAND_WRITTEN)
                env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env.update(
                    KEEPER_JOB_ID="bench-job",
                    KEEPER_JOB_NAME="bench",
                    KEEPER_TASK_LOG_FORMAT="json",
                )
                base = f"--keeper-api-base={agent.base_url}"
                programs = {
                    "a: hello Task": [sys.executable, str(hello), base],
                    "a2: hello Task, httpx.HTTPTransport": [
                        sys.executable,
                        str(hello_httpx),
                        base,
                    ],
                    "b: hand-written httpx+paho+argparse": [sys.executable, str(hand), base],
                    "c: floor (interpreter + 4 imports)": [sys.executable, "-c", FLOOR],
                }
                for argv in programs.values():  # warm the OS file cache once
                    _measure(argv, env)
                samples: dict[str, list[float]] = {name: [] for name in programs}
                for _ in range(opts.rounds):
                    for name, argv in programs.items():
                        samples[name].append(_measure(argv, env))
        finally:
            broker.stop()  # type: ignore[attr-defined]
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"cold start to run(), median of {opts.rounds} rounds (broker: {broker.name}, TLS)")
    for name, value in medians.items():
        print(f"  {name:<40} {value:8.1f} ms")
    a, _a2, b, c = medians.values()
    print(f"ratio a/c = {a / c:.3f}   (goal <= 1.15)")
    print(f"ratio a/b = {a / b:.3f}   (keeper-task vs. hand-written)")
    # Paired per round (the two ran back to back), so load drift on a shared machine cancels.
    names = list(samples)
    paired = [y - x for x, y in zip(samples[names[0]], samples[names[1]], strict=True)]
    print(
        f"a2 - a = {statistics.median(paired):+.1f} ms median of per-round differences "
        f"(httpx's own transport vs. keeper-task's; > 0: keeper-task's starts faster)"
    )
    _transport_cost(opts.rounds, {**os.environ, "PYTHONPATH": str(ROOT)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
