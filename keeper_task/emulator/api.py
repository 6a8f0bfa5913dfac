"""The emulator's HTTPS API (aiohttp): Public, Plugin Settings and Job Management endpoints.

Routes and status codes follow the agent's public HTTP reference (Plugin Settings and Job
Management APIs; tests/test_conformance.py holds them against it section by section):

==========  =========================================  ======  ==================================
Method      Path                                       Tier    Answers
==========  =========================================  ======  ==================================
GET         /health, /, /api/system/status             Public  200
GET         /api/plugins                               Plugin  200 list of known plugins
GET         /api/PluginSettings/{plugin}               Plugin  200 flat string map; 404
GET         /api/PluginSettings/{plugin}/{setting}     Plugin  200 JSON string; 404
PUT         /api/PluginSettings/{plugin}/{setting}     Plugin  200; 400 bad body; 404
POST        /api/PluginSettings/{plugin}/revert        Plugin  200; 404
POST        /api/PluginSettings/revert-all             Plugin  200
GET         /api/PluginSettings/{plugin}/status        Plugin  200 {hash, changed, ...}; 404
GET         /api/Jobs                                  Admin   200 {jobs, count, message}
GET         /api/Jobs/{jobId}                          Admin   200 job JSON; 404
POST        /api/Jobs                                  Admin   200 created/updated; 400 {errors}
PUT         /api/Jobs/{jobId}                          Admin   200 (URL id wins); 400; 404
DELETE      /api/Jobs/{jobId}                          Admin   200; 404
POST        /api/Jobs/validate                         Admin   200 {valid, errors, warnings, jobId}
POST        /api/Jobs/{jobId}/trigger                  Admin   200 (async run); 400 disabled; 404
POST        /api/Jobs/{jobId}/run                      Admin   200 (async run); 400 disabled; 404
POST        /api/Jobs/reload                           Admin   200
==========  =========================================  ======  ==================================

``GET /api/Jobs`` is Admin here, as in the HTTP reference (the Local Endpoints page says
Plugin). A caller on the wrong tier gets 403 with ``{"error", "requiredTier", "message"}``
(an Admin-tier call with a client certificate from another CA too).

Where the reference is silent, ASP.NET Core's defaults: literal path segments match in any
letter case and a trailing slash is accepted; a body not sent as JSON (``application/json``,
``text/json``, ``*/*+json``) is 415; malformed JSON is 400 before any validation (for
``/validate`` too). Every 400 has the ``/validate`` shape ``{valid, errors, warnings,
jobId}``. An unexpected error is a JSON 500 naming it, never an HTML page.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from keeper_task.emulator.records import RequestRecord
from keeper_task.emulator.settings_store import setting_text
from keeper_task.emulator.tiers import FORBIDDEN_MESSAGES, Tier
from keeper_task.emulator.tls_front import Peer
from keeper_task.errors import JobDefinitionError
from keeper_task.tls import is_loopback_host

if TYPE_CHECKING:
    from keeper_task.emulator.core import Emulator

__all__ = ["build_app", "required_tier"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_EMU = web.AppKey("emulator", object)


def required_tier(method: str, path: str) -> Tier:
    """The tier an endpoint requires (see the module docstring's table)."""
    lower = path.lower()
    if lower.startswith("/api/pluginsettings"):
        return Tier.PLUGIN
    if lower == "/api/plugins":
        return Tier.PLUGIN
    if lower.startswith(("/api/jobs", "/api/plugins/")):
        return Tier.ADMIN
    return Tier.PUBLIC


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _bad_request(
    *errors: str, warnings: Sequence[str] = (), job_id: str | None = None
) -> web.Response:
    """Every 400 has one shape, the ``/validate`` answer's: {valid, errors, warnings, jobId}."""
    return _json(
        {"valid": False, "errors": list(errors), "warnings": list(warnings), "jobId": job_id},
        status=400,
    )


#: Media types a JSON body may be sent as (ASP.NET's JSON input formatter accepts these).
_JSON_TYPES = ("application/json", "text/json")


def _unsupported_media(request: web.Request) -> web.Response | None:
    """415 for a body that is not declared JSON, as an ASP.NET [ApiController] answers."""
    content_type = request.content_type  # aiohttp: application/octet-stream when absent
    if content_type in _JSON_TYPES or content_type.endswith("+json"):
        return None
    sent = request.headers.get("Content-Type")
    got = f"got {sent!r}" if sent else "none was given"
    return _json(
        {
            "error": "UnsupportedMediaType",
            "message": f"send the body with Content-Type: application/json ({got})",
        },
        status=415,
    )


def _emu(request: web.Request) -> Emulator:
    return request.app[_EMU]  # type: ignore[return-value]


def _peer_of(request: web.Request, emu: Emulator) -> Peer:
    """Who sent ``request``: the TLS front's view when it decrypted the connection.

    Without the front (aiohttp's own TLS), the transport's peer address and certificate;
    a certificate aiohttp accepted is an admin one.
    """
    transport = request.transport
    if transport is not None and emu.front is not None:
        front_peer = emu.front.peer(transport.get_extra_info("socket"))
        if front_peer is not None:
            return front_peer
    peer = transport.get_extra_info("peername") if transport else None
    admin = bool(transport.get_extra_info("peercert")) if transport else False
    return Peer(
        host=str(peer[0]) if peer else "",
        port=int(peer[1]) if peer else 0,
        certificate=admin,
        admin=admin,
    )


def _forbidden(tier: Tier, peer: Peer) -> web.Response:
    """The 403 for a caller below ``tier``; says why a presented admin certificate failed."""
    message = FORBIDDEN_MESSAGES[tier]
    if tier is Tier.ADMIN and peer.certificate:
        message = (
            "Admin credentials not accepted: the client certificate was not issued by "
            f"the agent's admin CA ({peer.reason or 'not trusted'})."
        )
    return _json(
        {"error": "Forbidden", "requiredTier": tier.value, "message": message},
        status=403,
    )


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run ``handler``; an error becomes a JSON answer, never aiohttp's bare error page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _json(
            {"error": exc.reason, "message": f"{request.method} {request.path}: {exc.reason}"},
            status=exc.status,
        )
    except Exception as exc:  # never a bare 500 page: say what broke, in JSON
        return _json(
            {
                "error": "InternalError",
                "message": f"emulator error ({type(exc).__name__}: {exc}); please report it",
            },
            status=500,
        )


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    emu = _emu(request)
    peer = _peer_of(request, emu)
    tier = required_tier(request.method, request.path)
    caller = "admin" if peer.admin else ("foreign certificate" if peer.certificate else "anonymous")
    pid: int | None = None
    fault: str | None = None
    response: web.StreamResponse | None = None
    try:
        if not is_loopback_host(peer.host):
            # Bound to 127.0.0.1, so this cannot happen; refuse anyway, like the agent.
            response = _json({"error": "Forbidden", "message": "loopback only"}, status=403)
            return response
        allowed = tier is Tier.PUBLIC
        if tier is Tier.ADMIN:
            allowed = peer.admin
        elif tier is Tier.PLUGIN:
            pid, trusted = emu.registry.identify(peer.port, emu.port)
            if pid is not None:
                caller = f"pid {pid}"
            allowed = trusted
        if not allowed:
            response = _forbidden(tier, peer)
            return response
        scripted = emu.faults.take(request.path) if tier is not Tier.PUBLIC else None
        if scripted is not None:
            fault = scripted.describe()
            response = scripted.response()
            return response
        response = await _handle(request, handler)
        return response
    finally:
        status = response.status if response is not None else 500
        emu.recorder.add(
            RequestRecord(request.method, request.path, status, tier.value, caller, pid, fault)
        )


# --- public ----------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return _json({"status": "Healthy"})


async def root(request: web.Request) -> web.Response:
    return _json(
        {
            "name": "KeeperPrivilegeManager",
            "emulator": "keeper-task dev agent",
            "endpoints": ["/health", "/api/system/status", "/api/PluginSettings", "/api/Jobs"],
        }
    )


async def system_status(request: web.Request) -> web.Response:
    emu = _emu(request)
    broker = emu.broker
    return _json(
        {
            "status": "Running",
            "emulator": True,
            "uptimeSeconds": round(time.monotonic() - emu.started_at, 3),
            "jobCount": len(emu.jobs()),
            "broker": {
                "kind": broker.kind if broker else None,
                "host": broker.host if broker else None,
                "port": broker.port if broker else None,
                "tls": broker.tls if broker else None,
                "running": bool(broker and broker.running),
                "enforced": bool(broker and broker.enforces),
            },
        }
    )


# --- plugin settings ---------------------------------------------------------------------


def _plugin_404(plugin: str) -> web.Response:
    return _json(
        {"error": "NotFound", "message": f"Plugin '{plugin}' is not in the plugin registry"},
        status=404,
    )


async def plugins_list(request: web.Request) -> web.Response:
    store = _emu(request).settings
    return _json(
        [
            {
                "id": name,
                "name": name,
                "status": "NotRunning",
                "processId": None,
                "lastStartTime": None,
            }
            for name in store.plugins()
        ]
    )


async def settings_get_all(request: web.Request) -> web.Response:
    plugin = request.match_info["plugin"]
    store = _emu(request).settings
    if not store.known(plugin):
        return _plugin_404(plugin)
    return _json(store.merged(plugin))


async def settings_get_one(request: web.Request) -> web.Response:
    plugin, key = request.match_info["plugin"], request.match_info["setting"]
    store = _emu(request).settings
    if not store.known(plugin):
        return _plugin_404(plugin)
    value = store.get(plugin, key)
    if value is None:
        return _json(
            {"error": "NotFound", "message": f"Setting '{key}' not found for plugin '{plugin}'"},
            status=404,
        )
    return _json(value)


async def settings_put(request: web.Request) -> web.Response:
    plugin, key = request.match_info["plugin"], request.match_info["setting"]
    store = _emu(request).settings
    if not store.known(plugin):
        return _plugin_404(plugin)
    raw = await request.read()
    if not raw.strip():
        return _bad_request('the body is empty: send {"value": <string|number|boolean>}')
    unsupported = _unsupported_media(request)
    if unsupported is not None:
        return unsupported
    try:
        value = _setting_value(parse_json_body(raw))
    except ValueError as exc:
        return _bad_request(str(exc))
    store.put(plugin, key, value)
    return _json(
        {"success": True, "pluginName": plugin, "settingName": key, "value": setting_text(value)}
    )


def _setting_value(body: Any) -> Any:
    """The value a settings PUT body gives: ``{"value": V}`` (any key case) or a bare V.

    Raises:
        ValueError: No single value, or one that is not a JSON string, number or boolean.
    """
    if isinstance(body, dict):
        values = [v for k, v in body.items() if str(k).lower() == "value"]
        if len(values) != 1:
            raise ValueError('the body must be {"value": <string|number|boolean>}')
        body = values[0]
    if body is None or isinstance(body, (dict, list)):
        raise ValueError("the value must be a JSON string, number or boolean")
    return body


async def settings_revert(request: web.Request) -> web.Response:
    plugin = request.match_info["plugin"]
    store = _emu(request).settings
    if not store.known(plugin):
        return _plugin_404(plugin)
    store.revert(plugin)
    return _json({"success": True, "message": f"Plugin '{plugin}' settings re-imported from disk"})


async def settings_revert_all(request: web.Request) -> web.Response:
    store = _emu(request).settings
    store.revert_all()
    return _json({"success": True, "message": "All plugin settings re-imported from disk"})


async def settings_status(request: web.Request) -> web.Response:
    plugin = request.match_info["plugin"]
    store = _emu(request).settings
    if not store.known(plugin):
        return _plugin_404(plugin)
    return _json(store.status(plugin))


# --- jobs --------------------------------------------------------------------------------


def _job_404(job_id: str) -> web.Response:
    return _json(
        {"error": "NotFound", "message": f"Job '{job_id}' not found; GET /api/Jobs lists jobs"},
        status=404,
    )


async def _read_job_body(request: web.Request) -> Any:
    """The request's job JSON (raises HTTP 400 with an errors array when it is malformed)."""
    from keeper_task.jobs import parse_job_json

    raw = await request.read()
    if not raw.strip():
        raise _BadRequest("the request body is empty: send the job JSON")
    unsupported = _unsupported_media(request)
    if unsupported is not None:
        raise _BadRequest("", response=unsupported)
    try:
        return parse_job_json(raw, source="request body")
    except JobDefinitionError as exc:
        raise _BadRequest(str(exc)) from exc


class _BadRequest(Exception):
    """A request refused before validation: a 400 (or the given response, e.g. 415)."""

    def __init__(self, message: str, *, response: web.Response | None = None) -> None:
        super().__init__(message)
        self.response = response if response is not None else _bad_request(message)


async def jobs_list(request: web.Request) -> web.Response:
    jobs = _emu(request).jobs()
    return _json(
        {
            "jobs": [job.to_json_dict() for job in jobs],
            "count": len(jobs),
            "message": f"{len(jobs)} job(s) loaded",
        }
    )


async def jobs_get(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = _emu(request).job(job_id)
    if job is None:
        return _job_404(job_id)
    return _json(job.to_json_dict())


async def _save(request: web.Request, data: Any, *, must_exist: str | None) -> web.Response:
    emu = _emu(request)
    if must_exist is not None:
        if emu.job(must_exist) is None:
            return _job_404(must_exist)
        if isinstance(data, dict):
            # The id in the URL is authoritative: it replaces the body's (any letter case).
            for key in [k for k in data if str(k).lower() == "id"]:
                del data[key]
            data = {"id": must_exist, **data}
    report = emu.validate(data)
    if report.valid and report.job_id is not None:
        clash = emu.case_clash(report.job_id)
        if clash is not None:
            report.errors.append(
                f"id {report.job_id!r} differs only in letter case from the existing job "
                f"{clash!r}; Windows and macOS file systems hold Jobs/{clash}.json and "
                f"Jobs/{report.job_id}.json as one file"
            )
            report.valid = False
    if not report.valid:
        return _bad_request(*report.errors, warnings=report.warnings, job_id=report.job_id)
    created = emu.save_job(data)
    job_id = report.job_id
    return _json(
        {
            "success": True,
            "jobId": job_id,
            "message": f"Job '{job_id}' {'created' if created else 'updated'}",
            "warnings": list(report.warnings),
        }
    )


async def jobs_create(request: web.Request) -> web.Response:
    try:
        data = await _read_job_body(request)
    except _BadRequest as exc:
        return exc.response
    return await _save(request, data, must_exist=None)


async def jobs_update(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    if _emu(request).job(job_id) is None:
        return _job_404(job_id)
    try:
        data = await _read_job_body(request)
    except _BadRequest as exc:
        return exc.response
    return await _save(request, data, must_exist=job_id)


async def jobs_delete(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    if not _emu(request).delete_job(job_id):
        return _job_404(job_id)
    return _json({"success": True, "message": f"Job '{job_id}' deleted"})


async def jobs_validate(request: web.Request) -> web.Response:
    try:
        data = await _read_job_body(request)
    except _BadRequest as exc:
        # Malformed JSON never reaches the validator: ASP.NET's model binding answers 400
        # before the action runs, for /validate as for POST.
        return exc.response
    return _json(_emu(request).validate(data).to_agent_json())


async def _launch(
    request: web.Request, trigger: str, context: dict[str, Any] | None
) -> web.Response:
    emu = _emu(request)
    job_id = request.match_info["job_id"]
    job = emu.job(job_id)
    if job is None:
        return _job_404(job_id)
    if job.enabled is False:
        return _bad_request(f"Job '{job_id}' is disabled", job_id=job_id)
    run = emu.start_run(job_id, trigger=trigger, context=context)
    message = f"Job '{job_id}' {'triggered' if trigger == 'trigger' else 'started'}"
    if run.status == "skipped":
        message += f" but skipped: {run.note}"
    return _json({"success": True, "jobId": job_id, "runId": run.run_id, "message": message})


async def jobs_trigger(request: web.Request) -> web.Response:
    raw = await request.read()
    context: Any = None
    if raw.strip():
        unsupported = _unsupported_media(request)
        if unsupported is not None:
            return unsupported
        try:
            context = parse_json_body(raw)
        except ValueError as exc:
            return _bad_request(str(exc))
        # null binds to "no context" (an optional [FromBody] parameter); anything but an
        # object is refused: the reference documents "a key-value JSON object".
        if context is not None and not isinstance(context, dict):
            return _bad_request(
                "the trigger body must be a JSON object of event context (or {}), got "
                f"{_type_name(context)}"
            )
    return await _launch(request, "trigger", context or {})


async def jobs_run(request: web.Request) -> web.Response:
    return await _launch(request, "run", None)


async def jobs_reload(request: web.Request) -> web.Response:
    emu = _emu(request)
    problems = emu.reload_jobs()
    count = len(emu.jobs())
    return _json(
        {
            "success": True,
            "count": count,
            "message": f"Reloaded {count} job(s) from disk",
            "errors": problems,
        }
    )


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body strictly (UTF-8, no NaN, no duplicate keys, bounded integers).

    Raises:
        ValueError: One line saying what is wrong.
    """
    from keeper_task.jobs import parse_job_json

    try:
        return parse_job_json(raw, source="request body")
    except JobDefinitionError as exc:
        raise ValueError(str(exc)) from exc


def _type_name(value: Any) -> str:
    from keeper_task.jobs.model import json_type_name

    return json_type_name(value)


async def _not_found(request: web.Request) -> web.Response:
    return _json({"error": "NotFound", "message": f"no endpoint {request.path}"}, status=404)


def route(template: str) -> str:
    """An aiohttp route for ``template`` that matches as ASP.NET routing does.

    ASP.NET matches literal segments in any letter case and accepts a trailing slash;
    aiohttp does neither by default. Parameter segments (``{job_id}``) are unchanged.
    """
    if template == "/":
        return template
    parts = []
    for index, segment in enumerate(template.strip("/").split("/")):
        if segment.startswith("{"):
            parts.append(segment)
        else:
            parts.append(f"{{_lit{index}:(?i:{re.escape(segment)})}}")
    return "/" + "/".join(parts) + "{_slash:/?}"


def build_app(emulator: Emulator) -> web.Application:
    """The aiohttp application serving ``emulator``."""
    app = web.Application(middlewares=[_authorize], client_max_size=4 * 1024 * 1024)
    app[_EMU] = emulator
    r = app.router
    r.add_get(route("/health"), health)
    r.add_get(route("/"), root)
    r.add_get(route("/api/system/status"), system_status)
    r.add_get(route("/api/plugins"), plugins_list)
    # Literal segments are registered before parameters, as ASP.NET prefers them.
    r.add_post(route("/api/PluginSettings/revert-all"), settings_revert_all)
    r.add_get(route("/api/PluginSettings/{plugin}"), settings_get_all)
    r.add_get(route("/api/PluginSettings/{plugin}/status"), settings_status)
    r.add_post(route("/api/PluginSettings/{plugin}/revert"), settings_revert)
    r.add_get(route("/api/PluginSettings/{plugin}/{setting}"), settings_get_one)
    r.add_put(route("/api/PluginSettings/{plugin}/{setting}"), settings_put)
    r.add_get(route("/api/Jobs"), jobs_list)
    r.add_post(route("/api/Jobs"), jobs_create)
    r.add_post(route("/api/Jobs/validate"), jobs_validate)
    r.add_post(route("/api/Jobs/reload"), jobs_reload)
    r.add_get(route("/api/Jobs/{job_id}"), jobs_get)
    r.add_put(route("/api/Jobs/{job_id}"), jobs_update)
    r.add_delete(route("/api/Jobs/{job_id}"), jobs_delete)
    r.add_post(route("/api/Jobs/{job_id}/trigger"), jobs_trigger)
    r.add_post(route("/api/Jobs/{job_id}/run"), jobs_run)
    return app
