"""The README's set-up commands are the ones CI runs, so they cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    setup = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _shell_blocks(setup)
    assert len(blocks) == 2, blocks
    install, test = blocks
    assert "pip install" in install and "robuq " in install
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    setup = ROOT.joinpath("README.md").read_text().split("## Set up", 1)[1]
    test_command = _shell_blocks(setup)[1]
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} is not a line of .ci/run"


def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
    text = ROOT.joinpath("README.md").read_text().split("## In Python", 1)[1]
    example = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "t4-w158a3.safetensors").is_file() and (tmp_path / "t4-w158a3.robuq.safetensors").is_file()
