"""The science lives in the project: every `docs/science.md §N` the code, the tests and the docs cite
is a heading of that page, no other section sign is left unexplained in the code, and nothing points
to a document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCIENCE = ROOT / "docs" / "science.md"


def _sources() -> list[Path]:
    files = [
        p
        for d in ("src", "tests", "docs", "bench", "scripts")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".md")
    ]
    return files + [ROOT / "README.md"]


def _headings() -> set[str]:
    return {
        m.group(1)
        for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", SCIENCE.read_text(), flags=re.M)
    }


def test_every_cited_section_is_a_heading_of_the_science_reference():
    headings = _headings()
    assert {str(n) for n in range(1, 10)} <= headings
    cited = {}
    for path in _sources():
        for m in re.finditer(r"science\.md §(\d+(?:\.\d+)?)", path.read_text(errors="replace")):
            cited.setdefault(m.group(1), []).append(path.relative_to(ROOT).as_posix())
    assert cited, "the code cites the science reference somewhere"
    missing = {k: v for k, v in cited.items() if k not in headings}
    assert not missing, f"cited sections with no heading in docs/science.md: {missing}"


def test_no_section_sign_in_the_code_points_elsewhere():
    """In the code a section sign is the science reference's (`docs/science.md §N`) or the study
    paper's (`paper §N.M`), never a bare one that a reader cannot resolve."""
    bare = []
    for path in (ROOT / "src").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"§", line):
                before = line[: m.start()]
                if not (before.endswith("science.md ") or before.endswith("paper ")):
                    bare.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bare, "\n".join(bare)


def test_nothing_points_outside_the_repository():
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in _sources()
        if re.search(r"\bDESIGN\b|\.\./shared", p.read_text(errors="replace"))
    ]
    assert offenders == [p for p in offenders if p == "tests/test_docs.py"]
