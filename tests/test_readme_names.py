"""Every robuq API name and every `robuq …` command the README shows exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import robuq
from robuq.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_api_name_in_the_readme_is_public():
    names = set(re.findall(r"(?<![\w./-])robuq\.([A-Za-z_][A-Za-z0-9_]*)\b(?![/.])", README))  # not file names
    modules = {"quantize", "kernels", "deploy", "quant", "core", "io", "sample", "train", "ampn", "eval", "cli", "models",
               "diffusion", "data"}
    missing = sorted(n for n in names - modules if not hasattr(robuq, n) or n not in robuq.__all__)
    assert not missing, f"the README promises robuq.{missing} but robuq does not export them"


def _commands() -> list[list[str]]:
    found = set()
    for match in re.finditer(r"`robuq ((?:[a-z][a-z-]*)(?: (?:[a-z][a-z-]*))?)", README):
        found.add(tuple(match.group(1).split()))
    return [list(c) for c in sorted(found)]


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_in_the_readme_exists(command):
    parser = build_parser()
    try:
        parser.parse_args([*command, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, f"`robuq {' '.join(command)}` is not a command"
