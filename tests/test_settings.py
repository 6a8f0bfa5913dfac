"""Task settings: arguments, environment and validation of the agent's substituted values."""

from __future__ import annotations

import pytest

from keeper_task import ExitCode, SettingsError, TaskSettings, UsageError
from keeper_task.settings import normalize_api_base, parse_settings


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
    s = parse_settings(TaskSettings, [])
    assert (s.keeper_job_id, s.keeper_job_name) == ("disk-usage", "Disk usage")


def test_job_id_with_underscore_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job id with '_' would name another job on the broker: refused, never rewritten."""
    monkeypatch.setenv("KEEPER_JOB_ID", "disk_usage")
    with pytest.raises(SettingsError, match=r"KEEPER_JOB_ID.*contains '_'"):
        parse_settings(TaskSettings, [])


def test_author_fields_from_arguments() -> None:
    """Author fields become options: bool flags, --no- negation, ints, repeated lists."""
    s = parse_settings(
        InventorySettings, ["--dry-run", "--max-items", "3", "--tags", "a", "--tags=b"]
    )
    assert (s.dry_run, s.max_items, s.tags) == (True, 3, ["a", "b"])
    assert parse_settings(InventorySettings, ["--no-dry-run"]).dry_run is False


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
    assert parse_settings(InventorySettings, ["--max-items=9"]).max_items == 9


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
        parse_settings(InventorySettings, ["--max-items", "s3cr3t"])
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
        parse_settings(InventorySettings, [])
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
