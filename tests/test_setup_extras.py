"""scripts/setup.sh treats the `test` extra as every extra: a venv set up for the tests is never
set up again for `make audit`, `make docs` or `make reports`. That holds while `test` lists them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_test_extra_holds_every_other_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    held = set()
    for req in extras["test"]:
        m = re.fullmatch(r"creditaudit\[([\w,]+)\]", req.replace(" ", ""))
        if m:
            held |= set(m.group(1).split(","))
    assert held == set(extras) - {"test"}, (
        f"the test extra lacks {sorted(set(extras) - {'test'} - held)}"
    )
