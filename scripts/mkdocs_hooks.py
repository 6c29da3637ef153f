"""MkDocs hooks (mkdocs.yml).

- The repository's README is the site's home page, and CONTRIBUTING.md and CHANGELOG.md are pages of
  it. They live at the repository root, outside the docs folder, and link into it as
  ``docs/science.md`` and to one another as ``CHANGELOG.md``; on the site the same links read
  ``science.md`` and ``changelog.md``.
- The worked examples' generated pages (written by ``creditaudit tables`` and ``creditaudit
  inventory``, never edited by hand) are wide tables of numbers: they get the whole width (no table
  of contents beside them) and a class that keeps each cell on one line (docs/stylesheets/extra.css).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# the root's pages and their names on the site
ROOT_PAGES = {
    "README.md": "index.md",
    "CONTRIBUTING.md": "contributing.md",
    "CHANGELOG.md": "changelog.md",
}
GENERATED = {
    f"{example}/{page}"
    for example in ("example", "example-mnist1d", "example-mnist1d/vit_mini1d")
    for page in ("tables.md", "TRAINING_INVENTORY.md")
}


def home_page(readme: str) -> str:
    """A root page's Markdown with its relative links into ``docs/`` made relative to ``docs/``
    itself, and its links to the other root pages made links to their pages on the site."""
    text = re.sub(r"\]\(docs/", "](", readme)
    for name, page in ROOT_PAGES.items():
        text = re.sub(rf"\]\({re.escape(name)}([#)])", rf"]({page}\1", text)
    return text


def on_files(files, config):
    for name, page in ROOT_PAGES.items():
        text = home_page((ROOT / name).read_text(encoding="utf-8"))
        files.append(File.generated(config, page, content=text))
    return files


def on_serve(server, config, builder):
    for name in ROOT_PAGES:
        server.watch(str(ROOT / name))  # `mkdocs serve` rebuilds when a root page changes
    return server


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in GENERATED:
        page.meta.setdefault("hide", []).append("toc")
    return markdown


def on_page_content(html, page, config, files):
    if page.file.src_uri in GENERATED:
        return f'<div class="generated-tables">{html}</div>'
    return html
