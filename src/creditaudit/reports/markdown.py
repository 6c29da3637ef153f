"""Markdown table rows, shared by every report (audit, study tables, inventory, exploitability)."""

from __future__ import annotations


def md_row(cells: list[str]) -> str:
    """One table row; a '|' inside a cell is escaped so the row keeps its columns."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Header, rule and rows, one line each."""
    return [md_row(header), md_row(["---"] * len(header))] + [md_row(r) for r in rows]
