"""The README's promises: its code compiles, its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_a_pitch_and_exactly_two_commands() -> None:
    """Title, one-sentence pitch, then two one-line bash commands before any other block."""
    head = README.split("\n## ", 1)[0]
    fenced = re.findall(r"```(\w*)\n(.*?)```", head, flags=re.S)
    assert [lang for lang, _ in fenced] == ["bash", "bash"]
    assert all(len(body.strip().splitlines()) == 1 for _, body in fenced)
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
