"""The documentation stands on its own: every relative link in README.md and docs/ points at a file of
the repository (and at a heading that exists), and the docstrings' "docs/semantics.md §N" citations
name sections the page has."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: pathlib.Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def test_semantics_citations_name_existing_sections():
    sections = set()
    for line in (ROOT / "docs" / "semantics.md").read_text().splitlines():
        match = re.match(r"#+ (\d+(?:\.\d+)?)\.? ", line)
        if match:
            sections.add(match.group(1))
    cited = set()
    for path in [*ROOT.glob("smoothce/**/*.py"), *ROOT.glob("csrc/**/*.[ch]*"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("bench/*.py")]:
        for match in re.finditer(r"docs/semantics\.md §(\d+(?:\.\d+)?)", path.read_text()):
            cited.add((match.group(1), path.name))
    assert cited, "no citation found: the pattern is stale"
    missing = sorted((number, name) for number, name in cited if number not in sections)
    assert not missing, missing
