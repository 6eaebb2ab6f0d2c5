"""README.md stays a page a newcomer reads in minutes: at most README_LIMIT bytes; the detail lives in docs/.

Its links to files of the repository (and those of the docs/ pages it sends readers to) must resolve, so that what
moved out of the README can still be reached from it.
"""
from __future__ import annotations

import glob
import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
README_LIMIT = 12500  # bytes (12.5 kB)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_stays_under_its_size_limit():
    size = os.path.getsize(README)
    assert size <= README_LIMIT, (f"README.md is {size:,} bytes, over its limit of {README_LIMIT:,} "
                                  f"({size - README_LIMIT:,} too many): move the detail to a page in docs/ and link it")


def local_links(path: str):
    """``(target path, anchor)`` of each relative Markdown link of ``path`` (web links skipped; ``#anchor`` alone is
    ``path`` itself)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        file, _, anchor = target.partition("#")
        yield (os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path), anchor


def heading_anchors(path: str) -> set:
    """GitHub's anchors of the Markdown headings of ``path``."""
    anchors = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
            if m:
                slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
                anchors.add(slug)
    return anchors


def test_links_of_the_readme_and_docs_resolve():
    broken = []
    pages = [README] + sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
    for page in pages:
        for target, anchor in local_links(page):
            where = f"{os.path.relpath(page, REPO_ROOT)} -> {os.path.relpath(target, REPO_ROOT)}"
            if not os.path.exists(target):
                broken.append(f"{where}: no such file")
            elif anchor and target.endswith(".md") and anchor not in heading_anchors(target):
                broken.append(f"{where}#{anchor}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)
