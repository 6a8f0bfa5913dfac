"""Helpers for emulator tests: job JSON builders and small probe scripts run as real processes.

The probes are what a launched task would do, written with httpx / paho directly so the tests
pin down the emulator's behaviour independently of the runtime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PYTHON = sys.executable

# GET a path until it answers 200 or the deadline passes; print every status, one per line.
HTTP_PROBE = r"""
import ssl, sys, time, httpx
base, path, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
end = time.monotonic() + deadline
with httpx.Client(verify=ctx, trust_env=False) as client:
    while True:
        status = client.get(base + path).status_code
        print(status, flush=True)
        if status == 200 or time.monotonic() >= end:
            break
        time.sleep(0.05)
"""

# Spawn a child running HTTP_PROBE (a PyInstaller onefile binary does the same) and relay it.
CHILD_PROBE = r"""
import subprocess, sys
code = open(sys.argv[1]).read()
sys.exit(subprocess.call([sys.executable, "-c", code, *sys.argv[2:]]))
"""

# Connect to the broker with a client id, publish to each topic at QoS 1, subscribe to each
# filter; print "connect <rc>", then "sub <filter> <granted>" lines.
MQTT_PROBE = r"""
import json, ssl, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pubs = json.loads(sys.argv[4]); subs = json.loads(sys.argv[5])
connected = threading.Event(); result = {}
def on_connect(c, u, f, rc, p=None):
    result["rc"] = rc.value if hasattr(rc, "value") else int(rc); connected.set()
granted = {}
subbed = threading.Event()
def on_subscribe(c, u, mid, codes, p=None):
    granted[mid] = [getattr(x, "value", x) for x in codes]; subbed.set()
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
c.tls_set_context(ctx)
c.on_connect = on_connect; c.on_subscribe = on_subscribe
c.connect(host, port); c.loop_start()
connected.wait(10)
print("connect", result.get("rc"), flush=True)
if result.get("rc") == 0:
    for topic in pubs:
        c.publish(topic, json.dumps({"topic": topic}), qos=1).wait_for_publish(5)
    for flt in subs:
        subbed.clear()
        _, mid = c.subscribe(flt, qos=1)
        subbed.wait(5)
        print("sub", flt, granted.get(mid), flush=True)
    c.disconnect()
c.loop_stop()
"""


def write_script(directory: Path, name: str, code: str) -> Path:
    """Write ``code`` to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(code)
    return path


def job_data(job_id: str = "probe-job", **overrides: Any) -> dict[str, Any]:
    """A valid job JSON object with one task; keyword arguments replace root keys."""
    data: dict[str, Any] = {
        "id": job_id,
        "name": "Probe job",
        "enabled": True,
        "events": [{"eventType": "Startup"}],
        "mqttTopics": {"allowedPublications": ["KeeperLogger"], "allowedSubscriptions": []},
        "tasks": [
            {
                "id": "probe",
                "name": "Probe",
                "command": "probe",
                "arguments": "--keeper-api-base={KeeperApiBaseUrl}",
                "timeoutSeconds": 30,
                "continueOnFailure": False,
            }
        ],
    }
    data.update(overrides)
    return data


def write_job(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as ``directory/<id>.json``."""
    path = directory / f"{data['id']}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
