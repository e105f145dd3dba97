"""The documents stay navigable: the README links every document under docs/, every relative
link in the Markdown files leads to a file that exists, and no text refers to issue numbers (a
reader must not need the tracker to follow the code or the docs)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# [text](target#anchor) outside code: (target, anchor), either may be empty.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]*)(?:#([^)\s]*))?\)")
HEADING = re.compile(r"^#+ (.*)$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# "issue 5", "issues #12", "(#981)", "damocles #981"; not a child name such as window_post#10.
ISSUE_REF = re.compile(r"(?i)\bissues? #?\d|(?:^|[\s(\[])#\d{2,}\b", re.MULTILINE)
TEXT_SUFFIXES = {".md", ".py", ".toml", ".example", ".c", ".h", ".cfg", ".txt", ".in"}


def _anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes."""
    text = FENCE.sub("", doc.read_text())
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in HEADING.findall(text)
    }


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "examples").glob("*/README.md"))
    files.append(ROOT / "native" / "README.md")
    return [f for f in files if f.is_file()]


def _source_files() -> list[Path]:
    if (ROOT / ".git").exists():
        try:
            listed = subprocess.run(
                ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.split()
        except (OSError, subprocess.CalledProcessError):
            listed = None
        if listed is not None:
            return [ROOT / f for f in listed if Path(f).suffix in TEXT_SUFFIXES]
    return [  # an sdist: its files, without the build's
        p
        for p in ROOT.rglob("*")
        if p.suffix in TEXT_SUFFIXES and p.is_file() and ".venv" not in p.parts
        and not any(part.endswith(".egg-info") for part in p.parts)
    ]  # fmt: skip


def test_the_readme_links_every_document_under_docs():
    readme = (ROOT / "README.md").read_text()
    linked = {Path(target) for target, _ in LINK.findall(FENCE.sub("", readme))}
    missing = [
        str(doc.relative_to(ROOT))
        for doc in sorted((ROOT / "docs").glob("*.md"))
        if doc.relative_to(ROOT) not in linked
    ]
    assert missing == [], f"README.md does not link {missing}"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc: Path):
    broken = []
    for target, anchor in LINK.findall(FENCE.sub("", doc.read_text())):
        if "://" in target or target.startswith("mailto:"):
            continue
        place = doc.parent / target if target else doc
        if not place.exists():
            broken.append(target)
        elif anchor and place.suffix == ".md" and anchor not in _anchors(place):
            broken.append(f"{target}#{anchor}")
    assert broken == [], f"{doc.relative_to(ROOT)} links to what does not exist: {broken}"


def test_no_text_refers_to_issue_numbers():
    found = []
    for path in _source_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ISSUE_REF.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == [], "say what the issue asked for instead:\n" + "\n".join(found)
