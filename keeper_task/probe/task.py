"""The probe job's task: launched by the agent, it measures what the agent does not document.

Run as ``python -m keeper_task.probe --keeper-api-base={KeeperApiBaseUrl} --report-dir DIR``
(``--mode timeout`` for the deliberately timing-out second job). Everything it records that
may be secret is recorded by name only: environment variable names (values only of
``KEEPER_*`` variables whose names do not look secret), settings key names (values only of
``broker.host``/``broker.port``/``broker.tls``), argument values of secret-looking options
replaced by ``[redacted]``.

Main mode writes ``DIR/main.json`` (atomically), prints the same JSON on stdout and publishes
it to ``KeeperLogger``. Timeout mode appends JSON lines to ``DIR/timeout.jsonl``: ``start``,
an ``alive`` heartbeat every 0.1 s, and each ``signal`` it receives (it keeps running, so the
time from the signal to the kill can be measured), until it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

_T0 = time.monotonic()

#: The trigger context carries ``{"keeperTaskProbe": "<marker>"}``; the marker's form.
MARKER_PATTERN = re.compile(r"ktp-[0-9a-f]{16}")
#: Client-id templates tried in order (each keeps the job id as the first ``_`` segment).
CLIENT_ID_CANDIDATES = (
    "{job_id}",
    "{job_id}_{job_name}",
    "{job_id}_{pid}",
    "{job_id}_{job_name}_{pid}",
)
#: A topic the probe job does not declare (for the "publish outside allowedPublications" check).
UNDECLARED_TOPIC = "KeeperTaskProbe/undeclared"
_SECRET = re.compile(r"pass|secret|token|key|credential|auth|cookie|private", re.IGNORECASE)
_NAME_OK = re.compile(r"[^A-Za-z0-9-]")


def _now() -> float:
    return round(time.monotonic() - _T0, 3)


def _since_process_start() -> float:
    """Seconds since this process was created (the agent's spawn), else since import."""
    try:
        import psutil

        return round(time.time() - float(psutil.Process().create_time()), 3)
    except Exception:  # psutil absent: the module's import time is the next best start
        return _now()


def _real_argv() -> list[str]:
    """The command line as the agent started it (``python -m`` rewrites ``sys.argv[0]``)."""
    try:
        import psutil

        return [str(a) for a in psutil.Process().cmdline()]
    except Exception:  # psutil absent: what Python kept of it
        return list(sys.argv)


def _redact_arg(arg: str) -> str:
    name, sep, _value = arg.partition("=")
    if sep and name.startswith("-") and _SECRET.search(name):
        return f"{name}=[redacted]"
    return arg


def _parent() -> dict[str, Any]:
    ppid = os.getppid()
    name: str | None = None
    try:
        import psutil

        name = psutil.Process(ppid).name()
    except Exception:  # psutil absent or the parent gone: the PID alone still says something
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{ppid}/comm").read_text().strip() or None
    return {"pid": ppid, "name": name}


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return None


def _read_stdin(timeout: float) -> str:
    """Whatever arrives on stdin within ``timeout`` seconds (nothing from a terminal).

    Reads what is available (``os.read``), so data written to a pipe the agent keeps open is
    seen too, not only data followed by end of file.
    """
    stream = sys.stdin
    if stream is None or stream.closed:
        return ""
    try:
        if stream.isatty():
            return ""
        fd = stream.fileno()
    except (OSError, ValueError):
        return ""
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _file_has_marker(value: str, marker: str) -> bool:
    try:
        path = Path(value)
        if not path.is_file() or path.stat().st_size > 1_000_000:
            return False
        return marker in path.read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return False


def find_context(
    argv: list[str], environ: dict[str, str], stdin_text: str
) -> tuple[str | None, list[dict[str, Any]]]:
    """Find the trigger marker: ``(marker, [{"via", "name"}...])`` in args, env, stdin, files."""
    texts = [*argv, *environ.values(), stdin_text]
    marker = next((m.group(0) for t in texts if (m := MARKER_PATTERN.search(t))), None)
    if marker is None:
        # A file path may carry it: look inside files named by arguments and variables.
        marker = _marker_in_files([*argv, *environ.values()])
    if marker is None:
        return None, []
    return marker, _marker_sources(marker, argv, environ, stdin_text)


def _marker_in_files(texts: list[str]) -> str | None:
    """The first marker inside a file that one of ``texts`` names, if any."""
    for text in texts:
        with contextlib.suppress(OSError, ValueError):
            if len(text) < 4096 and Path(text).is_file():
                hit = MARKER_PATTERN.search(Path(text).read_text(errors="replace")[:1_000_000])
                if hit:
                    return hit.group(0)
    return None


def _marker_sources(
    marker: str, argv: list[str], environ: dict[str, str], stdin_text: str
) -> list[dict[str, Any]]:
    """Every place ``marker`` arrived: ``[{"via", "name"}...]``."""
    found: list[dict[str, Any]] = []
    for index, arg in enumerate(argv):
        if marker in arg:
            found.append({"via": "args", "name": f"argv[{index}]"})
        elif len(arg) < 4096 and _file_has_marker(arg, marker):
            found.append({"via": "file", "name": f"argv[{index}]"})
    for name in sorted(environ):
        value = environ[name]
        if marker in value:
            found.append({"via": "env", "name": name})
        elif len(value) < 4096 and _file_has_marker(value, marker):
            found.append({"via": "file", "name": f"env:{name}"})
    if marker in stdin_text:
        found.append({"via": "stdin", "name": "stdin"})
    return found


def _env_report(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for name in sorted(environ):
        if not name.upper().startswith("KEEPER_") or _SECRET.search(name):
            continue
        value = environ[name]
        values[name] = "[trigger context]" if MARKER_PATTERN.search(value) else value
    return {"names": sorted(environ), "keeperValues": values}


def _trust_window(base_url: str, ssl_context: Any, wait: float) -> tuple[dict[str, Any], Any]:
    """Poll Plugin Settings until 200: the startup 403 window, measured from process start."""
    from keeper_task.agent.plugin_settings import PluginSettingsClient
    from keeper_task.agent.retry import RetryPolicy
    from keeper_task.errors import KeeperTaskError, NotTrustedError

    forbidden = other = 0
    last_error = None
    settings = None
    deadline = time.monotonic() + wait
    first_call = _since_process_start()
    with PluginSettingsClient(
        base_url, ssl_context=ssl_context, timeout=5.0, retry=RetryPolicy(budget=0)
    ) as client:
        while True:
            try:
                settings = client.get_all("KeeperPrivilegeManager")
                break
            except NotTrustedError:
                forbidden += 1
            except KeeperTaskError as exc:
                other += 1
                last_error = str(exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    window = _since_process_start() if settings is not None else None
    return (
        {
            "windowSeconds": window,
            "firstCallSeconds": first_call,
            "forbidden": forbidden,
            "otherErrors": other,
            "lastError": last_error,
        },
        settings,
    )


class _Events:
    """A logger for :class:`~keeper_task.mqtt.MqttClient`: remembers the event names."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def info(self, event: str, **_kw: Any) -> None:
        self.names.append(event)

    warning = info
    error = info
    debug = info


def _mqtt(
    settings: dict[str, str], job_id: str | None, job_name: str | None, ctx: Any
) -> dict[str, Any]:
    from keeper_task.errors import KeeperTaskError, MqttError
    from keeper_task.mqtt import MqttClient

    host = settings.get("broker.host", "127.0.0.1")
    port = int(settings.get("broker.port", "8675"))
    tls = settings.get("broker.tls", "true").lower() != "false"
    result: dict[str, Any] = {"host": host, "port": port, "tls": tls, "clientIds": []}
    if not job_id:
        result["skipped"] = "KEEPER_JOB_ID is not set (does the job declare mqttTopics?)"
        return result
    name = _NAME_OK.sub("-", job_name or "") or "task"
    accepted_id: str | None = None
    for template in CLIENT_ID_CANDIDATES:
        client_id = template.format(job_id=job_id, job_name=name, pid=os.getpid())
        entry: dict[str, Any] = {"template": template, "accepted": False, "logAcked": False}
        client = MqttClient(
            host=host,
            port=port,
            client_id=client_id,
            ssl_context=ctx if tls else None,
            connect_timeout=5.0,
            publish_timeout=5.0,
        )
        try:
            client.connect()
        except MqttError as exc:
            entry["refusal"] = exc.rc if exc.rc is not None else str(exc)
            result["clientIds"].append(entry)
            continue
        entry["accepted"] = True
        try:
            client.publish(
                "KeeperLogger",
                {"level": "Information", "message": "probe.client_id", "clientId": template},
                qos=1,
                wait=True,
            )
            entry["logAcked"] = True
        except KeeperTaskError as exc:
            entry["publishError"] = str(exc)
        client.disconnect(timeout=5.0)
        result["clientIds"].append(entry)
        if accepted_id is None and entry["logAcked"]:
            accepted_id = client_id
    if accepted_id is not None:
        result["undeclaredPublish"] = _undeclared(host, port, accepted_id, ctx if tls else None)
    return result


def _undeclared(host: str, port: int, client_id: str, ctx: Any) -> dict[str, Any]:
    """Publish outside ``allowedPublications``: dropped silently, or a disconnect?"""
    from keeper_task.errors import KeeperTaskError
    from keeper_task.mqtt import MqttClient

    events = _Events()
    client = MqttClient(
        host=host,
        port=port,
        client_id=client_id,
        ssl_context=ctx,
        connect_timeout=5.0,
        publish_timeout=5.0,
        logger=events,
    )
    out: dict[str, Any] = {"topic": UNDECLARED_TOPIC}
    try:
        client.connect()
        connects = events.names.count("mqtt.connected")
        try:
            client.publish(UNDECLARED_TOPIC, {"probe": "undeclared"}, qos=1, wait=True)
            out["acked"] = True
        except KeeperTaskError:
            out["acked"] = False
        # A second, declared publish tells a dropped connection (reconnect or failure) apart.
        try:
            client.publish("KeeperLogger", {"message": "probe.after_undeclared"}, qos=1, wait=True)
            after = True
        except KeeperTaskError:
            after = False
        reconnected = events.names.count("mqtt.connected") > connects
        disconnected = reconnected or not after or any("disconnect" in n for n in events.names)
        out["outcome"] = "disconnected" if disconnected else "dropped-silently"
    except KeeperTaskError as exc:
        out["outcome"] = "error"
        out["error"] = str(exc)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect(timeout=5.0)
    return out


def _broker_certificate(host: str, port: int, tls: bool, ca_bundle: str | None) -> dict[str, Any]:
    if not tls:
        return {"tls": False}
    from keeper_task.doctor.checks import certificate_report

    try:
        info, verified, error = certificate_report(host, port, ca_bundle, 5.0)
    except Exception as exc:  # any failure is a finding, not a crash of the probe
        return {"tls": True, "error": str(exc)}
    info.pop("_expired", None)
    return {"tls": True, **info, "verified": verified, "verifyError": error}


def run_main(args: argparse.Namespace) -> int:
    """Measure everything; write, print and publish the report."""
    from keeper_task.tls import client_ssl_context

    base = (args.keeper_api_base or "").rstrip("/")
    ctx = client_ssl_context(host="127.0.0.1", ca_bundle=args.ca_bundle)
    # First, before anything else can delay it: the startup 403 window.
    trust, settings = _trust_window(base, ctx, args.trust_wait) if base else ({}, None)
    environ = dict(os.environ)
    argv = _real_argv()
    stdin_text = _read_stdin(args.stdin_wait)
    marker, found = find_context(argv, environ, stdin_text)
    report: dict[str, Any] = {
        "kind": "keeper-task-probe-report",
        "version": 1,
        "process": {
            "argv": [_redact_arg(a) for a in argv],
            "apiBaseArgument": args.keeper_api_base,
            "literalTemplateArgument": args.literal_check,
            "cwd": os.getcwd(),
            "user": _user(),
            "pid": os.getpid(),
            "parent": _parent(),
            "platform": sys.platform,
        },
        "environment": _env_report(environ),
        "context": {"marker": marker, "found": found},
    }
    report["trust"] = trust
    if settings is not None:
        report["settings"] = {
            "keys": sorted(settings),
            "broker": {
                k: settings[k]
                for k in ("broker.host", "broker.port", "broker.tls")
                if k in settings
            },
        }
        mqtt = _mqtt(settings, environ.get("KEEPER_JOB_ID"), environ.get("KEEPER_JOB_NAME"), ctx)
        mqtt["certificate"] = _broker_certificate(
            mqtt["host"], mqtt["port"], mqtt["tls"], args.ca_bundle
        )
        report["mqtt"] = mqtt
    report["elapsedSeconds"] = _now()
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.report_dir:
        directory = Path(args.report_dir)
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / "main.json.tmp"
        temp.write_text(text + "\n", encoding="utf-8")
        os.replace(temp, directory / "main.json")
    print(text, flush=True)
    _publish_report(report, environ)
    return 0


def _publish_report(report: dict[str, Any], environ: dict[str, str]) -> None:
    """Also send the report to KeeperLogger, with the first accepted client id."""
    from keeper_task.errors import KeeperTaskError
    from keeper_task.mqtt import MqttClient
    from keeper_task.tls import client_ssl_context

    mqtt = report.get("mqtt") or {}
    good = [c for c in mqtt.get("clientIds", []) if c.get("logAcked")]
    job_id = environ.get("KEEPER_JOB_ID")
    if not good or not job_id:
        return
    name = _NAME_OK.sub("-", environ.get("KEEPER_JOB_NAME") or "") or "task"
    client_id = good[0]["template"].format(job_id=job_id, job_name=name, pid=os.getpid())
    ctx = client_ssl_context(host=mqtt["host"]) if mqtt.get("tls") else None
    client = MqttClient(
        host=mqtt["host"],
        port=mqtt["port"],
        client_id=client_id,
        ssl_context=ctx,
        connect_timeout=5.0,
    )
    with contextlib.suppress(KeeperTaskError):
        client.connect()
        client.publish(
            "KeeperLogger",
            {"level": "Information", "message": "probe.report", "properties": report},
            qos=1,
            wait=True,
        )
        client.disconnect(timeout=5.0)


def run_timeout(args: argparse.Namespace) -> int:
    """Run until killed, logging heartbeats and every signal received."""
    directory = Path(args.report_dir or ".")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "timeout.jsonl"
    out = path.open("w", encoding="utf-8")

    def line(event: str, **fields: Any) -> None:
        out.write(json.dumps({"event": event, "t": _now(), **fields}) + "\n")
        out.flush()

    signalled: list[float] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signalled.append(time.monotonic())
        line("signal", name=signal.Signals(signum).name)

    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK"):
        if hasattr(signal, name):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(getattr(signal, name), on_signal)
    line("start", pid=os.getpid())
    limit = time.monotonic() + args.max_run
    while time.monotonic() < limit:
        if signalled and time.monotonic() - signalled[0] > args.max_after_signal:
            line("exit", reason="no kill followed the signal")
            return 0
        line("alive")
        time.sleep(0.1)
    line("exit", reason="never killed")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m keeper_task.probe``."""
    parser = argparse.ArgumentParser(prog="keeper-task-probe", allow_abbrev=False)
    parser.add_argument("--keeper-api-base")
    parser.add_argument("--report-dir")
    parser.add_argument("--mode", choices=("main", "timeout"), default="main")
    parser.add_argument("--ca-bundle")
    parser.add_argument("--literal-check")
    parser.add_argument("--trust-wait", type=float, default=60.0)
    parser.add_argument("--stdin-wait", type=float, default=1.0)
    parser.add_argument("--max-run", type=float, default=600.0)
    parser.add_argument("--max-after-signal", type=float, default=60.0)
    # The context may arrive as extra arguments: never refuse what the agent appends.
    args, _extra = parser.parse_known_args(argv)
    if args.mode == "timeout":
        return run_timeout(args)
    return run_main(args)
