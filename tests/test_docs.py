"""README.md is the landing page and docs/ the manual: no section lost in the move, no dead link."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 200

# The headings of README.md when it was the whole manual (git show c8116c0:README.md), generated once.
# Each must live on as a heading, at any level, in README.md or a page of docs/ (the tools' headings name
# them as dali-ba <command> since the old python -m names were deprecated).
OLD_README_HEADINGS = [
    "dali-ba",
    "Two commands on a fresh machine",
    "Training: `python -m dali_ba.train`",
    "Where the time goes: per-step timing",
    "Profiling step throughput: `dali-ba profile`",
    "TensorBoard",
    "Plots: `dali-ba plot`",
    "The paper at small scale: `make paper`",
    "Checkpoints, preemption and resume",
    "Broken files",
    "Checking the data first: `dali-ba check-data`",
    "Tar shards for parallel file systems: `dali-ba shards`",
    "Recipes",
    "Augmentations",
    "Running on a cluster",
    "Loader API",
    "CPU and GPU",
    "Installing on a cluster",
    "Layout",
    "Measured",
]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def headings(path: Path) -> list[str]:
    return [found.group(2) for line in prose_lines(path) if (found := HEADING.match(line))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces
    as dashes, a repeated one numbered."""
    seen: dict[str, int] = {}
    for text in headings(path):
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(path: Path) -> list[str]:
    """Link targets in the prose of a markdown file (inline code left out)."""
    return [target for line in prose_lines(path) for target in LINK.findall(CODE_SPAN.sub("", line))]


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it points to, anchor) for every link that is not a URL."""
    found = []
    for target in links(path):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        where, _, anchor = target.partition("#")
        found.append((target, (path.parent / where).resolve() if where else path, anchor))
    return found


def test_the_manual_moved_to_docs():
    assert README.is_file()
    assert len(DOCS) >= 10, [page.name for page in DOCS]


def test_every_old_heading_lives_on():
    now = {text for page in PAGES for text in headings(page)}
    lost = [text for text in OLD_README_HEADINGS if text not in now]
    assert not lost, f"headings of the old README found nowhere in README.md or docs/*.md: {lost}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for _, target, _ in relative_links(README)}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert not unlinked, f"docs pages README.md does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_points_to_a_file(page):
    dead = [written for written, target, _ in relative_links(page) if not target.exists()]
    assert not dead, f"{page.relative_to(REPO)}: links to nothing: {dead}"
    missing = [
        written
        for written, target, anchor in relative_links(page)
        if anchor and target.suffix == ".md" and target.is_file() and anchor not in anchors(target)
    ]
    assert not missing, f"{page.relative_to(REPO)}: links to a heading that is not there: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_every_docs_page_starts_with_one_title(page):
    levels = [len(found.group(1)) for line in prose_lines(page) if (found := HEADING.match(line))]
    assert page.read_text().startswith("# ") and levels.count(1) == 1, f"{page.name}: one '# ' title, first"


def test_the_readme_stays_a_landing_page():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {MAX_README_LINES})"


def test_the_package_index_description_has_no_link_into_the_tree():
    """setup.cfg's long_description is what a package index renders: a relative link there leads nowhere."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    written = config["metadata"]["long_description"]
    assert written.startswith("file: "), written
    page = REPO / written.removeprefix("file: ").strip()
    assert page.is_file() and page.read_text().startswith("# ")
    links = re.findall(r"\]\(([^)]+)\)", page.read_text())
    assert all(link.startswith(("https://", "http://", "#")) for link in links), links
