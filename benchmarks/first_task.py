"""From a fresh clone to your own task running under the emulator: the README's three commands.

Clones this repository into a temporary directory, then runs, exactly as the README shows them
and without activating anything:

1. the README's first command (venv + ``pip install -e '.[dev]'`` + the hello example);
2. ``.venv/bin/keeper-task new demo-task``;
3. ``cd demo-task && ../.venv/bin/keeper-task dev run``.

The commands are read from the cloned README (its first ``bash`` block and the block holding
``keeper-task new``), so what is measured is what the README says. Prints the wall time of
each step, the new task's first KeeperLogger line and the total against the 60 s target.
Exits 1 when a step fails or its output lacks what it must show.

    python benchmarks/first_task.py            # pip's cache as it is on this machine
    python benchmarks/first_task.py --no-cache # pip downloads everything (PIP_NO_CACHE_DIR)

The clone is of the committed HEAD (``git clone`` of this checkout); the packages come from
the package index.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 60.0


def _blocks(readme: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)]


def readme_commands(readme: str) -> list[str]:
    """The README's first command, then the lines of its three-command path."""
    blocks = _blocks(readme)
    path = next(b for b in blocks if "keeper-task new" in b)
    return [blocks[0], *[line for line in path.splitlines() if line.strip()]]


def clean_env(no_cache: bool) -> dict[str, str]:
    """This environment minus any activated venv, agent variables and PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEEPER_", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"))
    }
    venv_bin = str(Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin"))
    if sys.prefix != sys.base_prefix:  # run from a venv: keep it off PATH, as on a fresh machine
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin
        )
    if no_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cache", action="store_true", help="pip without its cache")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    if shutil.which("python3") is None:
        print("python3 is not on PATH: the README's first command needs it", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="keeper-task-first-task-"))
    clone = work / "keeper-task"
    env = clean_env(args.no_cache)
    try:
        started = time.perf_counter()
        subprocess.run(
            ["git", "clone", "--quiet", str(REPO), str(clone)], check=True, env=env, timeout=300
        )
        clone_time = time.perf_counter() - started
        commands = readme_commands((clone / "README.md").read_text(encoding="utf-8"))
        print(f"fresh clone of {REPO} in {clone} ({clone_time:.1f} s, not counted)")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{os.cpu_count()} CPUs, load average {load:.1f} at the start")
        results: list[tuple[str, float]] = []
        last_output = ""
        for number, command in enumerate(commands, start=1):
            # The parts of an `a && b && c` line run one after the other, as bash would (and
            # stop at the first failure), so that each is timed on its own.
            parts = [command] if command.startswith("cd ") else command.split(" && ")
            began = time.perf_counter()
            for index, part in enumerate(parts):
                part_began = time.perf_counter()
                done = subprocess.run(
                    ["bash", "-c", part],
                    cwd=clone,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=False,
                )
                if len(parts) > 1:
                    label = f"{number}{'abcdefgh'[index]}"
                    spent_part = time.perf_counter() - part_began
                    print(f"  step {label}: {spent_part:6.1f} s  $ {part}")
                if done.returncode != 0:
                    print(f"step {number} failed (exit {done.returncode})", file=sys.stderr)
                    print(done.stdout + done.stderr, file=sys.stderr)
                    return 1
            spent = time.perf_counter() - began
            results.append((command, spent))
            print(f"step {number}: {spent:6.1f} s  exit 0  $ {command}")
            last_output = done.stdout
        first = next(
            (ln for ln in last_output.splitlines() if ln.startswith("[KeeperLogger]")), None
        )
        if first is None or "--- job demo-task: succeeded" not in last_output:
            print("the last step did not show the new task's KeeperLogger lines:", file=sys.stderr)
            print(last_output, file=sys.stderr)
            return 1
        total = sum(spent for _command, spent in results)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load average {load:.1f} at the end")
        print(f"first KeeperLogger line of the new task: {first}")
        print(
            f"total: {total:.1f} s for {len(results)} commands "
            f"(target <= {TARGET_SECONDS:.0f} s: {total / TARGET_SECONDS:.2f} x target, "
            f"{'met' if total <= TARGET_SECONDS else 'MISSED'}; pip cache "
            f"{'off' if args.no_cache else 'as on this machine'})"
        )
        return 0 if total <= TARGET_SECONDS else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
