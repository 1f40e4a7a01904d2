"""The README's and the docs' links lead somewhere: every relative link names a file that exists
and, with `#anchor`, a heading of that file (GitHub's anchors), so moving a section between
docs/benchmarks.md and docs/history.md cannot leave a dead link behind."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            found.add(anchor(line))
    return found


def test_anchor_follows_github():
    assert anchor("## Precision by hardware (`mixed_precision: auto`)") == (
        "precision-by-hardware-mixed_precision-auto"
    )
    assert anchor("### Where a rollout's time went, and what changed") == (
        "where-a-rollouts-time-went-and-what-changed"
    )


def test_every_relative_link_and_anchor_resolves():
    dead = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, name = target.partition("#")
            dest = page.parent / path if path else page
            if not dest.exists() or (name and dest.suffix == ".md" and name not in anchors(dest)):
                dead.append(f"{page.relative_to(ROOT)}: {target}")
    assert not dead
