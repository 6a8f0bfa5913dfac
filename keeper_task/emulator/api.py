"""The emulator's HTTPS API (aiohttp): Public, Plugin Settings and Job Management endpoints.

Routes and status codes follow the agent's HTTP reference (``shared/seeds/http-reference.txt``):

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
Plugin). A caller on the wrong tier gets 403 with ``{"error", "requiredTier", "message"}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from keeper_task.emulator.records import RequestRecord
from keeper_task.emulator.settings_store import setting_text
from keeper_task.emulator.tiers import FORBIDDEN_MESSAGES, Tier
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


def _errors(status: int, *messages: str, **extra: Any) -> web.Response:
    return _json({"errors": list(messages), **extra}, status=status)


def _emu(request: web.Request) -> Emulator:
    return request.app[_EMU]  # type: ignore[return-value]


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    emu = _emu(request)
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    peer_host = str(peer[0]) if peer else ""
    peer_port = int(peer[1]) if peer else 0
    tier = required_tier(request.method, request.path)
    caller = "anonymous"
    pid: int | None = None
    fault: str | None = None
    response: web.StreamResponse | None = None
    try:
        if not is_loopback_host(peer_host):
            # Bound to 127.0.0.1, so this cannot happen; refuse anyway, like the agent.
            response = _json({"error": "Forbidden", "message": "loopback only"}, status=403)
            return response
        peercert = transport.get_extra_info("peercert") if transport else None
        if peercert:
            caller = "admin"
        allowed = tier is Tier.PUBLIC
        if tier is Tier.ADMIN:
            allowed = caller == "admin"
        elif tier is Tier.PLUGIN:
            pid, trusted = emu.registry.identify(peer_port, emu.port)
            if pid is not None:
                caller = f"pid {pid}"
            allowed = trusted
        if not allowed:
            response = _json(
                {
                    "error": "Forbidden",
                    "requiredTier": tier.value,
                    "message": FORBIDDEN_MESSAGES[tier],
                },
                status=403,
            )
            return response
        scripted = emu.faults.take(request.path) if tier is not Tier.PUBLIC else None
        if scripted is not None:
            fault = scripted.describe()
            response = scripted.response()
            return response
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _json({"error": exc.reason}, status=exc.status)
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
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        return _errors(400, f"malformed JSON body: {exc}")
    if isinstance(body, dict):
        values = [v for k, v in body.items() if str(k).lower() == "value"]
        if len(values) != 1:
            return _errors(400, 'the body must be {"value": <string|number|boolean>}')
        body = values[0]
    if body is None or isinstance(body, (dict, list)):
        return _errors(400, "the value must be a JSON string, number or boolean")
    store.put(plugin, key, body)
    return _json(
        {"success": True, "pluginName": plugin, "settingName": key, "value": setting_text(body)}
    )


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
    try:
        return parse_job_json(raw, source="request body")
    except JobDefinitionError as exc:
        raise _BadRequest(str(exc)) from exc


class _BadRequest(Exception):
    pass


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
    if not report.valid:
        return _json(report.to_agent_json(), status=400)
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
        return _errors(400, str(exc))
    return await _save(request, data, must_exist=None)


async def jobs_update(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    if _emu(request).job(job_id) is None:
        return _job_404(job_id)
    try:
        data = await _read_job_body(request)
    except _BadRequest as exc:
        return _errors(400, str(exc))
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
        return _json({"valid": False, "errors": [str(exc)], "warnings": [], "jobId": None})
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
        return _errors(400, f"Job '{job_id}' is disabled", jobId=job_id)
    run = emu.start_run(job_id, trigger=trigger, context=context)
    message = f"Job '{job_id}' {'triggered' if trigger == 'trigger' else 'started'}"
    if run.status == "skipped":
        message += f" but skipped: {run.note}"
    return _json({"success": True, "jobId": job_id, "runId": run.run_id, "message": message})


async def jobs_trigger(request: web.Request) -> web.Response:
    raw = await request.read()
    context: Any = None
    if raw.strip():
        try:
            context = json.loads(raw)
        except ValueError as exc:
            return _errors(400, f"malformed JSON body: {exc}")
        if not isinstance(context, dict):
            return _errors(400, "the trigger body must be a JSON object of event context")
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


async def _not_found(request: web.Request) -> web.Response:
    return _json({"error": "NotFound", "message": f"no endpoint {request.path}"}, status=404)


def build_app(emulator: Emulator) -> web.Application:
    """The aiohttp application serving ``emulator``."""
    app = web.Application(middlewares=[_authorize], client_max_size=4 * 1024 * 1024)
    app[_EMU] = emulator
    r = app.router
    r.add_get("/health", health)
    r.add_get("/", root)
    r.add_get("/api/system/status", system_status)
    r.add_get("/api/plugins", plugins_list)
    # Literal segments are registered before parameters, as ASP.NET prefers them.
    r.add_post("/api/PluginSettings/revert-all", settings_revert_all)
    r.add_get("/api/PluginSettings/{plugin}", settings_get_all)
    r.add_get("/api/PluginSettings/{plugin}/status", settings_status)
    r.add_post("/api/PluginSettings/{plugin}/revert", settings_revert)
    r.add_get("/api/PluginSettings/{plugin}/{setting}", settings_get_one)
    r.add_put("/api/PluginSettings/{plugin}/{setting}", settings_put)
    r.add_get("/api/Jobs", jobs_list)
    r.add_post("/api/Jobs", jobs_create)
    r.add_post("/api/Jobs/validate", jobs_validate)
    r.add_post("/api/Jobs/reload", jobs_reload)
    r.add_get("/api/Jobs/{job_id}", jobs_get)
    r.add_put("/api/Jobs/{job_id}", jobs_update)
    r.add_delete("/api/Jobs/{job_id}", jobs_delete)
    r.add_post("/api/Jobs/{job_id}/trigger", jobs_trigger)
    r.add_post("/api/Jobs/{job_id}/run", jobs_run)
    return app
