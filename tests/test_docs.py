"""The documentation: the README stays short, and every relative link in the Markdown pages resolves.

A link resolves when its file exists and, if it names an anchor (`page.md#section`), that page has a heading
whose GitHub anchor is that name. Links inside code are not links; http(s) and mailto links are not checked
(the suite runs offline).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def without_code(text):
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link renders as its text
    text = text.replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path):
    """Every anchor a page defines, with GitHub's -1, -2 suffixes for repeated headings."""
    seen, found = {}, set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path):
    """(target, reason) for each relative link of a Markdown page that does not resolve."""
    text = without_code(path.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append((target, f"no file {dest}"))
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append((target, f"no heading with anchor #{anchor} in {dest.name}"))
    return bad


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a docs/ page (limit {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(f"({target}): {why}" for target, why in bad)


def test_the_checker_finds_what_is_broken(tmp_path):
    """The link check itself: a planted missing file and a planted missing anchor are found; code is not read."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## The monitor (`adam_cxr/monitor.py`)\n\n## Repeat\n\n## Repeat\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#the-monitor-adam_cxrmonitorpy) [ok](docs/a.md#repeat-1) [ok](#top)\n"
        "![fig](docs/a.md) [web](https://example.org/missing.md) `[code](nowhere.md)`\n\n"
        "```\n[fenced](nowhere.md)\n```\n\n"
        "[missing file](docs/b.md) [missing anchor](docs/a.md#no-such-section) [self](#nowhere)\n"
        "[ref]: docs/c.md\n")
    assert [t for t, _ in broken_links(page)] == ["docs/b.md", "docs/a.md#no-such-section", "#nowhere", "docs/c.md"]


@pytest.mark.parametrize("heading, anchor", [
    ("Quick start", "quick-start"),
    ("The method, in `adam.py`", "the-method-in-adampy"),
    ("Reading the demo's output", "reading-the-demos-output"),
    ("Shuffle BN in one process (`--bn-groups G`)", "shuffle-bn-in-one-process---bn-groups-g"),
    ("The loss op on a CPU, one thread", "the-loss-op-on-a-cpu-one-thread"),
    ("§4. Encoders, memory bank and loss", "4-encoders-memory-bank-and-loss"),
    ("See [the docs](docs/x.md) first", "see-the-docs-first"),
])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor
