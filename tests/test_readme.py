"""The README's and the docs pages' Python examples run as written, and their relative links resolve.

Every ```python block of README.md and docs/*.md runs from a temporary folder (```py marks
GPU-only snippets, which are not run). Every relative link or image in those pages must name an
existing file, and a `#fragment` a heading of the page it points at.
"""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


EXAMPLES = [(_name(page), index, code)
            for page in PAGES
            for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


@pytest.mark.parametrize("name, index, code",
                         [pytest.param(*example, id=f"{example[0]}-{example[1] + 1}") for example in EXAMPLES])
def test_docs_example_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name} example {index + 1}", "exec"), {"__name__": "readme_example"})


def _without_fences(text: str) -> str:
    return re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)


def _prose(text: str) -> str:
    """The page without its fenced code blocks and inline code spans, where brackets are not links."""
    return re.sub(r"(`+).+?\1", "", _without_fences(text), flags=re.S)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _without_fences(page.read_text()), flags=re.M):
        slug = "".join(c for c in heading.lower().replace("`", "")
                       if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINKS = list(dict.fromkeys(
    (_name(page), target)
    for page in PAGES
    for target in LINK.findall(_prose(page.read_text()))
    if not re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I)))  # no scheme: relative


def test_pages_have_links():
    assert any(name == "README.md" for name, _ in LINKS)


@pytest.mark.parametrize("name, target", [pytest.param(*link, id=f"{link[0]}->{link[1]}") for link in LINKS])
def test_docs_link_resolves(name, target):
    page = ROOT / name
    path, _, fragment = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{name}: link to {target}: {linked} does not exist"
    if fragment and linked.suffix == ".md":
        assert fragment.lower() in _anchors(linked), f"{name}: link to {target}: no such heading in {linked.name}"
