"""MkDocs hooks (mkdocs.yml).

- The repository's README is the site's home page. It lives at the repository root, outside the docs
  folder, and links into it as ``docs/science.md``; as the site's ``index.md`` the same links read
  ``science.md``.
- The worked example's generated pages (written by ``creditaudit tables`` and ``creditaudit
  inventory``, never edited by hand) are wide tables of numbers: they get the whole width (no table
  of contents beside them) and a class that keeps each cell on one line (docs/stylesheets/extra.css).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

README = Path(__file__).resolve().parents[1] / "README.md"
GENERATED = {"example/tables.md", "example/TRAINING_INVENTORY.md"}


def home_page(readme: str) -> str:
    """The README's Markdown with its relative links into ``docs/`` made relative to ``docs/`` itself."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):
    files.append(
        File.generated(config, "index.md", content=home_page(README.read_text(encoding="utf-8")))
    )
    return files


def on_serve(server, config, builder):
    server.watch(str(README))  # `mkdocs serve` rebuilds when the README changes
    return server


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in GENERATED:
        page.meta.setdefault("hide", []).append("toc")
    return markdown


def on_page_content(html, page, config, files):
    if page.file.src_uri in GENERATED:
        return f'<div class="generated-tables">{html}</div>'
    return html
