"""Client of the agent's Plugin Settings API (``/api/PluginSettings``, Plugin tier).

Only a process the agent launched may call it. Right after the launch the agent may not have
registered the PID yet and answers 403 for a moment, so every call retries 403, 5xx, timeouts
and dropped connections with jittered exponential backoff inside a time budget (see
:mod:`keeper_task.agent.retry`). A refused connection is retried only within the policy's
shorter ``refused_budget``: we assume (the agent does not document it) that its API is up
before it launches a task, so nothing listening means a wrong port or no agent. Errors that
retrying cannot fix (400 and other 4xx, 404, a malformed body, a rejected certificate) end the
call at once.

Three parts of the API are undocumented; the choices made here are:

* ``GET /api/PluginSettings/{plugin}/{setting}`` (response shape unknown): a JSON scalar is
  returned as is; a JSON object with a ``value`` key (any letter case) gives that value; a
  JSON object with the setting's own name as its only key gives that value; any other JSON is
  returned unchanged; a ``text/*`` body is returned as text.
* ``PUT`` body (``PluginSettingValue`` schema unknown): ``{"value": <value>}`` by default;
  pass ``value_body=`` to build another shape, e.g. ``value_body=lambda v: {"Value": v}``.
* ``GET .../status`` (shape unknown): the parsed JSON is returned unchanged.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import structlog

from keeper_task.agent._http import (
    AgentClient,
    AgentHttp,
    certificate_failure,
    path_segment,
)
from keeper_task.agent.retry import RetryPolicy, call_with_retry
from keeper_task.errors import (
    AgentError,
    AgentNotListeningError,
    AgentResponseError,
    AgentUnreachableError,
    NotFoundError,
    NotTrustedError,
    PluginNotFoundError,
    SettingsError,
)

__all__ = ["PluginSettingsClient", "default_value_body"]

T = TypeVar("T")

_PREFIX = "/api/PluginSettings"


def default_value_body(value: Any) -> Any:
    """Build the ``PUT`` body for ``value``: ``{"value": value}`` (the schema is undocumented)."""
    return {"value": value}


class PluginSettingsClient(AgentClient):
    """Read and write plugin settings through the agent's local HTTPS API.

    Args:
        base_url: The agent's base URL (the task's ``--keeper-api-base``), for example
            ``https://127.0.0.1:6889``.
        ssl_context: TLS context (:func:`keeper_task.client_ssl_context`); default: the
            loopback policy (unverified TLS, loopback only).
        timeout: Seconds per request: one deadline for connect, TLS, headers and whole body.
        retry: Retry policy; default :class:`RetryPolicy` (30 s budget, 3 s for a refused
            connection). Each call gets its own budget. ``RetryPolicy(budget=0)`` disables
            retrying.
        logger: A structlog-style logger; each retry is one ``agent.retry`` warning.
        transport: An httpx transport (``httpx.MockTransport`` in unit tests).
        value_body: Builds the ``PUT`` body from a value; default :func:`default_value_body`.

    Example:
        >>> with PluginSettingsClient("https://127.0.0.1:6889") as client:  # doctest: +SKIP
        ...     settings = client.get_all("KeeperPrivilegeManager")
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        logger: Any = None,
        transport: httpx.BaseTransport | None = None,
        value_body: Callable[[Any], Any] | None = None,
    ) -> None:
        self._http = AgentHttp(
            base_url,
            ssl_context=ssl_context,
            timeout=timeout,
            tier="Plugin",
            transport=transport,
        )
        self.base_url = self._http.base_url
        self.retry = retry if retry is not None else RetryPolicy()
        self._log = logger if logger is not None else structlog.get_logger("keeper_task.agent")
        self._value_body = value_body if value_body is not None else default_value_body
        # Once the agent has answered us, the PID is registered: a later 403 means the endpoint
        # needs another tier (PUT is Admin on some agents), which waiting cannot fix.
        self._trusted = False

    # --- endpoints ------------------------------------------------------------------------

    def get_all(self, plugin: str) -> dict[str, str]:
        """Return the merged effective settings of ``plugin`` as a flat string map.

        ``GET /api/PluginSettings/{plugin}``. The agent documents every value as a string;
        numbers and booleans are converted (``8675`` → ``"8675"``, ``true`` → ``"true"``) and
        a ``null`` value counts as "not set", so its key is left out.

        Raises:
            PluginNotFoundError: 404, no plugin of that name.
            NotTrustedError: 403 past the retry budget: not launched by the agent.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
            AgentResponseError: The body is not a flat JSON object.
        """
        path = f"{_PREFIX}/{_segment(plugin, 'plugin')}"
        what = f"plugin {plugin!r} settings"
        response = self._call("GET", path, what=what, plugin=plugin)
        body = _json(response, what)
        if not isinstance(body, dict):
            raise AgentResponseError(
                f"the agent's answer to {what} is a JSON {_json_type(body)}, not the "
                "documented flat object of strings",
                status_code=response.status_code,
                url=str(response.request.url),
            )
        result: dict[str, str] = {}
        for key, value in body.items():
            if value is None:
                continue
            text = _scalar_text(value)
            if text is None:
                raise AgentResponseError(
                    f"the agent's answer to {what} is not flat: key {key!r} holds a JSON "
                    f"{_json_type(value)}, not a string",
                    status_code=response.status_code,
                    url=str(response.request.url),
                )
            result[key] = text
        return result

    def get(self, plugin: str, setting: str) -> Any:
        """Return one setting: ``GET /api/PluginSettings/{plugin}/{setting}``.

        The response shape is undocumented; see the module docstring for how it is read.
        A 404 means the plugin or the setting does not exist (the agent does not say which).

        Raises:
            PluginNotFoundError: 404.
            NotTrustedError: 403 past the retry budget.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
            AgentResponseError: A JSON content type with a malformed body.
        """
        path = f"{_PREFIX}/{_segment(plugin, 'plugin')}/{_segment(setting, 'setting')}"
        what = f"setting {setting!r} of plugin {plugin!r}"
        response = self._call("GET", path, what=what, plugin=plugin, setting=setting)
        return _setting_value(response, setting, what)

    def put(self, plugin: str, setting: str, value: Any) -> None:
        """Write one setting: ``PUT /api/PluginSettings/{plugin}/{setting}``.

        The body is ``value_body(value)`` (``{"value": value}`` by default). Some Keeper
        pages put this endpoint on the Admin tier: a 403 after the process was trusted is
        raised at once as :class:`NotTrustedError`.

        Raises:
            TypeError: ``value_body(value)`` cannot be encoded as JSON.
            PluginNotFoundError: 404.
            ValidationFailedError: 400, the agent rejected the value (exit 70 when it ends
                a task: the request, not the agent's availability, is at fault).
            RequestRejectedError: Another 4xx (not 403/404), exit 70 likewise.
            NotTrustedError: 403 past the retry budget.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
        """
        path = f"{_PREFIX}/{_segment(plugin, 'plugin')}/{_segment(setting, 'setting')}"
        body = self._value_body(value)
        try:
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the value for setting {setting!r} cannot be sent as JSON: {exc}"
            ) from exc
        what = f"setting {setting!r} of plugin {plugin!r}"
        self._call(
            "PUT", path, what=what, plugin=plugin, setting=setting, json_body=body, send_body=True
        )

    def revert(self, plugin: str) -> None:
        """Re-import ``plugin``'s on-disk JSON: ``POST /api/PluginSettings/{plugin}/revert``.

        Raises:
            PluginNotFoundError: 404.
            NotTrustedError: 403 past the retry budget.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
        """
        path = f"{_PREFIX}/{_segment(plugin, 'plugin')}/revert"
        self._call("POST", path, what=f"revert of plugin {plugin!r}", plugin=plugin)

    def revert_all(self) -> None:
        """Re-import every plugin's on-disk JSON: ``POST /api/PluginSettings/revert-all``.

        Raises:
            NotTrustedError: 403 past the retry budget.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
        """
        self._call("POST", f"{_PREFIX}/revert-all", what="revert of all plugins")

    def status(self, plugin: str) -> Any:
        """Return the configuration-change and hash status of ``plugin`` as parsed JSON.

        ``GET /api/PluginSettings/{plugin}/status``; the shape is undocumented, so the JSON is
        returned unchanged (``None`` for an empty body).

        Raises:
            PluginNotFoundError: 404.
            NotTrustedError: 403 past the retry budget.
            AgentUnreachableError: Connection, TLS, timeout or 5xx past the retry budget.
            AgentResponseError: The body is not JSON.
        """
        path = f"{_PREFIX}/{_segment(plugin, 'plugin')}/status"
        what = f"status of plugin {plugin!r}"
        response = self._call("GET", path, what=what, plugin=plugin)
        if not response.content.strip():
            return None
        return _json(response, what)

    # --- retry ------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        plugin: str | None = None,
        setting: str | None = None,
        json_body: Any = None,
        send_body: bool = False,
    ) -> httpx.Response:
        """Send one request with the retry policy; map 404 to :class:`PluginNotFoundError`."""

        def attempt() -> httpx.Response:
            try:
                response = self._http.request(
                    method, path, json_body=json_body, send_body=send_body, what=what
                )
            except NotFoundError as exc:
                if plugin is None:
                    raise
                raise PluginNotFoundError(
                    _not_found_message(plugin, setting), status_code=exc.status_code, url=exc.url
                ) from exc
            self._trusted = True
            return response

        def on_retry(n: int, delay: float, exc: Exception) -> None:
            self._log.warning(
                "agent.retry",
                attempt=n,
                delay=round(delay, 3),
                status=getattr(exc, "status_code", None),
                method=method,
                path=path,
                error=type(exc).__name__,
                budget=self.retry.budget,
            )

        def on_give_up(n: int, elapsed: float, exc: Exception) -> BaseException | None:
            return _give_up_error(exc, n, elapsed, what)

        return call_with_retry(
            attempt,
            policy=self.retry,
            retry_on=self._retryable,
            budget_for=self._budget_for,
            on_retry=on_retry,
            on_give_up=on_give_up,
            clock=time.monotonic,
        )

    def _budget_for(self, exc: Exception) -> float:
        """Refused connections get the short budget; everything else the whole one."""
        if isinstance(exc, AgentNotListeningError):
            return self.retry.refused_budget
        return self.retry.budget

    def _retryable(self, exc: Exception) -> bool:
        """403 before the first answer (registration window), 5xx, refused, timed out."""
        if isinstance(exc, NotTrustedError):
            return not self._trusted
        if isinstance(exc, AgentUnreachableError):
            # A certificate the CA bundle does not vouch for stays wrong however long we wait.
            return certificate_failure(exc) is None
        return False


def _give_up_error(exc: Exception, attempts: int, elapsed: float, what: str) -> AgentError | None:
    """The error raised when the budget ran out: says how many attempts over how long."""
    if not isinstance(exc, AgentError):
        return None
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''} over {elapsed:.1f} s"
    if isinstance(exc, NotTrustedError):
        return NotTrustedError(
            f"the agent refused {what} with 403 on {tries}: this process is not trusted, "
            "it was not launched by the agent (run it from a job, or with `keeper-task dev "
            "run`); if the agent did launch it, raise the retry budget (--trust-timeout)",
            status_code=exc.status_code,
            url=exc.url,
        )
    if isinstance(exc, AgentNotListeningError):
        return AgentNotListeningError(
            f"nothing listens on {_host_port(exc.url)} — is this running under the agent? the "
            f"port is Settings:KestrelHttpsPort (connection refused on {tries}; "
            "--connect-retry-timeout)",
            url=exc.url,
        )
    if isinstance(exc, AgentUnreachableError):
        return type(exc)(
            f"{exc.message} (gave up after {tries})", status_code=exc.status_code, url=exc.url
        )
    return None


def _host_port(url: str) -> str:
    parsed = httpx.URL(url)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{host}:{parsed.port or 443}"


def _not_found_message(plugin: str, setting: str | None) -> str:
    if setting is None:
        return (
            f"plugin {plugin!r} not found: no plugin of that name is registered with the "
            "agent; the name must match exactly"
        )
    return (
        f"setting {setting!r} of plugin {plugin!r} not found: either no plugin of that name "
        "is registered with the agent or it has no such setting; names must match exactly"
    )


def _segment(value: str, kind: str) -> str:
    if not isinstance(value, str) or not value:
        raise SettingsError(f"{kind} name must be a non-empty string, not {value!r}")
    return path_segment(value)


def _json(response: httpx.Response, what: str) -> Any:
    """Decode JSON without quoting the body: it may hold setting values."""
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError) as exc:
        ctype = response.headers.get("Content-Type", "no Content-Type")
        raise AgentResponseError(
            f"the agent's answer to {what} is not valid JSON ({ctype}, "
            f"{len(response.content)} bytes): {_json_reason(exc)}",
            status_code=response.status_code,
            url=str(response.request.url),
        ) from exc


def _json_reason(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return type(exc).__name__


def _setting_value(response: httpx.Response, setting: str, what: str) -> Any:
    """Read a single-setting answer whose shape the agent does not document."""
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    is_json = ctype == "application/json" or ctype.endswith("+json")
    if ctype.startswith("text/") and not is_json:
        return response.text
    if not response.content.strip():
        return None
    if not is_json and not ctype:
        # No declared type: JSON if it parses, else the text itself.
        try:
            body = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            return response.text
    else:
        body = _json(response, what)
    if isinstance(body, dict):
        for key, value in body.items():
            if key.lower() == "value":
                return value
        if list(body) == [setting]:
            return body[setting]
    return body


def _scalar_text(value: Any) -> str | None:
    """A JSON scalar as the agent would write it in its string map; None for containers."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
