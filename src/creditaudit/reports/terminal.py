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
SHORT = {
    "test acc": "acc",
    "deep cos": "cos",
    "D3 (pp)": "D3 pp",
    "epochs": "ep",
}  # terminal column titles


def compact(
    stat: tuple[float, float, int], *, log: bool = False, signed: bool = False, digits: int = 3
) -> str:
    """Mean ± std in few characters: ``.851±.002``, ``+1.5±0.4``, ``2.7e9±1e9``; ``–`` when absent."""
    mean, std, n = stat
    if n == 0 or not math.isfinite(mean):
        return "–"
    has_std = n > 1 and math.isfinite(std)
    if log:
        body = _exp(mean) + (f"±{_exp(std, 0)}" if has_std else "")
    elif signed:
        body = f"{mean:+.1f}" + (f"±{std:.1f}" if has_std else "")
    else:  # a spread that is float rounding of the mean (cos 1.000 ± 1e-16) is none
        spread = (
            "0" if has_std and std <= 1e-9 * abs(mean) else _frac(std, digits) if has_std else ""
        )
        body = _frac(mean, digits) + (f"±{spread}" if has_std else "")
    return body


def _frac(x: float, digits: int = 3) -> str:
    if x != 0 and abs(x) < 10**-digits:
        return _exp(x, 0)  # a spread below the shown digits: 3e-4
    text = f"{x:.{digits}f}"
    return text.replace("0.", ".", 1) if text.startswith(("0.", "-0.")) else text


def _exp(x: float, digits: int = 1) -> str:
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fired(ra: RuleAudit) -> str:
    """``D1@1 D2@4``: the first epoch at which each detector that fired did, over the seeds in which
    it fired (how many those are, the verdict says)."""
    parts = []
    for d in ("D1", "D2", "D3"):
        epochs = [e for e in ra.fire_epochs(d) if e is not None]
        if epochs:
            parts.append(f"{d}@{min(epochs)}")
    return " ".join(parts) or "–"


def colour(label: str) -> str:
    return "green" if label == "PASS" else ("yellow" if label.startswith(NOT_EVALUATED) else "red")


def audit_table(audit: Audit, title: str) -> RichTable:
    """One row per rule: verdict, claim, n, acc, D3 pp, deep cos, ‖h_L‖, ‖g_L‖, fired."""
    ns = {ra.verdict.n for ra in audit.rules}
    same_n = len(ns) == 1  # then n goes to the title, and the figures get its room
    rows = [
        [
            ra.rule,
            ra.verdict.label,
            ra.verdict.claim,
            *([] if same_n else [str(ra.verdict.n)]),
            compact(ra.stats["test_acc"]),
            compact(ra.stats["depth_pp"], signed=True),
            compact(ra.stats["deep_cos"], digits=2),
            compact(_mean_only(ra.stats["hL_norm"]), log=True),
            compact(_mean_only(ra.stats["gL_norm"]), log=True),
            fired(ra),
        ]
        for ra in audit.rules
    ]
    header = [
        "rule",
        "verdict",
        "claim",
        *([] if same_n else ["n"]),
        "acc",
        "D3 pp",
        "cos",
        "‖h_L‖",
        "‖g_L‖",
        "fired@ep",
    ]
    numeric = [h not in ("rule", "verdict", "claim", "fired@ep") for h in header]
    shown = [
        [r[0], f"[{colour(ra.verdict.label)}]{r[1]}[/]", *r[2:]]
        for r, ra in zip(rows, audit.rules, strict=True)
    ]
    if same_n and ns:
        title += f" (n={ns.pop()} seeds each; mean±std)"
    return _table(title, header, rows, numeric, shown=shown)


def audit_legend(audit: Audit) -> RichTable:
    """What :func:`audit_table`'s columns and words mean, with the thresholds in force: a few
    lines under the table (``--no-legend`` leaves it out)."""
    th, base = audit.thresholds, audit.baseline_rule
    rows = [
        (
            "verdict",
            (
                f"PASS, or FAIL(the detectors that fired, in how many seeds); {NOT_EVALUATED} (never PASS) "
                "where a seed has no frozen-blocks baseline"
            ),
        ),
        (
            "claim",
            (
                '"learns with genuine credit": trustworthy when every seed passes and none shows Mode 2; '
                "undetermined when nothing fired but D3 was not evaluated; else needs walk-back"
            ),
        ),
        *([("n", "seeds audited")] if len({ra.verdict.n for ra in audit.rules}) > 1 else []),
        ("acc", "final test accuracy"),
        (
            "D3 pp",
            f"acc minus the frozen-blocks baseline's ({base}), percentage points; D3 fires below {th.d3_pp:g}",
        ),
        (
            "cos",
            (
                f"deep cos: mean cosine between credit and the true gradient over blocks; Mode 2 when "
                f"|cos| < {th.mode2_cos:g} and D2 did not fire"
            ),
        ),
        (
            "‖h_L‖",
            f"norm of the last residual-stream state; D1 fires when some ‖h_l‖/‖h_(l-1)‖ > {th.d1_ratio:g}",
        ),
        ("‖g_L‖", f"norm of the reference gradient dCE/dh_L; D2 fires below {th.d2_norm:g}"),
        ("fired@ep", "each detector that fired, and the first epoch it did"),
    ]
    legend = RichTable.grid(padding=(0, 1, 0, 0))
    legend.add_column(style="bold", no_wrap=True)
    legend.add_column(style="dim")
    for name, text in rows:
        legend.add_row(name, text)
    return legend


def _mean_only(stat: tuple[float, float, int]) -> tuple[float, float, int]:
    """‖h_L‖ and ‖g_L‖ span orders of magnitude: the terminal shows their mean (the reports the std)."""
    return stat[0], math.nan, stat[2]


class _Table(RichTable):
    """rich's table, kept within the terminal wherever its text columns can still give way. rich
    shrinks the widest text columns evenly, then widens each back to its ``min_width``, which can
    leave the table wider than the terminal and its last column cut off (``D2@`` for ``D2@3``).
    The excess is taken here from the widest text columns: first down to their ``min_width``, then,
    where that is not enough, down to ``floors`` (column -> its longest word)."""

    floors: dict[int, int]

    def _calculate_column_widths(self, console, options) -> list[int]:
        widths = super()._calculate_column_widths(console, options)
        excess = sum(widths) - options.max_width
        for least in (
            lambda i, c: c.min_width or 1,
            lambda i, c: self.floors.get(i, c.min_width or 1),
        ):
            while excess > 0:
                room = [
                    i
                    for i, c in enumerate(self.columns)
                    if not c.no_wrap and widths[i] > least(i, c) + self._get_padding_width(i)
                ]
                if not room:
                    break
                widest = max(room, key=lambda i: widths[i])
                widths[widest] -= 1
                excess -= 1
        return widths


def _table(
    title: str,
    header: list[str],
    rows: list[list[str]],
    numeric: list[bool],
    shown: list[list[str]] | None = None,
) -> RichTable:
    """Number columns never wrap; a text column is never narrower than its longest word (up to 8;
    12 for the claim), so words break only at spaces when the terminal is narrow. A verdict keeps
    each detector with its count (``FAIL(D1 3/3`` / ``+ D2 3/3)``) while the terminal allows.
    ``shown``: the cells with markup."""
    table = _Table(
        title=title,
        title_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold",
        padding=(0, 1, 0, 0),
    )
    table.floors = {}
    for j, h in enumerate(SHORT.get(h, h) for h in header):
        if numeric[j]:
            table.add_column(h, no_wrap=True, justify="right")
            continue
        words = [w for r in rows for w in r[j].split()] + h.split()
        floor = min(max((len(w) for w in words), default=1), 12 if h == "claim" else 8)
        if h == "verdict":  # "FAIL(D1 3/3 + D2 3/3)" in chunks "FAIL(D1 3/3", "+ D2 3/3)"
            chunks = [c for r in rows for c in r[j].replace(" + ", " \n+ ").split(" \n")]
            table.floors[j] = floor
            floor = max(floor, min(max((len(c) for c in chunks), default=1), 14))
        table.add_column(h, overflow="fold", min_width=floor)
    for r in shown or rows:
        table.add_row(*r)
    return table


def plain(note: str) -> str:
    """A report note for a terminal: the Markdown markers dropped."""
    return note.replace("**", "").replace("`", "")


def study_table(
    title: str, header: list[str], rows: list[list[str]], keep: list[str] | None = None
) -> RichTable:
    """A study table for a terminal: the ``keep`` columns (all when None), cells compacted
    (``0.851 ± 0.002 (n=3)`` -> ``0.851±0.002``), number columns never wrapped."""
    idx = [i for i, h in enumerate(header) if keep is None or h in keep]
    cells = [[_study_cell(r[i], header[i]) for i in idx] for r in rows]
    numeric = [
        bool(cells) and all(NUMBER.match(c[j]) or c[j] in ("–", "") for c in cells)
        for j in range(len(idx))
    ]
    return _table(title, [header[i] for i in idx], cells, numeric)


def _study_cell(text: str, column: str) -> str:
    return _compact_cell(text, pp="D3" in column, mean_only="‖" in column)


CELL = re.compile(r"^([-+]?[\d.]+(?:e[-+]?\d+)?)(?: ± ([\d.]+(?:e[-+]?\d+)?))? \(n=(\d+)\)$")


def _compact_cell(text: str, pp: bool = False, mean_only: bool = False) -> str:
    """A report cell ``mean ± std (n=k)`` (or ``mean (n=1)``) in :func:`compact`'s form (``pp``:
    percentage points, signed; ``mean_only``: a norm, without its std); other cells as they are."""
    m = CELL.match(text)
    if not m:
        return text
    mean, std, n = float(m.group(1)), float(m.group(2)) if m.group(2) else math.nan, int(m.group(3))
    return compact(
        (mean, math.nan if mean_only else std, n), log="e" in m.group(1) and not pp, signed=pp
    )
