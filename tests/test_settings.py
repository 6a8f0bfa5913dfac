"""Task settings: arguments, environment and validation of the agent's substituted values."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, SecretStr

from keeper_task import ExitCode, SettingsError, TaskSettings, UsageError
from keeper_task.settings import (
    normalize_api_base,
    parse_settings,
    plain_text,
    program_name,
    secret_field_names,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = "--keeper-api-base=https://127.0.0.1:6889"


class InventorySettings(TaskSettings):
    """Settings of an example inventory task."""

    dry_run: bool = False
    max_items: int = 10
    tags: list[str] = []  # noqa: RUF012 - pydantic copies field defaults


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KEEPER_API_BASE", "KEEPER_JOB_ID", "KEEPER_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--keeper-api-base=https://127.0.0.1:6889"],
        ["--keeper-api-base", "https://127.0.0.1:6889"],
        ["--keeper-api-base=https://127.0.0.1:6889/"],
        ["--keeper-api-base=https://127.0.0.1:6889/api"],
        ["--keeper-api-base= https://127.0.0.1:6889/api/ "],
    ],
)
def test_api_base_both_forms_and_normalised(argv: list[str]) -> None:
    """Both `--flag=value` and `--flag value` work; trailing slash and /api are removed."""
    assert parse_settings(TaskSettings, argv).keeper_api_base == "https://127.0.0.1:6889"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://localhost:6889", "https://localhost:6889"),
        ("https://[::1]:6889/", "https://[::1]:6889"),
        ("https://127.0.0.2:1/API", "https://127.0.0.2:1"),
    ],
)
def test_loopback_hosts_are_accepted(url: str, expected: str) -> None:
    """localhost, ::1 and all of 127.0.0.0/8 count as loopback."""
    assert normalize_api_base(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:6888", "not an https:// URL"),
        ("https://10.1.2.3:6889", "not loopback"),
        ("https://example.com", "not loopback"),
        ("{KeeperApiBaseUrl}", "unsubstituted token"),
        ("https://127.0.0.1:99999", "invalid port"),
    ],
)
def test_bad_api_base_is_a_settings_error(url: str, fragment: str) -> None:
    """A wrong base URL ends as one line naming the option and the problem (exit 78)."""
    with pytest.raises(SettingsError) as info:
        parse_settings(TaskSettings, [f"--keeper-api-base={url}"])
    message = str(info.value)
    assert fragment in message
    assert "--keeper-api-base" in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.BAD_SETTINGS


def test_remote_api_needs_explicit_opt_out() -> None:
    """A non-loopback host is accepted only with --allow-remote-api."""
    s = parse_settings(TaskSettings, ["--allow-remote-api", "--keeper-api-base=https://10.0.0.5"])
    assert s.keeper_api_base == "https://10.0.0.5"


def test_job_identity_comes_from_the_agents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEEPER_JOB_ID / KEEPER_JOB_NAME (set by the agent) fill the job identity."""
    monkeypatch.setenv("KEEPER_JOB_ID", "disk-usage")
    monkeypatch.setenv("KEEPER_JOB_NAME", "Disk usage")
    s = parse_settings(TaskSettings, [BASE])
    assert (s.keeper_job_id, s.keeper_job_name) == ("disk-usage", "Disk usage")


def test_job_id_with_underscore_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job id with '_' would name another job on the broker: refused, never rewritten."""
    monkeypatch.setenv("KEEPER_JOB_ID", "disk_usage")
    with pytest.raises(SettingsError, match=r"KEEPER_JOB_ID.*contains '_'"):
        parse_settings(TaskSettings, [BASE])


def test_author_fields_from_arguments() -> None:
    """Author fields become options: bool flags, --no- negation, ints, repeated lists."""
    s = parse_settings(
        InventorySettings, [BASE, "--dry-run", "--max-items", "3", "--tags", "a", "--tags=b"]
    )
    assert (s.dry_run, s.max_items, s.tags) == (True, 3, ["a", "b"])
    assert parse_settings(InventorySettings, [BASE, "--no-dry-run"]).dry_run is False


def test_every_setting_has_an_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Author and framework fields read KEEPER_TASK_<FIELD>; the base URL reads KEEPER_API_BASE."""
    monkeypatch.setenv("KEEPER_TASK_MAX_ITEMS", "7")
    monkeypatch.setenv("KEEPER_TASK_DRY_RUN", "true")
    monkeypatch.setenv("KEEPER_TASK_TRUST_TIMEOUT", "2.5")
    monkeypatch.setenv("KEEPER_API_BASE", "https://127.0.0.1:7000/")
    s = parse_settings(InventorySettings, [])
    assert (s.max_items, s.dry_run, s.trust_timeout) == (7, True, 2.5)
    assert s.keeper_api_base == "https://127.0.0.1:7000"


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line has the highest priority."""
    monkeypatch.setenv("KEEPER_TASK_MAX_ITEMS", "7")
    assert parse_settings(InventorySettings, [BASE, "--max-items=9"]).max_items == 9


@pytest.mark.parametrize(
    "argv", [["--bogus"], ["--max-items"], ["positional"], ["--dry-run", "--no-dry-run"]]
)
def test_bad_arguments_are_a_usage_error(argv: list[str]) -> None:
    """Unknown/malformed arguments raise UsageError (exit 64) with a one-line message."""
    with pytest.raises(UsageError) as info:
        parse_settings(InventorySettings, argv)
    assert info.value.exit_code == ExitCode.USAGE
    assert "\n" not in str(info.value)


def test_invalid_value_names_option_and_variable_without_echoing_it() -> None:
    """A bad value names --option and its variable, and never echoes the value."""
    with pytest.raises(SettingsError) as info:
        parse_settings(InventorySettings, [BASE, "--max-items", "s3cr3t"])
    message = str(info.value)
    assert "--max-items" in message
    assert "KEEPER_TASK_MAX_ITEMS" in message
    assert "s3cr3t" not in message


def test_help_lists_author_options(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints every option, including the author's, and exits 0."""
    with pytest.raises(SystemExit) as info:
        parse_settings(InventorySettings, ["--help"], prog="inventory")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-items" in out
    assert "--keeper-api-base" in out


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["--api-tokn=s3cr3t"], "--api-tokn"),
        (["--api-tokn", "s3cr3t"], "--api-tokn and 1 other argument"),
        (["s3cr3t"], "1 other argument"),
        (["--dry-run=s3cr3t"], "--dry-run: takes no value"),
    ],
)
def test_usage_errors_never_quote_a_value(argv: list[str], shown: str) -> None:
    """A mistyped option is named, but no value from the command line is echoed (exit 64)."""
    with pytest.raises(UsageError) as info:
        parse_settings(InventorySettings, argv)
    message = str(info.value)
    assert shown in message
    assert "s3cr3t" not in message


def test_non_json_env_value_of_a_list_field_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KEEPER_TASK_TAGS that is not JSON: one line naming option and variable (exit 78)."""
    monkeypatch.setenv("KEEPER_TASK_TAGS", "s3cr3t,b")
    with pytest.raises(SettingsError) as info:
        parse_settings(InventorySettings, [BASE])
    message = str(info.value)
    assert "--tags (env KEEPER_TASK_TAGS)" in message
    assert "JSON" in message
    assert "s3cr3t" not in message
    assert info.value.exit_code == ExitCode.BAD_SETTINGS


def test_api_base_with_credentials_is_refused_without_quoting_them() -> None:
    """A base URL with user:password is refused, and the password is not repeated."""
    with pytest.raises(SettingsError) as info:
        parse_settings(TaskSettings, ["--keeper-api-base=https://me:s3cr3t@127.0.0.1:6889"])
    assert "user name or password" in str(info.value)
    assert "s3cr3t" not in str(info.value)


class _WithSecret(TaskSettings):
    """A task with a secret setting."""

    secret_fields = frozenset({"api_token"})
    api_token: str = "dev-token-123"
    retries: int = 3


def test_help_names_env_and_default_and_groups_the_authors_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--help shows each option's variable and default, the author's options first, and
    never the default of a secret field."""
    with pytest.raises(SystemExit):
        parse_settings(_WithSecret, ["--help"], prog="t", description="Does things.")
    out = " ".join(capsys.readouterr().out.split())
    assert "Does things." in out
    assert out.index("task options:") < out.index("keeper-task options:")
    assert "[env KEEPER_TASK_RETRIES; default 3]" in out
    assert "[env KEEPER_TASK_API_TOKEN]" in out
    assert "dev-token-123" not in out
    assert "(off: --no-mqtt)" in out


# --- required options, ranges --------------------------------------------------------------


def test_missing_api_base_is_a_usage_error_before_anything_starts() -> None:
    """Without --keeper-api-base (or KEEPER_API_BASE) the parser stops: exit 64, one line."""
    with pytest.raises(UsageError) as info:
        parse_settings(TaskSettings, [])
    assert info.value.exit_code == ExitCode.USAGE == 64
    assert "missing --keeper-api-base" in str(info.value)
    assert "{KeeperApiBaseUrl}" in str(info.value)


class _NeedsTarget(TaskSettings):
    target: str


def test_missing_required_author_option_is_a_usage_error() -> None:
    """An author field without a default is a required option: missing means exit 64."""
    with pytest.raises(UsageError) as info:
        parse_settings(_NeedsTarget, [BASE])
    assert str(info.value) == (
        "missing required option --target (env KEEPER_TASK_TARGET) (see --help)"
    )
    assert parse_settings(_NeedsTarget, [BASE, "--target", "x"]).target == "x"


@pytest.mark.parametrize(
    ("option", "value", "limits"),
    [
        ("--http-timeout", "1e10", "range 0 < N <= 3600"),
        ("--http-timeout", "nan", "range 0 < N <= 3600"),
        ("--http-timeout", "inf", "range 0 < N <= 3600"),
        ("--http-timeout", "0", "range 0 < N <= 3600"),
        ("--http-timeout", "-1", "range 0 < N <= 3600"),
        ("--mqtt-connect-timeout", "1e10", "range 0 < N <= 3600"),
        ("--mqtt-flush-timeout", "1e20", "range 0 <= N <= 3600"),
        ("--mqtt-flush-timeout", "-inf", "range 0 <= N <= 3600"),
        ("--trust-timeout", "-0.5", "range 0 <= N <= 86400"),
        ("--trust-timeout", "1e400", "range 0 <= N <= 86400"),
        ("--connect-retry-timeout", "nan", "range 0 <= N <= 3600"),
        ("--deadline", "0", "range 0 < N <= 2592000"),
        ("--deadline", "1e10", "range 0 < N <= 2592000"),
        ("--mqtt-keepalive", "4", "range 5 <= N <= 65535"),
        ("--mqtt-keepalive", "1e3", "range 5 <= N <= 65535"),
    ],
)
def test_numbers_out_of_range_exit_78_naming_option_and_range(
    option: str, value: str, limits: str
) -> None:
    """Every duration and count has a range: outside it (or nan/inf) is one line naming the
    option, its variable and the range, never the value (exit 78, not a crash later)."""
    with pytest.raises(SettingsError) as info:
        parse_settings(TaskSettings, [BASE, f"{option}={value}"])
    message = str(info.value)
    env = "KEEPER_TASK_" + option[2:].replace("-", "_").upper()
    kind = "an integer" if option == "--mqtt-keepalive" else "a finite number"
    assert message == f"invalid setting {option} (env {env}): must be {kind} in the {limits}"
    assert info.value.exit_code == ExitCode.BAD_SETTINGS == 78


def test_range_applies_to_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEEPER_TASK_HTTP_TIMEOUT=1e10 is refused like the option."""
    monkeypatch.setenv("KEEPER_TASK_HTTP_TIMEOUT", "1e10")
    with pytest.raises(SettingsError, match=r"--http-timeout .*range 0 < N <= 3600"):
        parse_settings(TaskSettings, [BASE])


def test_range_edges_are_accepted() -> None:
    """The documented bounds themselves are valid values."""
    s = parse_settings(
        TaskSettings,
        [
            BASE,
            "--trust-timeout=0",
            "--connect-retry-timeout=3600",
            "--http-timeout=3600",
            "--mqtt-flush-timeout=0",
            "--mqtt-keepalive=65535",
            "--deadline=2592000",
        ],
    )
    assert (s.trust_timeout, s.http_timeout, s.mqtt_keepalive) == (0, 3600, 65535)


# --- secrets ---------------------------------------------------------------------------------


class _Secrets(TaskSettings):
    secret_fields = frozenset({"listed"})
    token: SecretStr = SecretStr("tok-AAA")
    hidden: str = Field(default="hid-BBB", repr=False)
    listed: str = "lst-CCC"
    shown: str = "visible-DDD"


def test_secret_fields_never_appear_in_repr_or_str() -> None:
    """SecretStr, Field(repr=False) and secret_fields: none shows in repr()/str()."""
    s = parse_settings(_Secrets, [BASE])
    for text in (repr(s), str(s), f"{s!r} {s}"):
        assert "visible-DDD" in text
        for secret in ("tok-AAA", "hid-BBB", "lst-CCC"):
            assert secret not in text
    assert secret_field_names(_Secrets) == {"token", "hidden", "listed"}
    assert secret_field_names(s) == {"token", "hidden", "listed"}
    assert s.token.get_secret_value() == "tok-AAA"


def test_secret_fields_naming_no_field_is_refused_at_class_creation() -> None:
    """A typo in secret_fields would leave the real field unprotected: refused at once."""
    with pytest.raises(TypeError, match="api_tokn"):

        class _Typo(TaskSettings):
            secret_fields = frozenset({"api_tokn"})
            api_token: str = "x"


# --- --help ---------------------------------------------------------------------------------


def test_help_marks_required_options_first_and_shows_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--help: usage names the required option, the required group comes first and marks it,
    and reStructuredText markup in descriptions is gone."""

    class _Documented(TaskSettings):
        level: int = Field(default=1, description="Level for ``scan`` (see :class:`~a.b.Scan`).")

    with pytest.raises(SystemExit) as info:
        parse_settings(
            _Documented,
            ["--help"],
            prog="demo",
            description="Scans with :func:`do_scan` and ``--fast``.",
        )
    assert info.value.code == 0
    raw = capsys.readouterr().out
    out = " ".join(raw.split())
    assert raw.startswith("usage: demo --keeper-api-base URL [options]")
    assert out.index("required options:") < out.index("task options:")
    assert out.index("task options:") < out.index("keeper-task options:")
    assert out.index("keeper-task options:") < out.index("-h, --help")  # help last
    assert "--keeper-api-base URL (required) The agent's HTTPS API base URL" in out
    assert "Scans with do_scan and --fast." in out
    assert "Level for scan (see Scan)." in out
    assert "``" not in raw and ":class:" not in raw and ":func:" not in raw


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("``x``", "x"),
        (":class:`~keeper_task.TaskSettings`", "TaskSettings"),
        (":func:`keeper_task.settings.parse_settings`", "keeper_task.settings.parse_settings"),
        (":ref:`the table <exit-codes>`", "the table"),
        ("`docs <https://example.com>`_", "docs"),
        ("**bold** and *em*", "bold and em"),
        ("a * b * c", "a * b * c"),
    ],
)
def test_plain_text_removes_restructuredtext(text: str, plain: str) -> None:
    """Roles, literals, links and emphasis lose their markup; plain asterisks stay."""
    assert plain_text(text) == plain


def test_frozen_binary_is_named_after_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyInstaller binary's name is the binary's own (without .exe), whatever argv[0] is."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(Path("C:/Jobs/bin/DemoTask/DemoTask.exe")))
    monkeypatch.setattr(sys, "argv", ["DemoTask"])
    assert program_name() == "DemoTask"


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [("/opt/x/probe.py", "probe.py"), ("-c", "-c"), ("/usr/local/bin/demo-task", "demo-task")],
)
def test_script_and_launcher_names(
    monkeypatch: pytest.MonkeyPatch, argv0: str, expected: str
) -> None:
    """A script is `python script.py` (`python -c` for -c); a console-script launcher is its
    own name."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(sys, "argv", [argv0])
    python = Path(sys.executable).name
    wanted = expected if argv0.startswith("/usr") else f"{python} {expected}"
    assert program_name() == wanted


_HELP_PROBE = """
from keeper_task import Task, TaskContext


class Probe(Task):
    \"\"\"Probe the ``thing`` (see :class:`~x.Thing`).\"\"\"

    def run(self, ctx: TaskContext) -> None:
        pass


Probe.main()
"""


def _run_probe(tmp_path: Path, argv: list[str], stdin_env: dict[str, str] | None = None):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(_HELP_PROBE))
    (tmp_path / "probe.py").write_text(textwrap.dedent(_HELP_PROBE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])
    env["KEEPER_TASK_LOG_FORMAT"] = "json"
    return subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_help_names_the_command_as_invoked(tmp_path: Path) -> None:
    """`python -m pkg --help` says `python -m pkg`; `python probe.py --help` says so too."""
    python = Path(sys.executable).name
    as_module = _run_probe(tmp_path, ["-m", "probe_pkg", "--help"])
    as_script = _run_probe(tmp_path, ["probe.py", "--help"])
    assert as_module.returncode == as_script.returncode == 0
    assert as_module.stdout.startswith(f"usage: {python} -m probe_pkg --keeper-api-base URL")
    assert as_script.stdout.startswith(f"usage: {python} probe.py --keeper-api-base URL")
    assert "Probe the thing (see Thing)." in as_script.stdout


def test_parser_usage_errors_are_one_plain_line_exit_64(tmp_path: Path) -> None:
    """A missing --keeper-api-base and an unknown option: `prog: error: ...`, one plain line
    (not a JSON log record, though stderr is a pipe), exit 64."""
    python = Path(sys.executable).name
    missing = _run_probe(tmp_path, ["probe.py"])
    bogus = _run_probe(tmp_path, ["probe.py", BASE, "--bogus"])
    for proc in (missing, bogus):
        assert proc.returncode == ExitCode.USAGE
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"{python} probe.py: error: ")
    assert "missing --keeper-api-base" in missing.stderr
    assert "unrecognized arguments: --bogus" in bogus.stderr


_LIMITS = {
    "--http-timeout": (0.0, False, 3600.0),
    "--mqtt-connect-timeout": (0.0, False, 3600.0),
    "--mqtt-flush-timeout": (0.0, True, 3600.0),
    "--trust-timeout": (0.0, True, 86400.0),
    "--connect-retry-timeout": (0.0, True, 3600.0),
    "--deadline": (0.0, False, 2592000.0),
}


@settings(max_examples=300, deadline=None)
@given(
    option=st.sampled_from(sorted(_LIMITS)),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 3600.0]),
)
def test_any_number_is_accepted_in_range_or_refused_with_78(option: str, value: float) -> None:
    """Whatever number is given (huge, tiny, negative, nan, inf), the outcome is the value
    in its range or SettingsError (78) naming the option, never another exception."""
    low, low_ok, high = _LIMITS[option]
    inside = math.isfinite(value) and (value >= low if low_ok else value > low) and value <= high
    try:
        parsed = parse_settings(TaskSettings, [BASE, f"{option}={value!r}"])
    except SettingsError as exc:
        assert not inside
        assert str(exc).startswith(f"invalid setting {option} ")
        assert exc.exit_code == 78
    else:
        assert inside
        assert getattr(parsed, option[2:].replace("-", "_")) == value
