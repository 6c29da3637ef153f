"""Tables for a terminal: the few figures that decide a verdict, compact, in 80 columns.

The Markdown and HTML reports keep every figure; a terminal gets the verdict and the claim first,
then accuracy, D3, deep cos, ‖h_L‖, ‖g_L‖ and which detectors fired when, as means with a compact
± (``.851±.002``, ``2.7e9±1e9``). Number columns never wrap, so no figure is ever split across
lines; only words (rule names, verdicts, settings) may wrap when the terminal is narrow.
"""
from __future__ import annotations

import math
import re

from rich.table import Table as RichTable

from creditaudit.diagnostics.verdict import NOT_EVALUATED
from creditaudit.reports.audit import Audit, RuleAudit

NUMBER = re.compile(r"^[+\-−]?(\d|\.\d)")
SHORT = {"test acc": "acc", "deep cos": "cos", "D3 (pp)": "D3 pp", "epochs": "ep"}  # terminal column titles


def compact(stat: tuple[float, float, int], *, log: bool = False, signed: bool = False, digits: int = 3) -> str:
    """Mean ± std in few characters: ``.851±.002``, ``+1.5±0.4``, ``2.7e9±1e9``; ``–`` when absent."""
    mean, std, n = stat
    if n == 0 or not math.isfinite(mean):
        return "–"
    has_std = n > 1 and math.isfinite(std)
    if log:
        body = _exp(mean) + (f"±{_exp(std, 0)}" if has_std else "")
    elif signed:
        body = f"{mean:+.1f}" + (f"±{std:.1f}" if has_std else "")
    else:
        body = _frac(mean, digits) + (f"±{_frac(std, digits)}" if has_std else "")
    return body


def _frac(x: float, digits: int = 3) -> str:
    if x != 0 and abs(x) < 10 ** -digits:
        return _exp(x, 0)  # a spread below the shown digits: 3e-4
    text = f"{x:.{digits}f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def _exp(x: float, digits: int = 1) -> str:
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fired(ra: RuleAudit) -> str:
    """``D1 3/3@1 D2 2/3@4``: detectors that fired, in how many seeds, first epoch among them."""
    parts = []
    for d in ("D1", "D2", "D3"):
        epochs = [e for e in ra.fire_epochs(d) if e is not None]
        if epochs:
            parts.append(f"{d} {len(epochs)}/{ra.verdict.n}@{min(epochs)}")
    return " ".join(parts) or "–"


def verdict_text(label: str) -> str:
    """``FAIL(D1 3/3 + D2 3/3)`` -> ``FAIL D1 D2`` (the counts are in the fired column); the
    claim in parentheses, when a table carries it, is kept."""
    if label.startswith("FAIL"):
        verdict, _, claim = label.partition(") (")
        return "FAIL " + " ".join(re.findall(r"D\d", verdict)) + (f" ({claim}" if claim else "")
    return label


def colour(label: str) -> str:
    return "green" if label == "PASS" else ("yellow" if label.startswith(NOT_EVALUATED) else "red")


def audit_table(audit: Audit, title: str) -> RichTable:
    """One row per rule: verdict, claim, n, acc, D3 pp, deep cos, ‖h_L‖, ‖g_L‖, fired."""
    ns = {ra.verdict.n for ra in audit.rules}
    same_n = len(ns) == 1  # then n goes to the title, and the figures get its room
    rows = [[ra.rule, verdict_text(ra.verdict.label), ra.verdict.claim, *([] if same_n else [str(ra.verdict.n)]),
             compact(ra.stats["test_acc"]), compact(ra.stats["depth_pp"], signed=True), compact(ra.stats["deep_cos"], digits=2),
             compact(_mean_only(ra.stats["hL_norm"]), log=True), compact(_mean_only(ra.stats["gL_norm"]), log=True), fired(ra)]
            for ra in audit.rules]
    header = ["rule", "verdict", "claim", *([] if same_n else ["n"]), "acc", "D3 pp", "cos", "‖h_L‖", "‖g_L‖", "fired@ep"]
    numeric = [h not in ("rule", "verdict", "claim", "fired@ep") for h in header]
    shown = [[r[0], f"[{colour(ra.verdict.label)}]{r[1]}[/]", *r[2:]] for r, ra in zip(rows, audit.rules)]
    if same_n and ns:
        title += f" (n={ns.pop()} seeds each; mean±std)"
    return _table(title, header, rows, numeric, shown=shown)


def _mean_only(stat: tuple[float, float, int]) -> tuple[float, float, int]:
    """‖h_L‖ and ‖g_L‖ span orders of magnitude: the terminal shows their mean (the reports the std)."""
    return stat[0], math.nan, stat[2]


def _table(title: str, header: list[str], rows: list[list[str]], numeric: list[bool],
           shown: list[list[str]] | None = None) -> RichTable:
    """Number columns never wrap; a text column is never narrower than its longest word (up to 8;
    12 for the claim),
    so words break only at spaces when the terminal is narrow. ``shown``: the cells with markup."""
    table = RichTable(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold", padding=(0, 1, 0, 0))
    for j, h in enumerate(SHORT.get(h, h) for h in header):
        if numeric[j]:
            table.add_column(h, no_wrap=True, justify="right")
        else:
            words = [w for r in rows for w in r[j].split()] + h.split()
            table.add_column(h, overflow="fold", min_width=min(max((len(w) for w in words), default=1), 12 if h == "claim" else 8))
    for r in shown or rows:
        table.add_row(*r)
    return table


def plain(note: str) -> str:
    """A report note for a terminal: the Markdown markers dropped."""
    return note.replace("**", "").replace("`", "")


def study_table(title: str, header: list[str], rows: list[list[str]], keep: list[str] | None = None) -> RichTable:
    """A study table for a terminal: the ``keep`` columns (all when None), cells compacted
    (``0.851 ± 0.002 (n=3)`` -> ``0.851±0.002``), number columns never wrapped."""
    idx = [i for i, h in enumerate(header) if keep is None or h in keep]
    cells = [[_study_cell(r[i], header[i]) for i in idx] for r in rows]
    numeric = [bool(cells) and all(NUMBER.match(c[j]) or c[j] in ("–", "") for c in cells) for j in range(len(idx))]
    return _table(title, [header[i] for i in idx], cells, numeric)


def _study_cell(text: str, column: str) -> str:
    if column == "verdict":
        return verdict_text(text)
    return _compact_cell(text, pp="D3" in column, mean_only="‖" in column)


CELL = re.compile(r"^([-+]?[\d.]+(?:e[-+]?\d+)?)(?: ± ([\d.]+(?:e[-+]?\d+)?))? \(n=(\d+)\)$")


def _compact_cell(text: str, pp: bool = False, mean_only: bool = False) -> str:
    """A report cell ``mean ± std (n=k)`` (or ``mean (n=1)``) in :func:`compact`'s form (``pp``:
    percentage points, signed; ``mean_only``: a norm, without its std); other cells as they are."""
    m = CELL.match(text)
    if not m:
        return text
    mean, std, n = float(m.group(1)), float(m.group(2)) if m.group(2) else math.nan, int(m.group(3))
    return compact((mean, math.nan if mean_only else std, n), log="e" in m.group(1) and not pp, signed=pp)
