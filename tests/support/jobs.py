"""Test support for job definitions and the Admin-tier Job Management API.

* :func:`example_job`: a valid job dict (the facts sheet's example, Linux flavour).
* :class:`AdminPki`: a server CA, the admin CA the agent trusts, and an unrelated CA, with
  their PEM files written to a directory.
* :class:`FakeJobsAgent`: the nine ``/api/Jobs`` endpoints on a real mutual-TLS
  :class:`~tests.support.https.HttpsServer`, with an in-memory job store.
* :class:`HangUpServer`: completes the TLS handshake, reads the request and hangs up without
  a word, as an asyncio TLS server does after refusing a client certificate under TLS 1.3.
* Hypothesis strategies: :func:`valid_jobs` builds jobs that pass every offline rule.
* Fixtures shared by the Admin-tier test modules (import them into the module):
  ``pki``, ``_shared_server``, ``server`` and ``agent``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import trustme
from hypothesis import strategies as st

from keeper_task.jobs import (
    EXECUTION_TYPES,
    Job,
    JobEvent,
    JobSchedule,
    JobTask,
    MqttTopics,
    OsFilter,
    validate_job,
)
from tests.support.https import HttpsServer, Request, Response


def example_job(job_id: str = "disk-usage-reporter", **overrides: Any) -> dict[str, Any]:
    """A valid job, as an author would write it (ExecutionType casing, object events)."""
    job: dict[str, Any] = {
        "id": job_id,
        "name": "Disk usage reporter",
        "description": "Collects volume usage and reports it.",
        "enabled": True,
        "priority": 4,
        "schedule": {"intervalMinutes": 240},
        "events": [{"eventType": "Startup"}],
        "osFilter": {"windows": False, "linux": True, "macOS": False},
        "eventTopic": f"Jobs/{job_id}/events",
        "mqttTopics": {
            "allowedPublications": ["KeeperLogger", f"Jobs/{job_id}/events"],
            "allowedSubscriptions": [],
        },
        "parameters": [],
        "tasks": [
            {
                "id": "collect",
                "name": "Collect disk usage",
                "ExecutionType": "Service",
                "command": "DiskUsageReporter",
                "arguments": "--keeper-api-base={KeeperApiBaseUrl} --threshold-percent 90",
                "timeoutSeconds": 900,
                "continueOnFailure": False,
                "scriptType": "Auto",
            }
        ],
    }
    job.update(overrides)
    return job


@dataclass
class AdminPki:
    """Throwaway certificates for mutual TLS; files under ``directory``."""

    server_ca: trustme.CA
    admin_ca: trustme.CA
    other_ca: trustme.CA
    ca_bundle: Path  # verifies the agent's server certificate
    admin_pem: Path  # admin client certificate + key in one file
    admin_cert: Path  # admin client certificate alone
    admin_key: Path  # its key alone
    other_pem: Path  # a client certificate from a CA the agent does not trust

    @classmethod
    def create(cls, directory: Path) -> AdminPki:
        server_ca, admin_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
        ca_bundle = directory / "agent-ca.pem"
        server_ca.cert_pem.write_to_path(str(ca_bundle))
        admin = admin_ca.issue_cert("deploy@example.test")
        admin_pem = directory / "admin.pem"
        admin.private_key_and_cert_chain_pem.write_to_path(str(admin_pem))
        admin_cert = directory / "admin-cert.pem"
        admin_cert.write_bytes(b"".join(blob.bytes() for blob in admin.cert_chain_pems))
        admin_key = directory / "admin-key.pem"
        admin.private_key_pem.write_to_path(str(admin_key))
        other_pem = directory / "other.pem"
        other_ca.issue_cert("deploy@example.test").private_key_and_cert_chain_pem.write_to_path(
            str(other_pem)
        )
        return cls(
            server_ca, admin_ca, other_ca, ca_bundle, admin_pem, admin_cert, admin_key, other_pem
        )

    def server(self) -> HttpsServer:
        """An HTTPS server that requires a client certificate from the admin CA."""
        return HttpsServer(self.server_ca, client_ca=self.admin_ca)


class FakeJobsAgent:
    """The agent's ``/api/Jobs`` endpoints with an in-memory store, on ``server``.

    Behaviour follows the HTTP reference: POST creates or updates (400 with ``errors`` when
    the job has no id), PUT needs an existing job and the URL id wins, trigger/run answer 400
    for a disabled job, ``/validate`` answers ``{valid, errors, warnings, jobId}`` (computed
    with :func:`validate_job`, without a binary check).
    """

    def __init__(self, server: HttpsServer) -> None:
        self.server = server
        self.jobs: dict[str, dict[str, Any]] = {}
        self.triggered: list[tuple[str, Any]] = []
        self.reloads = 0
        #: Job ids POST refuses with these errors (what the agent alone knows, e.g. a
        #: binary missing on its host).
        self.refuse: dict[str, list[str]] = {}
        r = server.route
        r("GET", r"/api/Jobs", self._list)
        r("POST", r"/api/Jobs", self._create)
        r("GET", r"/api/Jobs/(?P<id>[^/]+)", self._get)
        r("PUT", r"/api/Jobs/(?P<id>[^/]+)", self._put)
        r("DELETE", r"/api/Jobs/(?P<id>[^/]+)", self._delete)
        r("POST", r"/api/Jobs/validate", self._validate)
        r("POST", r"/api/Jobs/(?P<id>[^/]+)/trigger", self._trigger)
        r("POST", r"/api/Jobs/(?P<id>[^/]+)/run", self._run)
        r("POST", r"/api/Jobs/reload", self._reload)

    @staticmethod
    def _id(req: Request) -> str:
        assert req.match is not None
        return unquote(req.match["id"])

    def _list(self, _req: Request) -> Response:
        jobs = [
            {"id": j["id"], "name": j.get("name"), "enabled": j.get("enabled")}
            for j in self.jobs.values()
        ]
        return Response(200, {"jobs": jobs, "count": len(jobs), "message": "ok"})

    def _get(self, req: Request) -> Response:
        job = self.jobs.get(self._id(req))
        return Response(200, job) if job else Response(404, {"message": "Job not found"})

    def _create(self, req: Request) -> Response:
        body = req.json()
        report = validate_job(body)
        if not report.valid:
            return Response(400, {"errors": report.errors})
        if body["id"] in self.refuse:
            return Response(400, {"errors": self.refuse[body["id"]]})
        self.jobs[body["id"]] = body
        return Response(200, {"message": "Job saved", "jobId": body["id"]})

    def _put(self, req: Request) -> Response:
        job_id = self._id(req)
        if job_id not in self.jobs:
            return Response(404, {"message": "Job not found"})
        body = req.json()
        body["id"] = job_id  # the URL id wins
        self.jobs[job_id] = body
        return Response(200, {"message": "Job updated"})

    def _delete(self, req: Request) -> Response:
        if self.jobs.pop(self._id(req), None) is None:
            return Response(404, {"message": "Job not found"})
        return Response(200, {"message": "Job deleted"})

    def _validate(self, req: Request) -> Response:
        return Response(200, validate_job(req.json()).to_agent_json())

    def _trigger(self, req: Request) -> Response:
        return self._start(req, with_context=True, message="Job triggered")

    def _run(self, req: Request) -> Response:
        return self._start(req, with_context=False, message="Job started")

    def _start(self, req: Request, *, with_context: bool, message: str) -> Response:
        """Trigger/run: 404 for an unknown job, 400 for a disabled one, else record the start."""
        job_id = self._id(req)
        job = self.jobs.get(job_id)
        if job is None:
            return Response(404, {"message": "Job not found"})
        if not job.get("enabled"):
            return Response(400, {"errors": [f"Job {job_id} is disabled"]})
        self.triggered.append((job_id, req.json() if with_context else None))
        return Response(200, {"message": message})

    def _reload(self, _req: Request) -> Response:
        self.reloads += 1
        return Response(200, {"message": "Jobs reloaded"})


class HangUpServer:
    """A TLS server on 127.0.0.1 that answers every request by closing the connection.

    It requests (does not require) a client certificate and sends no TLS alert: what a client
    sees from an agent that drops a refused certificate silently. Use as a context manager.
    """

    def __init__(self, server_ca: trustme.CA) -> None:
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ca.issue_cert("127.0.0.1").configure_cert(self._ctx)
        self._ctx.verify_mode = ssl.CERT_NONE
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"
        self.handled = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed by __exit__
                return
            try:
                with self._ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)  # the request; then hang up without an answer
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()
                self.handled.release()

    def __enter__(self) -> HangUpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown() wakes the blocked accept() on Linux; close() alone would not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


# -- hypothesis strategies -------------------------------------------------------------------

_KNOWN = {
    info.alias.lower()
    for model in (Job, JobTask, JobEvent, JobSchedule, OsFilter, MqttTopics)
    for info in model.model_fields.values()
    if info.alias
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Unknown keys must not collide, in any casing or with separators removed, with a known key.
unknown_keys = st.text(min_size=1, max_size=12).filter(
    lambda k: k.lower() not in _KNOWN and k.lower().replace("_", "").replace("-", "") not in _KNOWN
)

job_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,24}", fullmatch=True)
commands = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda c: c.lower() not in {"echo", "publish-mqtt", "log-message", "show-toast"}
)
names = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() != "")
schedules = st.one_of(
    st.fixed_dictionaries({"intervalMinutes": st.integers(1, 100_000)}),
    st.fixed_dictionaries(
        {"cronExpression": st.sampled_from(["*/5 * * * *", "0 3 * * 1-5", "15 2 1 * *"])}
    ),
    st.fixed_dictionaries({"runAt": st.sampled_from(["2030-01-01T03:00:00Z", "2031-06-30"])}),
    st.fixed_dictionaries({"calendar": json_values.filter(lambda v: v is not None)}),
)
events = st.lists(
    st.one_of(
        st.sampled_from(["Startup", "PolicyEvaluationPending"]),
        names,
        st.builds(
            lambda name, extra: {"eventType": name, **extra},
            names,
            st.dictionaries(unknown_keys, json_values, max_size=2),
        ),
    ),
    min_size=1,
    max_size=3,
)
executable_paths = st.sampled_from(
    [
        "/opt/KeeperPrivilegeManager/Jobs/bin/{c}/{c}",
        "C:\\Program Files\\KeeperPrivilegeManager\\Jobs\\bin\\{c}\\{c}.exe",
        "{{approot}}/Jobs/bin/{c}/{c}",
    ]
)


@st.composite
def valid_tasks(draw: st.DrawFn) -> dict[str, Any]:
    """One task that passes every rule, with optional fields and unknown keys."""
    command = draw(commands)
    task: dict[str, Any] = {}
    if draw(st.booleans()):
        task["id"] = draw(names)
    if draw(st.booleans()):
        task["name"] = draw(names)
    if draw(st.booleans()):
        key = draw(st.sampled_from(["ExecutionType", "executionType", "executiontype"]))
        task[key] = draw(st.sampled_from(EXECUTION_TYPES))
    task["command"] = command
    if draw(st.booleans()):
        task["executablePath"] = draw(executable_paths).format(c=command)
    task["arguments"] = draw(st.sampled_from(["--keeper-api-base={KeeperApiBaseUrl}", ""]))
    if draw(st.booleans()):
        task["timeoutSeconds"] = draw(st.integers(1, 86_400))
    if draw(st.booleans()):
        task["continueOnFailure"] = draw(st.booleans())
    if draw(st.booleans()):
        task["scriptType"] = "Auto"
    task.update(draw(st.dictionaries(unknown_keys, json_values, max_size=2)))
    return _shuffled(draw, task)


def _shuffled(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    order = draw(st.permutations(list(obj)))
    return {k: obj[k] for k in order}


@st.composite
def valid_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """A job dict that passes every offline rule (with ``file_name=f"{id}.json"``)."""
    job_id = draw(job_ids)
    job: dict[str, Any] = {"id": job_id, "name": draw(names), "enabled": draw(st.booleans())}
    if draw(st.booleans()):
        job["description"] = draw(st.text(max_size=30))
    if draw(st.booleans()):
        job["priority"] = draw(st.integers(1, 10))
    trigger = draw(st.sampled_from(["schedule", "events", "both"]))
    if trigger in ("schedule", "both"):
        job["schedule"] = draw(schedules)
    if trigger in ("events", "both"):
        job["events"] = draw(events)
    if draw(st.booleans()):
        job["parameters"] = draw(st.lists(json_values, max_size=2))
    if draw(st.booleans()):
        job["osFilter"] = draw(
            st.fixed_dictionaries(
                {},
                optional={"windows": st.booleans(), "linux": st.booleans(), "macOS": st.booleans()},
            )
        )
    if draw(st.booleans()):
        publications = ["KeeperLogger"]
        if draw(st.booleans()):
            topic = f"Jobs/{job_id}/events"
            job["eventTopic"] = topic
            publications.append(topic)
        job["mqttTopics"] = {
            "allowedPublications": publications,
            "allowedSubscriptions": draw(st.lists(st.sampled_from(["a/b", "c/+"]), max_size=2)),
        }
    if draw(st.booleans()):
        job["alternateJobId"] = draw(st.none() | job_ids)
    if draw(st.booleans()):
        job["condition"] = draw(json_values)
    job["tasks"] = draw(st.lists(valid_tasks(), min_size=1, max_size=3))
    job.update(draw(st.dictionaries(unknown_keys, json_values, max_size=3)))
    return _shuffled(draw, job)


def deep_copy(job: dict[str, Any]) -> dict[str, Any]:
    """A deep copy, so a mutation never touches the drawn example."""
    return copy.deepcopy(job)


def write_job(directory: Path, job: dict[str, Any], name: str | None = None) -> Path:
    """Write ``job`` to ``directory/<id>.json`` (or ``name``) and return the path."""
    path = directory / (name or f"{job['id']}.json")
    path.write_text(json.dumps(job, indent=2), encoding="utf-8")
    return path


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> AdminPki:
    """Throwaway mutual-TLS certificates, one set per test module."""
    return AdminPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def _shared_server(pki: AdminPki) -> Iterator[HttpsServer]:
    # One server per module: each server costs a 0.5 s poll on shutdown.
    with pki.server() as srv:
        yield srv


@pytest.fixture
def server(_shared_server: HttpsServer) -> Iterator[HttpsServer]:
    """The shared server with no routes and no recorded requests; restored afterwards."""
    _shared_server.routes.clear()
    _shared_server.requests.clear()
    yield _shared_server
    _shared_server.routes.clear()


@pytest.fixture
def agent(server: HttpsServer) -> FakeJobsAgent:
    """The fake ``/api/Jobs`` endpoints on the shared server."""
    return FakeJobsAgent(server)
