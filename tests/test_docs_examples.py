"""Every Python example of the README and the docs runs as written (in order, one namespace per
file, in a fresh folder): an example that stops working fails the build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if examples(d)], ids=lambda p: p.name)
def test_the_python_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs_example__"}
    for i, code in enumerate(examples(doc)):
        exec(compile(code, f"{doc.name}, python example {i + 1}", "exec"), namespace)


def test_the_readme_shows_the_api():
    code = "\n".join(examples(ROOT / "README.md"))
    for verb in (
        "creditaudit.train(",
        "creditaudit.audit(",
        "creditaudit.tables(",
        "creditaudit.load(",
    ):
        assert verb in code, verb
