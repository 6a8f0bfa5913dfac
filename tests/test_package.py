"""Package-level contracts: the runtime imports no tooling; the public surface is stable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import keeper_task

TOOLING_PACKAGES = {
    "amqtt",
    "psutil",
    "PyInstaller",
    "trustme",
    "aiohttp",
    "click",
    "rich",
    "typer",
    "uvicorn",
    "starlette",
    "hypothesis",
}
TOOLING_MODULES = (
    "keeper_task.emulator",
    "keeper_task.testing",
    "keeper_task.cli",
    "keeper_task.build",
    "keeper_task.scaffold",
)


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out))


def test_import_keeper_task_loads_no_tooling() -> None:
    """`import keeper_task` (what a task binary does) pulls in no tooling package or module.

    Tooling that the four runtime dependencies import on their own when it happens to be
    installed (structlog loads rich, for example) is the environment's doing, not ours: it is
    absent from a runtime-only build environment, so it is subtracted as the baseline.
    """
    baseline = _modules_after("import httpx, paho.mqtt.client, pydantic_settings, structlog")
    loaded = _modules_after("import keeper_task")
    ours = loaded - baseline
    leaked = sorted(
        m for m in ours if m.split(".")[0] in TOOLING_PACKAGES or m.startswith(TOOLING_MODULES)
    )
    assert leaked == []
    never = ("amqtt", "psutil", "PyInstaller", "trustme", "aiohttp")
    assert sorted(m for m in loaded if m.split(".")[0] in never) == []


def test_public_names_are_exported_and_sorted() -> None:
    """Everything in __all__ exists, and __all__ is sorted (httpx style)."""
    names = keeper_task.__all__
    assert names == sorted(names)
    missing = [n for n in names if not hasattr(keeper_task, n)]
    assert missing == []
    for name in ("Task", "TaskContext", "TaskSettings", "ExitCode", "KeeperTaskError"):
        assert name in names


def test_every_error_derives_from_the_one_base() -> None:
    """Every exported exception class is part of the one KeeperTaskError tree."""
    errors = [
        getattr(keeper_task, n)
        for n in keeper_task.__all__
        if isinstance(getattr(keeper_task, n), type)
        and issubclass(getattr(keeper_task, n), BaseException)
    ]
    assert errors
    assert all(issubclass(e, keeper_task.KeeperTaskError) for e in errors)


def test_py_typed_marker_ships() -> None:
    """The package is marked as typed (PEP 561)."""
    from importlib.resources import files

    assert files("keeper_task").joinpath("py.typed").is_file()


def test_deployment_names_live_in_keeper_task_jobs() -> None:
    """The job model, validator, Admin client and job errors are keeper_task.jobs names."""
    import keeper_task.jobs as jobs

    for name in ("Job", "JobsClient", "load_job", "validate_job", "ValidationFailedError"):
        assert name in jobs.__all__
        assert name not in keeper_task.__all__
    assert [n for n in jobs.__all__ if not hasattr(jobs, n)] == []


def test_old_deployment_names_still_resolve_with_a_deprecation_warning() -> None:
    """0.1's `from keeper_task import load_job` works until 0.3, and says where it moved."""
    import keeper_task.jobs as jobs

    with pytest.warns(DeprecationWarning, match=r"keeper_task\.jobs\.load_job"):
        old = keeper_task.load_job
    assert old is jobs.load_job
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = keeper_task.nope  # type: ignore[attr-defined]


def test_tooling_errors_live_next_to_their_tooling() -> None:
    """EmulatorError and BuildError are the emulator's and build's; the runtime's errors
    module keeps the old names only as deprecated aliases, and the emulator's error imports
    without the [emulator] extra (so `keeper-task dev` can say which extra is missing)."""
    import keeper_task.build
    import keeper_task.errors
    from keeper_task.emulator.errors import EmulatorError

    assert "EmulatorError" not in keeper_task.errors.__all__
    assert "BuildError" not in keeper_task.errors.__all__
    assert issubclass(EmulatorError, keeper_task.KeeperTaskError)
    assert issubclass(keeper_task.build.BuildError, keeper_task.KeeperTaskError)
    with pytest.warns(DeprecationWarning, match=r"keeper_task\.emulator\.errors"):
        assert keeper_task.errors.EmulatorError is EmulatorError  # type: ignore[attr-defined]
    loaded = _modules_after("import keeper_task.emulator.errors")
    assert not any(m.split(".")[0] in {"aiohttp", "amqtt", "psutil"} for m in loaded)
