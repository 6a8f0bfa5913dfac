"""Task settings: the agent's substituted arguments, its environment, and the author's options.

Sources, lowest to highest priority: field defaults, environment, command line.

* ``--keeper-api-base=URL`` (or ``--keeper-api-base URL``) carries the agent's
  ``{KeeperApiBaseUrl}``; environment ``KEEPER_API_BASE`` overrides it for development.
* ``KEEPER_JOB_ID`` / ``KEEPER_JOB_NAME`` are set by the agent when the job declares
  ``mqttTopics``; ``--keeper-job-id`` / ``--keeper-job-name`` override them.
* Every other field ``some_field`` is ``--some-field VALUE`` on the command line and
  ``KEEPER_TASK_SOME_FIELD`` in the environment. A ``bool`` field is ``--flag`` / ``--no-flag``.

Authors add their own options by subclassing :class:`TaskSettings`.

Every number has a documented range (see the README's settings table); a value outside it,
``nan`` or ``inf`` is refused with exit 78, naming the option and the range, never the value.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from keeper_task.errors import SettingsError, UsageError
from keeper_task.mqtt import DEFAULT_CLIENT_ID_TEMPLATE
from keeper_task.tls import is_loopback_host

__all__ = [
    "TaskSettings",
    "normalize_api_base",
    "parse_settings",
    "plain_text",
    "program_name",
    "secret_field_names",
]

S = TypeVar("S", bound="TaskSettings")

#: The plugin name whose merged settings hold ``broker.host`` / ``broker.port``.
AGENT_PLUGIN_NAME = "KeeperPrivilegeManager"

#: Upper bound of ``--deadline``: 30 days (a timer cannot be armed for much longer anyway).
MAX_DEADLINE = 30 * 86_400

#: Options a run cannot start without, though the model allows them unset (for tests).
REQUIRED_OPTIONS = ("keeper_api_base",)


class TaskSettings(BaseSettings):
    """Settings every task has; subclass it to add your own fields.

    Secret fields (tokens, passwords) are never shown by ``repr()``/``str()`` of the
    settings, in ``--help`` defaults, or in log output. Mark one in any of three ways:

    * type it ``pydantic.SecretStr`` (read it with ``.get_secret_value()``);
    * declare it with ``Field(repr=False)``;
    * list its name in the ``secret_fields`` class attribute.

    :func:`secret_field_names` returns the names marked either way.

    Example:
        >>> from pydantic import SecretStr
        >>> class InventorySettings(TaskSettings):
        ...     dry_run: bool = False
        ...     max_items: int = 10
        ...     api_token: SecretStr | None = None  # hidden everywhere
    """

    model_config = SettingsConfigDict(
        env_prefix="KEEPER_TASK_",
        extra="forbid",
        validate_default=True,
        # pydantic-settings < 2.5 reserves "settings_" and would warn about
        # `settings_plugin` (and a task author's own settings_* fields) at import.
        protected_namespaces=("model_",),
    )

    #: Names of fields that are never shown as a value (besides ``SecretStr`` and
    #: ``Field(repr=False)`` fields): see :func:`secret_field_names`.
    secret_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = sorted(set(cls.secret_fields) - set(cls.model_fields))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.secret_fields names {', '.join(unknown)}, which "
                f"{'is not a field' if len(unknown) == 1 else 'are not fields'}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._shown())})"

    def __str__(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in self._shown())

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        yield from self._shown()

    def _shown(self) -> Iterator[tuple[str, Any]]:
        hidden = secret_field_names(type(self))
        for name, value in self:
            if name not in hidden:
                yield name, value

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
        le=86_400,
        allow_inf_nan=False,
        description="Seconds to keep retrying 403 (startup registration window), 5xx and "
        "timeouts; 0 makes one attempt.",
    )
    connect_retry_timeout: float = Field(
        default=3.0,
        ge=0,
        le=3_600,
        allow_inf_nan=False,
        description="Seconds to keep retrying a refused connection (nothing listens: a wrong "
        "port or no agent); at most --trust-timeout.",
    )
    http_timeout: float = Field(
        default=5.0,
        gt=0,
        le=3_600,
        allow_inf_nan=False,
        description="Seconds one HTTPS request may take in all: connect, TLS, headers, body.",
    )
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
        default=DEFAULT_CLIENT_ID_TEMPLATE,
        description="Client id template; fields {job_id}, {job_name}, {pid}. The agent "
        "reads the job id from the first '_'-separated segment.",
    )
    mqtt_keepalive: int = Field(default=30, ge=5, le=65535, description="MQTT keepalive (s).")
    mqtt_connect_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3_600,
        allow_inf_nan=False,
        description="Seconds to wait for the broker to accept the connection.",
    )
    mqtt_flush_timeout: float = Field(
        default=5.0,
        ge=0,
        le=3_600,
        allow_inf_nan=False,
        description="Seconds to wait on exit for unacknowledged QoS 1 messages.",
    )
    deadline: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE,
        allow_inf_nan=False,
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


def secret_field_names(settings_cls: type[BaseSettings] | BaseSettings) -> frozenset[str]:
    """Names of the secret fields of a settings class (or instance).

    A field is secret when its type is ``SecretStr``/``SecretBytes`` (also inside
    ``Optional``), when it is declared with ``Field(repr=False)``, or when its name is in
    the class's ``secret_fields``.
    """
    cls = settings_cls if isinstance(settings_cls, type) else type(settings_cls)
    listed = set(getattr(cls, "secret_fields", ()))
    return frozenset(
        name
        for name, field in cls.model_fields.items()
        if name in listed or not field.repr or _is_secret_type(field.annotation)
    )


def _is_secret_type(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_is_secret_type(arg) for arg in typing.get_args(annotation))


# --- command line -------------------------------------------------------------------------


def program_name() -> str:
    """The command as it was invoked, for ``--help`` and error lines.

    * a frozen binary (PyInstaller): the binary's own name (what the job's command runs),
      without ``.exe``;
    * ``python -m pkg``: ``python -m pkg`` (what argparse itself shows from Python 3.14);
    * a script: ``python script.py``, because ``script`` alone is not a command
      (``python -c`` for code given with ``-c``);
    * an installed launcher (console script): its name.
    """
    python = Path(sys.executable).name.removesuffix(".exe") or "python"
    if getattr(sys, "frozen", False):
        return Path(sys.executable).name.removesuffix(".exe")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"{python} -m {spec.name.removesuffix('.__main__')}"
    arg0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if arg0 == "-c":
        return f"{python} -c"
    if arg0.endswith((".py", ".pyw", ".pyz")):
        return f"{python} {arg0}"
    return arg0.removesuffix(".exe") or python


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

    Required options come first and are marked; then the task's own options, then
    keeper-task's. Each option's help names its environment variable and its default (never
    a secret field's), in plain text (reStructuredText markup is removed).
    """
    fields = settings_cls.model_fields
    required = [n for n, f in fields.items() if _is_required(n, f)]
    usage = " ".join(
        ["%(prog)s", *(f"{_cli_flag(n)} {_option_metavar(n, fields[n])}" for n in required)]
    )
    parser = _Parser(
        prog=prog or program_name(),
        usage=f"{usage} [options]",
        description=plain_text(description) if description else None,
        allow_abbrev=False,
        add_help=False,  # -h goes last, below the options a reader came for
    )
    sections = {
        "required": parser.add_argument_group("required options"),
        "own": parser.add_argument_group("task options"),
        "framework": parser.add_argument_group("keeper-task options"),
    }
    for field_name, field in settings_cls.model_fields.items():
        if field_name in required:
            section = sections["required"]
        elif field_name in TaskSettings.model_fields:
            section = sections["framework"]
        else:
            section = sections["own"]
        _add_option(section, settings_cls, field_name, field, field_name in required)
    sections["framework"].add_argument(
        "-h", "--help", action="help", help="Show this help and exit."
    )
    return parser


def _is_required(name: str, field: Any) -> bool:
    return name in REQUIRED_OPTIONS or bool(field.is_required())


def _add_option(
    section: Any, settings_cls: type[TaskSettings], name: str, field: Any, required: bool
) -> None:
    flag = _cli_flag(name)
    help_text = _help_text(settings_cls, name, field)
    if required:
        help_text = f"(required) {help_text}"
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
        metavar = _option_metavar(name, field)
        section.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def _option_metavar(name: str, field: Any) -> str:
    return "URL" if name == "keeper_api_base" else _metavar(field.annotation)


def _help_text(settings_cls: type[TaskSettings], name: str, field: Any) -> str:
    parts = [plain_text(field.description or "")]
    extra = [f"env {_env_name(settings_cls, name)}"]
    default = None if field.default_factory is not None else field.default
    if (
        default is not None
        and default is not PydanticUndefined
        and name not in secret_field_names(settings_cls)
    ):
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        extra.append(f"default {shown}")
    limits = _range_text(field)
    if limits:
        extra.append(limits)
    parts.append(f"[{'; '.join(extra)}]")
    # argparse %-formats help strings.
    return " ".join(p for p in parts if p).replace("%", "%%")


# reStructuredText a docstring may hold besides roles: ``code``, `text <url>`_ links,
# **strong** and *emphasis*.
_RST_ROLE = re.compile(r":[\w:.-]+:`(~?)([^`]*)`")
_RST = (
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), r"\1"),
)


def plain_text(text: str) -> str:
    """Return ``text`` without reStructuredText markup, for ``--help``.

    ``:class:`~pkg.Name``` becomes ``Name``, ``:func:`pkg.f``` ``pkg.f``, ``:ref:`Title
    <target>``` ``Title``; double back-quotes, links and emphasis lose their markup.
    """
    text = _RST_ROLE.sub(_role_text, text)
    for pattern, replacement in _RST:
        text = pattern.sub(replacement, text)
    return text


def _role_text(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2)
    if target.endswith(">") and "<" in target:
        return target[: target.index("<")].strip()
    return target.rsplit(".", 1)[-1] if tilde else target


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
        prog: Program name for usage messages; default :func:`program_name`.
        description: First line of ``--help``.

    Raises:
        UsageError: Unknown option, missing value, or a required option missing (exit 64;
            ``--help`` raises ``SystemExit(0)``).
        SettingsError: A value is invalid; the message names the option, its variable and,
            for a number, its range (exit 78).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(settings_cls, prog=prog, description=description)
    namespace, extra = parser.parse_known_args(args)
    if extra:
        raise UsageError(f"{_unrecognized(extra)} (see --help)")
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    try:
        settings = settings_cls(**given)
    except ValidationError as exc:
        missing = _missing(settings_cls, exc)
        if missing is not None:
            raise UsageError(missing) from exc
        raise SettingsError(_describe(settings_cls, exc)) from exc
    except PydanticSettingsError as exc:
        # A settings source failed before validation: an environment value of a list/dict
        # field that is not JSON. pydantic-settings names the field, never the value.
        raise SettingsError(_describe_source_error(settings_cls, exc)) from exc
    if settings.keeper_api_base is None:
        raise UsageError(_MISSING_API_BASE)
    return settings


_MISSING_API_BASE = (
    "missing --keeper-api-base: add `--keeper-api-base={KeeperApiBaseUrl}` to the job task's "
    "arguments (or set KEEPER_API_BASE when running by hand)"
)


def _missing(settings_cls: type[TaskSettings], exc: ValidationError) -> str | None:
    """The usage error for required options that were not given, if that is all that's wrong."""
    errors = exc.errors(include_input=False, include_url=False)
    names = [str(e["loc"][0]) for e in errors if e.get("type") == "missing" and e.get("loc")]
    if not names or len(names) != len(errors):
        return None
    options = ", ".join(f"{_cli_flag(n)} (env {_env_name(settings_cls, n)})" for n in names)
    return f"missing required option {options} (see --help)"


def _env_name(settings_cls: type[TaskSettings], name: str) -> str:
    field = settings_cls.model_fields.get(name)
    if field is not None and isinstance(field.validation_alias, str):
        return field.validation_alias.upper()
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    return (prefix + name).upper()


#: pydantic error types that mean "not a number in the field's range".
_RANGE_ERRORS = frozenset(
    {
        "finite_number",
        "float_parsing",
        "float_type",
        "int_parsing",
        "int_type",
        "int_from_float",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


def _range_text(field: Any) -> str | None:
    """``"range 0 < N <= 3600"`` from a field's numeric bounds, or None if it has none."""
    # pydantic keeps Field(gt=..., le=...) as annotated-types objects in ``metadata``;
    # read them by their public attribute names rather than import that package.
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        for key in ("gt", "ge", "lt", "le"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    low = f"{bounds['gt']} < " if "gt" in bounds else ""
    low = f"{bounds['ge']} <= " if "ge" in bounds else low
    high = f" < {bounds['lt']}" if "lt" in bounds else ""
    high = f" <= {bounds['le']}" if "le" in bounds else high
    if not (low or high):
        return None
    return f"range {low}N{high}"


def _problem(settings_cls: type[TaskSettings], err: Any) -> str:
    loc = [str(p) for p in err.get("loc", ()) if isinstance(p, str)]
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if not loc:
        return msg
    name = loc[0]
    field = settings_cls.model_fields.get(name)
    if field is None:
        return f"unexpected setting {name!r}: {msg}"
    where = f"{_cli_flag(name)} (env {_env_name(settings_cls, name)})"
    limits = _range_text(field)
    if limits is not None and err.get("type") in _RANGE_ERRORS:
        kind = "an integer" if _base_type(field.annotation) is int else "a finite number"
        msg = f"must be {kind} in the {limits}"
    return f"{where}: {msg}"


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _describe(settings_cls: type[TaskSettings], exc: ValidationError) -> str:
    """One line for the first problem: which option, which variable, what is wrong."""
    problems = [
        _problem(settings_cls, e) for e in exc.errors(include_input=False, include_url=False)
    ]
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
