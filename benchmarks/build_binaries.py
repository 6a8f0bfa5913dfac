"""Build time, binary size and cold start of PyInstaller onedir / onefile vs ``python task.py``.

Usage: ``python benchmarks/build_binaries.py [--runs N] [--keep DIR]``

Scaffolds a task with ``keeper-task new`` (depending on this checkout), builds it twice with
``keeper-task build`` (onedir, then onefile; the second build reuses the build environment, so
its time is the PyInstaller step only), then measures, for the two binaries and for
``python task.py`` run by the build environment's interpreter (same packages, no tooling):

* ``start``: exec to exit of ``--help`` (interpreter or bootloader, imports, argument parsing);
* ``run``: one full run under the local agent emulator (settings fetched, MQTT connected,
  logs flushed), measured as the task process's lifetime recorded by the emulator.

Medians of N runs, printed with ratios to ``python task.py``. Needs PyPI for the first build.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from keeper_task import build, scaffold  # noqa: E402
from keeper_task.emulator import Emulator  # noqa: E402
from keeper_task.testing import run_task  # noqa: E402


def _median_start(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([*cmd, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_run(agent: Emulator, cmd: list[str], job: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        result = run_task(agent, cmd, job=job)
        if result.exit_code != 0 or result.run is None:
            raise SystemExit(f"run of {cmd} failed: {result.stderr}")
        times.append(result.run.tasks[0].duration)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="build in DIR and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="keeper-task-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _bench(work, args.runs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)  # two builds: ~100 MB


def _bench(work: Path, runs: int) -> int:
    spec = scaffold.make_spec("bench-task", keeper_task_spec=f"keeper-task @ {REPO.as_uri()}")
    root = work / "bench-task"
    scaffold.create_project(spec, root, force=True)
    quiet = lambda _line: None  # noqa: E731

    results: dict[str, dict[str, float]] = {}
    binaries: dict[str, Path] = {}
    for mode in ("onedir", "onefile"):
        print(f"building {mode} ...", flush=True)
        res = build.build_project(
            root, onefile=mode == "onefile", out=work / f"dist-{mode}", echo=quiet
        )
        binaries[mode] = res.binary
        results[mode] = {
            "build_s": res.seconds,
            "size_mb": res.total_size / 1e6,
        }
    py = build._venv_python(root / "build" / "keeper-task" / "venv")
    script = root / "src" / "bench_task" / "task.py"
    commands = {
        "python task.py": [str(py), str(script)],
        "onedir": [str(binaries["onedir"])],
        "onefile": [str(binaries["onefile"])],
    }
    results["python task.py"] = {"build_s": 0.0, "size_mb": 0.0}
    job = root / "jobs" / scaffold.current_os() / "bench-task.json"
    with Emulator() as agent:
        for name, cmd in commands.items():
            print(f"measuring {name} ...", flush=True)
            results[name]["start_s"] = _median_start(cmd, runs)
            results[name]["run_s"] = _median_run(agent, cmd, job, runs)

    base = results["python task.py"]
    print()
    print(
        f"{'variant':<16}{'build s':>9}{'size MB':>9}{'start ms':>10}{'x py':>7}"
        f"{'run ms':>9}{'x py':>7}"
    )
    for name in ("python task.py", "onedir", "onefile"):
        r = results[name]
        print(
            f"{name:<16}{r['build_s']:>9.1f}{r['size_mb']:>9.1f}"
            f"{r['start_s'] * 1000:>10.0f}{r['start_s'] / base['start_s']:>7.2f}"
            f"{r['run_s'] * 1000:>9.0f}{r['run_s'] / base['run_s']:>7.2f}"
        )
    print()
    print(
        f"onefile/onedir: size {results['onefile']['size_mb'] / results['onedir']['size_mb']:.2f}x,"
        f" start {results['onefile']['start_s'] / results['onedir']['start_s']:.2f}x"
    )
    print("(the onefile build reuses the onedir build environment; --keep DIR keeps them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
