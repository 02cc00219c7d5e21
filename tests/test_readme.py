"""The README's two commands exist, pin CPU torch first, and CI runs the test one."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _command_after(label: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    i = lines.index(label)
    j = next(k for k in range(i, len(lines)) if lines[k].startswith("```bash"))
    return lines[j + 1]


def test_two_commands_install_cpu_torch_first():
    main = _command_after("Run the main job (render a morph video with the embedded default model):")
    test = _command_after("Run the test suite:")
    for cmd in (main, test):
        parts = cmd.split(" && ")
        assert parts[1] == ".venv/bin/pip install torch==2.13.0", cmd
    assert "latentlab morph" in main
    assert "pytest" in test
    assert "Run the test suite:" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_python_examples_in_the_readme_run():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - running the README is the point
