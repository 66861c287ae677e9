"""Every relative link and image in the user docs, the benchmarks' pages and their notes points at a file that
exists (URLs and in-page anchors are not followed; links inside code blocks are not links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"```.*?```", re.S)
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md", ROOT / "evaluation" / "README.md",
                *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").rglob("*.md")])


def _targets(page: Path) -> list[str]:
    text = CODE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in _targets(page) if not (page.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: missing {missing}"


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) ![gone](missing.png) [web](https://example.org) [anchor](#top)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert _targets(page) == ["page.md", "missing.png"]
