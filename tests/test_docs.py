"""README.md and docs/: the front door stays short, and every relative link and anchor resolves.

Pure text processing (no model, no torch): for each Markdown link ``[text](target)`` in README.md
and docs/*.md whose target has no URL scheme (http:, https:, mailto: ...), outside fenced code
blocks and inline code, the target must exist relative to the linking file, and a ``#anchor``
must name a heading of the target .md file (or of the same file) under GitHub's slug rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# an inline code span: a run of backticks, then anything but a blank line, then the same run
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
# [text](target) or ![alt](target), an optional "title" after the target
_LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")  # optional closing #s
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def blank_fences(text: str) -> str:
    """The text with every line of a fenced code block blanked (line count kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            line = ""
        elif fence is not None:
            closing = line.strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                fence = None
            line = ""
        out.append(line)
    return "\n".join(out)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans: where links are links."""
    return _CODE_SPAN.sub("", blank_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lowercase, every character that is not
    a letter, digit, underscore, hyphen or space removed (unicode letters kept), spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in blank_fences(text).split("\n"):  # a heading's `code` is part of its slug
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[str]:
    return [m.group(2) for m in _LINK.finditer(prose(text))]


def broken_links(path: Path) -> list[str]:
    """'target: why' for each relative link of a Markdown file that does not resolve."""
    bad = []
    for target in links(path.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target):
            continue
        where, _, anchor = target.partition("#")
        dest = (path.parent / unquote(where) if where else path).resolve()
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        if not anchor:
            continue
        anchor = unquote(anchor)
        if dest.suffix.lower() == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{target}: no heading of {dest.relative_to(ROOT)} has the anchor #{anchor}")
        elif not re.fullmatch(r"L\d+(-L\d+)?", anchor):
            bad.append(f"{target}: #{anchor} into a file that is not Markdown")
    return bad


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Locality and query formats (the defaults)", "locality-and-query-formats-the-defaults"),
        ("ρ sweep and number of examples", "ρ-sweep-and-number-of-examples"),
        ("Run it in llama.cpp", "run-it-in-llamacpp"),
        ("The instruction's cost, paid once", "the-instructions-cost-paid-once"),
        ("The cost of locality (the broad texts' moments)", "the-cost-of-locality-the-broad-texts-moments"),
        ("Side effects beside the baselines (the fair locality table)",
         "side-effects-beside-the-baselines-the-fair-locality-table"),
        ("Saved checkpoint vs in-process patch", "saved-checkpoint-vs-in-process-patch"),
        ("`report.json` and snake_case", "reportjson-and-snake_case"),
    ],
)
def test_slug(heading, expected):
    assert slug(heading) == expected


def test_duplicate_headings_are_numbered():
    text = "# A\n## Notes\n```\n## Notes\n```\n## Notes\n### notes\n"
    assert anchors(text) == {"a", "notes", "notes-1", "notes-2"}


def test_links_in_code_are_ignored():
    text = (
        "[a](one.md) `[b](two.md)` and ``[c](three.md)``\n"
        "```\n[d](four.md)\n```\n"
        "`a span over\n[e](five.md) a line break` ![f](six.png \"title\")\n"
    )
    assert links(text) == ["one.md", "six.png"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_docs_are_linked_and_reachable():
    """Every docs page is linked from README.md and from docs/README.md (the index); the link
    test above has something to check."""
    readme_targets = {unquote(t.partition("#")[0]) for t in links(README.read_text(encoding="utf-8"))}
    index = DOCS / "README.md"
    index_targets = {unquote(t.partition("#")[0]) for t in links(index.read_text(encoding="utf-8"))}
    for page in sorted(DOCS.glob("*.md")):
        if page == index:
            continue
        assert f"docs/{page.name}" in readme_targets, f"README.md does not link docs/{page.name}"
        assert page.name in index_targets, f"docs/README.md does not link {page.name}"
    assert sum(len(links(p.read_text(encoding="utf-8"))) for p in doc_files()) >= 50


def test_the_readme_recipe_in_full_is_the_shipped_file():
    """README's "A recipe in full" shows recipes/translate-en-fr.yaml as shipped: the first YAML
    block under that heading is the file, byte for byte."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## A recipe in full"):]
    shown = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert shown == (ROOT / "recipes" / "translate-en-fr.yaml").read_text(encoding="utf-8")


def test_the_map_names_every_module_of_the_package():
    """docs/map.md lists every module of transmute_cli/ (a newcomer finds each from it), and no
    module is over 400 lines."""
    text = (DOCS / "map.md").read_text(encoding="utf-8")
    package = ROOT / "transmute_cli"
    modules = [p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) > 30
    missing = [str(p.relative_to(package)) for p in modules if p.name not in text]
    assert not missing
    long = [f"{p.relative_to(package)}: {len(p.read_text(encoding='utf-8').splitlines())}" for p in modules
            if len(p.read_text(encoding="utf-8").splitlines()) > 400]
    assert not long
