"""The README's promises: its code compiles, its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


THREE_COMMANDS = [
    ".venv/bin/keeper-task new demo-task",
    "cd demo-task && ../.venv/bin/keeper-task dev run",
]


def test_readme_starts_with_a_pitch_two_commands_and_the_three_command_path() -> None:
    """Title, one-sentence pitch, two one-line bash commands, then the three-command path
    (the first command, then two more) before any section."""
    head = README.split("\n## ", 1)[0]
    fenced = re.findall(r"```(\w*)\n(.*?)```", head, flags=re.S)
    assert [lang for lang, _ in fenced] == ["bash", "bash", "bash"]
    assert all(len(body.strip().splitlines()) == 1 for _, body in fenced[:2])
    assert fenced[2][1].strip().splitlines() == THREE_COMMANDS
    assert "python3 -m venv .venv" in fenced[0][1]  # command 1 makes the .venv used next
    pitch = head.split("\n\n")[1]
    assert pitch.count(". ") == 0 and pitch.endswith(".")


def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run runs exactly the README's second command (install + full test suite)."""
    test_command = _blocks("bash")[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_python_examples_compile() -> None:
    """Every Python example in the README is valid Python."""
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for number, block in enumerate(blocks):
        compile(block, f"README.md python block {number}", "exec")


def test_hello_example_is_the_readmes_task() -> None:
    """examples/hello/task.py is the task the README shows first."""
    hello = (ROOT / "examples" / "hello" / "task.py").read_text(encoding="utf-8")
    assert _blocks("python")[0].strip() == hello.strip()


def _class_source(source: str, name: str) -> str:
    """The exact text of class ``name`` in ``source`` (comments inside included)."""
    import ast

    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            segment = ast.get_source_segment(source, node)
            assert segment is not None
            return segment
    raise AssertionError(f"no class {name} in the source")


def test_readme_settings_example_is_the_inventory_examples() -> None:
    """The README's InventorySettings is examples/inventory's, character for character."""
    inventory = (ROOT / "examples" / "inventory" / "task.py").read_text(encoding="utf-8")
    (block,) = [b for b in _blocks("python") if "class InventorySettings" in b]
    assert _class_source(block, "InventorySettings") == _class_source(
        inventory, "InventorySettings"
    )
    assert "`InventorySettings` is the settings class of `examples/inventory/task.py`" in README


def test_three_command_path_runs_as_written(tmp_path: Path) -> None:
    """The README's two commands after command 1, run by bash exactly as written in a
    directory whose .venv holds this keeper-task: the new task's first KeeperLogger line,
    exit 0, and `new` prints the very line to paste."""
    import os
    import subprocess

    from tests.support.projects import make_overlay_venv, venv_bin

    py = make_overlay_venv(tmp_path / ".venv", include_checkout=True)
    script = venv_bin(tmp_path / ".venv") / "keeper-task"
    script.write_text(
        f"#!{py}\nimport sys\nfrom keeper_task.cli import main\nsys.exit(main())\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEEPER_", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    env["TMPDIR"] = str(tmp_path)
    outputs = []
    for command in THREE_COMMANDS:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done)
    assert f"  {THREE_COMMANDS[1]}\n" in outputs[0].stdout
    lines = outputs[1].stdout.splitlines()
    first = next(ln for ln in lines if ln.startswith("[KeeperLogger]"))
    assert first == (
        "[KeeperLogger] Information tls.unverified_loopback task=DemoTask host=127.0.0.1"
    )
    assert f"`{first}`" in " ".join(README.split())  # the README quotes that very line
    assert "--- job demo-task: succeeded" in outputs[1].stdout
    # The task ran from its source with the .venv's Python, and the run says so.
    assert f"running {py} -m demo_task" in outputs[1].stderr
