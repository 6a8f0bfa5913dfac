"""Task settings: the agent's substituted arguments, its environment, and the author's options.

Sources, lowest to highest priority: field defaults, environment, command line.

* ``--keeper-api-base=URL`` (or ``--keeper-api-base URL``) carries the agent's
  ``{KeeperApiBaseUrl}``; environment ``KEEPER_API_BASE`` overrides it for development.
* ``KEEPER_JOB_ID`` / ``KEEPER_JOB_NAME`` are set by the agent when the job declares
  ``mqttTopics``; ``--keeper-job-id`` / ``--keeper-job-name`` override them.
* Every other field ``some_field`` is ``--some-field VALUE`` on the command line and
  ``KEEPER_TASK_SOME_FIELD`` in the environment. A ``bool`` field is ``--flag`` / ``--no-flag``.

Authors add their own options by subclassing :class:`TaskSettings`.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from keeper_task.errors import SettingsError, UsageError
from keeper_task.tls import is_loopback_host

__all__ = ["TaskSettings", "normalize_api_base", "parse_settings"]

S = TypeVar("S", bound="TaskSettings")

#: The plugin name whose merged settings hold ``broker.host`` / ``broker.port``.
AGENT_PLUGIN_NAME = "KeeperPrivilegeManager"


class TaskSettings(BaseSettings):
    """Settings every task has; subclass it to add your own fields.

    Example:
        >>> class InventorySettings(TaskSettings):
        ...     dry_run: bool = False
        ...     max_items: int = 10
    """

    model_config = SettingsConfigDict(
        env_prefix="KEEPER_TASK_",
        extra="forbid",
        validate_default=True,
    )

    #: Names of fields that are never shown as a value in a message.
    secret_fields: ClassVar[frozenset[str]] = frozenset()

    allow_remote_api: bool = Field(
        default=False,
        description="Allow a non-loopback API base URL (the agent only listens on loopback).",
    )
    keeper_api_base: str | None = Field(
        default=None,
        validation_alias="keeper_api_base",
        description="The agent's HTTPS API base URL; the job passes {KeeperApiBaseUrl} here.",
    )
    keeper_job_id: str | None = Field(
        default=None,
        validation_alias="keeper_job_id",
        description="Job id, set by the agent as KEEPER_JOB_ID when the job declares mqttTopics.",
    )
    keeper_job_name: str | None = Field(
        default=None,
        validation_alias="keeper_job_name",
        description="Job name, set by the agent as KEEPER_JOB_NAME.",
    )
    ca_bundle: str | None = Field(
        default=None,
        description="PEM CA bundle exported by your administrator; without it TLS is "
        "unverified and allowed toward loopback only.",
    )
    settings_plugin: str = Field(
        default=AGENT_PLUGIN_NAME,
        description="Plugin whose merged settings give the broker address.",
    )
    trust_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds to keep retrying 403 (startup registration window), 5xx and "
        "refused connections.",
    )
    http_timeout: float = Field(default=5.0, gt=0, description="Seconds per HTTPS request.")
    mqtt: bool = Field(
        default=True,
        description="Connect to the agent's broker (off: logs go to stderr only).",
    )
    mqtt_tls: bool | None = Field(
        default=None,
        description="Force TLS on or off toward the broker (default: the agent's settings, "
        "TLS unless they say broker.tls=false).",
    )
    mqtt_client_id_template: str = Field(
        default="{job_id}_{job_name}",
        description="Client id template; fields {job_id}, {job_name}, {pid}. The agent "
        "reads the job id from the first '_'-separated segment.",
    )
    mqtt_keepalive: int = Field(default=30, ge=5, le=65535, description="MQTT keepalive (s).")
    mqtt_connect_timeout: float = Field(default=10.0, gt=0, description="MQTT connect timeout.")
    mqtt_flush_timeout: float = Field(
        default=5.0,
        ge=0,
        description="Seconds to wait on exit for unacknowledged QoS 1 messages.",
    )
    deadline: float | None = Field(
        default=None,
        gt=0,
        description="End run() after this many seconds (set it below the job's timeoutSeconds).",
    )
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical"] = Field(
        default="info", description="Lowest level logged."
    )
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto",
        description="stderr format: console on a terminal, JSON otherwise (auto).",
    )

    @field_validator("keeper_job_id")
    @classmethod
    def _job_id_has_no_underscore(cls, value: str | None) -> str | None:
        if value is not None and "_" in value:
            raise ValueError(
                f"job id {value!r} contains '_': the agent's broker splits client ids on '_', "
                "so this id would name another job; use hyphens in the job id"
            )
        return value

    @field_validator("keeper_api_base")
    @classmethod
    def _normalize_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return normalize_api_base(value, allow_remote=bool(info.data.get("allow_remote_api")))


def normalize_api_base(url: str, *, allow_remote: bool = False) -> str:
    """Normalise the agent's base URL and check it.

    Strips whitespace, a trailing slash and a trailing ``/api`` so that paths can be appended
    as ``/api/...``.

    Raises:
        ValueError: Not https, no host, or a non-loopback host without ``allow_remote``.
    """
    text = url.strip()
    if "{" in text and "}" in text:
        raise ValueError(
            f"{text!r} still holds an unsubstituted token: the agent substitutes "
            "{KeeperApiBaseUrl} only in a job task's arguments; set the URL yourself when "
            "running by hand"
        )
    parts = urlsplit(text)
    if parts.scheme.lower() != "https":
        raise ValueError(
            f"{text!r} is not an https:// URL; the agent's API is https://127.0.0.1:<port>"
        )
    if "@" in parts.netloc:
        # The URL ends up in error messages and logs: do not quote it, it holds a password.
        raise ValueError(
            "the URL holds a user name or password; the agent's API takes none "
            "(pass https://127.0.0.1:<port>)"
        )
    host = parts.hostname
    if not host:
        raise ValueError(f"{text!r} has no host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{text!r} has an invalid port") from exc
    if not allow_remote and not is_loopback_host(host):
        raise ValueError(
            f"host {host!r} is not loopback; the agent only serves 127.0.0.1 "
            "(pass --allow-remote-api to override)"
        )
    path = parts.path.rstrip("/")
    if path.lower().endswith("/api"):
        path = path[: -len("/api")]
    return f"https://{parts.netloc}{path}"


# --- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing and exiting.

    Messages never quote a value from the command line: a mistyped ``--api-tokn=...`` must
    not put the token into the agent's logs.
    """

    def error(self, message: str) -> NoReturn:
        message = _EXPLICIT_ARG.sub("takes no value", message)
        raise UsageError(f"{message} (see --help)")


# argparse: "argument --flag: ignored explicit argument 'VALUE'" for ``--flag=VALUE``.
_EXPLICIT_ARG = re.compile(r"ignored explicit argument .*$")


def _unrecognized(extra: Sequence[str]) -> str:
    """Name unknown options without their values; count other words without showing them."""
    options = [a.split("=", 1)[0] for a in extra if a.startswith("-") and a not in ("-", "--")]
    others = len(extra) - len(options)
    text = ", ".join(dict.fromkeys(options))
    if others:
        noun = "argument" if others == 1 else "arguments"
        more = f"{others} other {noun} (not shown: values may be secret)"
        text = f"{text} and {more}" if text else more
    return f"unrecognized arguments: {text}"


def _cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [bool]
    return False


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return origin in (list, tuple, set, frozenset, Sequence)


def build_parser(
    settings_cls: type[TaskSettings],
    prog: str | None = None,
    *,
    description: str | None = None,
) -> _Parser:
    """Build the argument parser for ``settings_cls`` (one option per field).

    Each option's help names its environment variable and its default.
    """
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [options]",
        description=description,
        allow_abbrev=False,
        add_help=True,
    )
    own = parser.add_argument_group("task options")
    framework = parser.add_argument_group("keeper-task options")
    for name, field in settings_cls.model_fields.items():
        flag = _cli_flag(name)
        help_text = _help_text(settings_cls, name, field)
        section = framework if name in TaskSettings.model_fields else own
        if _is_bool(field.annotation):
            help_text = help_text.replace(" [env", f" (off: --no-{flag[2:]}) [env", 1)
            group = section.add_mutually_exclusive_group()
            group.add_argument(
                flag, dest=name, action="store_const", const=True, default=None, help=help_text
            )
            group.add_argument(
                "--no-" + flag[2:],
                dest=name,
                action="store_const",
                const=False,
                default=None,
                help=argparse.SUPPRESS,
            )
        elif _is_list(field.annotation):
            section.add_argument(
                flag, dest=name, action="append", default=None, metavar="VALUE", help=help_text
            )
        else:
            section.add_argument(
                flag, dest=name, default=None, metavar=_metavar(field.annotation), help=help_text
            )
    return parser


def _help_text(settings_cls: type[TaskSettings], name: str, field: Any) -> str:
    parts = [field.description or ""]
    extra = [f"env {_env_name(settings_cls, name)}"]
    default = None if field.default_factory is not None else field.default
    if (
        default is not None
        and default is not PydanticUndefined
        and name not in settings_cls.secret_fields
    ):
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        extra.append(f"default {shown}")
    parts.append(f"[{'; '.join(extra)}]")
    # argparse %-formats help strings.
    return " ".join(p for p in parts if p).replace("%", "%%")


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _metavar(args[0])
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    return "VALUE"


def parse_settings(
    settings_cls: type[S],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> S:
    """Parse ``argv`` and the environment into ``settings_cls``.

    Args:
        settings_cls: The task's settings class.
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.
        prog: Program name for usage messages.
        description: First line of ``--help``.

    Raises:
        UsageError: Unknown option or missing value (``--help`` raises ``SystemExit(0)``).
        SettingsError: A value is invalid; the message names the option and its variable.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(settings_cls, prog=prog, description=description)
    namespace, extra = parser.parse_known_args(args)
    if extra:
        raise UsageError(f"{_unrecognized(extra)} (see --help)")
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(settings_cls, exc)) from exc
    except PydanticSettingsError as exc:
        # A settings source failed before validation: an environment value of a list/dict
        # field that is not JSON. pydantic-settings names the field, never the value.
        raise SettingsError(_describe_source_error(settings_cls, exc)) from exc


def _env_name(settings_cls: type[TaskSettings], name: str) -> str:
    field = settings_cls.model_fields.get(name)
    if field is not None and isinstance(field.validation_alias, str):
        return field.validation_alias.upper()
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    return (prefix + name).upper()


def _describe(settings_cls: type[TaskSettings], exc: ValidationError) -> str:
    """One line per the first problem: which option, which variable, what is wrong."""
    problems: list[str] = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = [str(p) for p in err.get("loc", ()) if isinstance(p, str)]
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if loc:
            name = loc[0]
            if name in settings_cls.model_fields:
                where = f"{_cli_flag(name)} (env {_env_name(settings_cls, name)})"
            else:
                where = f"unexpected setting {name!r}"
            problems.append(f"{where}: {msg}")
        else:
            problems.append(msg)
    first = problems[0] if problems else str(exc)
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"invalid setting {first}{more}"


def _describe_source_error(settings_cls: type[TaskSettings], exc: Exception) -> str:
    match = re.search(r'field "([^"]+)"', str(exc))
    name = match.group(1) if match else None
    if name is None or name not in settings_cls.model_fields:
        return f"invalid setting: {exc}"
    return (
        f"invalid setting {_cli_flag(name)} (env {_env_name(settings_cls, name)}): the "
        "environment value is not valid JSON; list and dict fields take JSON there, "
        'e.g. \'["a", "b"]\''
    )


def settings_summary(settings: TaskSettings) -> Mapping[str, object]:
    """Which fields were set, never their values (values may be secret)."""
    return {"fields_set": sorted(settings.model_fields_set)}
