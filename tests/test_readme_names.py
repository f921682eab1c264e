"""What the README and docs/ promise exists: every `robuq.…` name, every `robuq …` command, every relative link."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

import robuq
from robuq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}


def test_there_are_docs_and_the_readme_stays_short():
    readme = TEXT["README.md"]
    assert len(TEXT) > 4 and len(readme.splitlines()) <= 200 and len(readme.split()) <= 2000


def test_every_top_level_api_name_in_the_readme_is_public():
    names = set(re.findall(r"(?<![\w./-])robuq\.([A-Za-z_][A-Za-z0-9_]*)\b(?![/.])", TEXT["README.md"]))
    packages = {n for n in names if importlib.util.find_spec(f"robuq.{n}") is not None}  # `-m robuq.cli` and the like
    missing = sorted(n for n in names - packages if not hasattr(robuq, n) or n not in robuq.__all__)
    assert not missing, f"the README promises robuq.{missing} but robuq does not export them"


def _resolves(dotted: str) -> bool:
    """Whether ``robuq.a.b.c`` names a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


@pytest.mark.parametrize("page", sorted(TEXT))
def test_every_dotted_robuq_name_exists(page):
    # Names in code style, not file paths (robuq/…) or file names (….robuq.safetensors).
    names = set(re.findall(r"(?<![\w/-])(robuq(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?![\w/])", TEXT[page]))
    names = {n.rstrip(".") for n in names if not n.endswith((".safetensors", ".py"))}
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{page} names {missing}, which do not exist"


def _commands() -> list[tuple[str, list[str]]]:
    found = set()
    for page, text in TEXT.items():
        for match in re.finditer(r"`robuq ((?:[a-z][a-z0-9-]*)(?: (?:[a-z][a-z0-9-]*))?)", text):
            found.add((page, match.group(1)))
    return [(page, command.split()) for page, command in sorted(found)]


@pytest.mark.parametrize("page, command", _commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_command_named_exists(page, command):
    parser = build_parser()
    try:
        parser.parse_args([*command, "--help"])
    except SystemExit as exit:
        assert exit.code == 0, f"{page}: `robuq {' '.join(command)}` is not a command"


@pytest.mark.parametrize("page", sorted(TEXT))
def test_every_relative_link_resolves(page):
    folder = (ROOT / page).parent
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT[page])
    broken = [
        link
        for link in links
        if not link.startswith(("http://", "https://", "#", "mailto:"))
        and not (folder / link.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{page} links to {broken}, which do not exist"


def test_no_page_cites_a_file_outside_the_repository():
    """Docs, results and scripts say what they need in their own words: no recipe notes or issue numbers
    from outside the repository."""
    written = [*PAGES, *(ROOT / "results").rglob("*.md"), *(ROOT / "scripts").glob("*")]
    for page in written:
        text = page.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, page
        assert not re.search(r"\bissue \d+\b", text), page
