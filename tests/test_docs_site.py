"""The documentation site (mkdocs.yml) builds strictly: a broken link, anchor or API reference, or a
page the nav forgets, fails the build and so this test. `make docs` runs the same build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail(
            "mkdocs is not installed: the test extra installs it (scripts/setup.sh test, or pip install -e '.[test]')"
        )
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr

    home = (site / "index.html").read_text()
    assert 'href="science.html"' in home  # the README's docs/science.md, as a link within the site
    assert 'href="contributing.html"' in home  # and its CONTRIBUTING.md, a page of the site too
    contributing = (site / "contributing.html").read_text()
    assert 'href="changelog.html"' in contributing and (site / "changelog.html").exists()
    api = (site / "api.html").read_text()
    for name in (
        "creditaudit.results.load",
        "creditaudit.rules.base.Rule",
        "creditaudit.models.base.architecture",
        "creditaudit.config.TrainConfig.epochs",
        "creditaudit.registry.Registry",
    ):
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
    assert not re.search(r":(class|func|meth|data):<code>", api), (
        "a Sphinx role was left as text in the API reference"
    )
