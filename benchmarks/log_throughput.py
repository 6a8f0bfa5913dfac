"""Log throughput: ctx.log events delivered to KeeperLogger vs. a raw paho publish loop.

Run from the repository root::

    python benchmarks/log_throughput.py [--count 10000] [--rounds 5] [--broker auto|mosquitto|amqtt]

(a) ``count`` ``log.info("item.processed", i=i, ...)`` events through
    ``configure_logging(fmt="json")`` (stderr lines to /dev/null, line-buffered like a
    real stderr pipe) + ``attach()`` to an :class:`~keeper_task.mqtt.MqttClient` publishing
    to ``KeeperLogger`` at QoS 1, then ``disconnect()``: timed until every message is acked.
(b) a hand-written paho loop (TCP_NODELAY, same in-flight window as MqttClient) publishing the
    *same payload bytes* at QoS 1, timed until every PUBACK arrived and it disconnected.

A subscriber in a separate process counts what the broker delivered in both runs. The broker
is mosquitto (separate process) when installed, else amqtt embedded in this process (which
then competes for the GIL; the ratio is less meaningful). Each round runs (a) then (b) and
gives one ratio throughput(a)/throughput(b); the verdict is the MEDIAN of the rounds' ratios
(single rounds swing widely when other processes share the CPUs). Goal: median >= 0.7, zero
lost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from keeper_task.logging import configure_logging  # noqa: E402
from keeper_task.mqtt import MqttClient  # noqa: E402
from tests.support.brokers import AmqttBroker, MosquittoBroker, find_mosquitto  # noqa: E402

TOPIC = "KeeperLogger"
#: CPU seconds of this process (all threads) per run: robust against other load on the machine.
CPU: dict[str, list[float]] = {"a": [], "b": []}


class Subscriber:
    """The verification subscriber, in its own process."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.brokers",
                "collect",
                host,
                str(port),
                TOPIC,
                str(count),
                "5",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"subscriber failed to start: {line!r}")

    def result(self) -> dict[str, int]:
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out.strip().splitlines()[-1]))


def run_framework(
    host: str, port: int, count: int, devnull: object
) -> tuple[float, int, list[bytes]]:
    """(a): structlog events -> LogPipeline -> MqttClient; returns (seconds, lost, payloads)."""
    pipeline = configure_logging(
        fmt="json",
        stream=devnull,
        job_id="bench-job",  # type: ignore[arg-type]
        job_name="log-throughput",
    )
    log = pipeline.get_logger()
    client = MqttClient(
        host=host,
        port=port,
        client_id="bench-job_framework",
        ssl_context=None,
        allowed_publications=[TOPIC, "Jobs/bench-job/events"],
    )
    client.connect()
    sent: list[bytes] = []

    def publish(payload: bytes) -> None:
        client.publish(TOPIC, payload, qos=1)
        sent.append(payload)

    pipeline.attach(publish, batch=True)  # as the Task runtime attaches it
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(count):
        log.info("item.processed", i=i, item=f"item-{i}", status="ok", elapsed_ms=1.25)
    pipeline.detach()  # hands over what is batched, as the Task runtime does on exit
    lost = client.disconnect(timeout=30)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    CPU["a"].append(cpu)
    return elapsed, lost, sent


def run_raw(host: str, port: int, payloads: list[bytes], inflight: int) -> tuple[float, int]:
    """(b): a raw paho loop of the same payloads; returns (seconds, lost)."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-job_raw",
        clean_session=True,
    )
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    acked = 0
    done = threading.Event()
    connected = threading.Event()
    n = len(payloads)

    def on_publish(*_a: object) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client.on_publish = on_publish
    client.on_connect = lambda *_a: connected.set()
    client.on_socket_open = lambda _c, _u, s: s.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    client.connect(host, port, keepalive=30)
    client.loop_start()
    connected.wait(10)
    c0, t0 = time.process_time(), time.perf_counter()
    for p in payloads:
        client.publish(TOPIC, p, qos=1)
    done.wait(60)
    client.disconnect()
    client.loop_stop()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    CPU["b"].append(cpu)
    return elapsed, n - acked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    args = ap.parse_args()

    use_mosquitto = args.broker == "mosquitto" or (args.broker == "auto" and find_mosquitto())
    broker = MosquittoBroker() if use_mosquitto else AmqttBroker()
    where = "separate process" if use_mosquitto else "embedded in this process"
    print(
        f"broker: {broker.name} ({where}), plain TCP; {args.count} QoS 1 messages, "
        f"{args.rounds} rounds (verdict: median of the per-round ratios)"
    )
    started = time.perf_counter()
    with broker, open(os.devnull, "w", buffering=1) as devnull:
        # Warm-up: imports, first connections, JIT-free but cache-warm paths.
        _, _, payloads = run_framework(broker.host, broker.port, 500, devnull)
        run_raw(broker.host, broker.port, payloads, inflight=0)

        a_times: list[float] = []
        b_times: list[float] = []
        a_lost = b_lost = a_missing = b_missing = 0
        size = 0
        for _ in range(args.rounds):
            sub = Subscriber(broker.host, broker.port, args.count)
            t, lost, payloads = run_framework(broker.host, broker.port, args.count, devnull)
            got = sub.result()
            a_times.append(t)
            a_lost += lost
            a_missing += args.count - got["distinct"]
            size = len(payloads[0])

            sub = Subscriber(broker.host, broker.port, args.count)
            t, lost = run_raw(broker.host, broker.port, payloads, inflight=0)
            got = sub.result()
            b_times.append(t)
            b_lost += lost
            b_missing += args.count - got["distinct"]

        raw_default, _ = run_raw(broker.host, broker.port, payloads, inflight=20)

    ta, tb = min(a_times), min(b_times)
    ra, rb = args.count / ta, args.count / tb
    print(f"payload size: {size} bytes")
    print(
        f"(a) keeper-task log -> KeeperLogger : best {ta * 1000:7.1f} ms  {ra:8.0f} msg/s  "
        f"(median {statistics.median(a_times) * 1000:.1f} ms)  unacked={a_lost} "
        f"missing at subscriber={a_missing}"
    )
    print(
        f"(b) raw paho publish loop          : best {tb * 1000:7.1f} ms  {rb:8.0f} msg/s  "
        f"(median {statistics.median(b_times) * 1000:.1f} ms)  unacked={b_lost} "
        f"missing at subscriber={b_missing}"
    )
    print(f"    (raw paho with its default 20 in-flight window: {raw_default * 1000:.1f} ms)")
    cpu_a = statistics.median(CPU["a"][-args.rounds :])
    cpu_b = statistics.median(CPU["b"][-args.rounds - 1 : -1])
    print(
        f"    CPU time of this process (median): a {cpu_a * 1000:.0f} ms, b {cpu_b * 1000:.0f} ms"
        f" -> CPU ratio {cpu_b / cpu_a:.2f} (less sensitive to other load on the machine)"
    )
    rounds = [b / a for a, b in zip(a_times, b_times, strict=True)]
    ratio = statistics.median(rounds)
    print(
        f"    per-round ratios: {', '.join(f'{r:.2f}' for r in rounds)}; "
        f"best-of-rounds ratio {ra / rb:.2f}"
    )
    ok = ratio >= 0.7 and a_lost == b_lost == a_missing == b_missing == 0
    print(
        f"ratio throughput(a)/throughput(b), median of {args.rounds} rounds = {ratio:.2f}  "
        f"(goal >= 0.70)  lost: a={a_lost + a_missing} b={b_lost + b_missing}  "
        f"-> {'OK' if ok else 'MISSED'}"
    )
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
