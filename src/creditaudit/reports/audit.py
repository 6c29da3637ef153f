"""The audit of a results folder: verdicts per run and per rule, the audit table, and the report
(Markdown and a self-contained HTML page with plots). A function of the run folders alone.

Every figure is mean ± std (ddof=1) over seeds with its n. D3 compares each run with the
frozen-blocks baseline of the same experiment (same architecture, data, seed, epochs) found anywhere
in the results folder (``creditaudit.runs.pairing``, the one pairing rule of every report):
``bp_frozen`` by default, or the rule's own ``<rule>_frozen``. A run without one is "D3 not
evaluated", with the reason — never PASS.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from creditaudit.diagnostics.verdict import (
    RuleVerdict,
    RunVerdict,
    Thresholds,
    mean_std,
    rule_verdict,
    run_verdict,
    summarise,
)
from creditaudit.reports.collect import Collection, RunRecord
from creditaudit.reports.markdown import md_table
from creditaudit.reports.resume import unfinished_note
from creditaudit.runs.pairing import BASELINE_RULE, find_baseline, missing_reason

# Figure name -> (column title, one-line definition). The definitions are printed under every table.
FIGURES: dict[str, tuple[str, str]] = {
    "test_acc": ("test acc", "final test accuracy"),
    "depth_pp": (
        "D3 depth utility (pp)",
        "test accuracy minus the frozen-blocks baseline's, percentage points; D3 fires below the threshold",
    ),
    "deep_cos": (
        "deep cos",
        "mean over blocks l=1..L of Γ_l, the mean per-sample cosine between credit a_l and "
        "true gradient g_l (no eps clamp, float64)",
    ),
    "rho_deep": (
        "ρ deep",
        "mean over l=1..L of ρ_l, the Pearson correlation between predicted (ε⟨a_l,v⟩) and "
        "actual loss changes along random unit directions v",
    ),
    "nudge": (
        "nudging ΔL",
        "change of the eval loss after moving each h_l by η against a_l/‖a_l‖, mean over "
        "l=1..L (negative = credit points downhill)",
    ),
    "train_loss_decrease": (
        "train-loss Δ",
        "final minus initial (epoch 0) loss on a fixed training subset",
    ),
    "hL_norm": ("‖h_L‖", "median per-sample norm of the last residual-stream state"),
    "gL_norm": (
        "D2 ‖g_L‖",
        "median per-sample norm of the reference gradient dCE/dh_L; D2 fires below the threshold",
    ),
    "d1_max": (
        "D1 max ratio",
        "largest over epochs of max_l median ‖h_l‖/‖h_{l-1}‖; D1 fires above the threshold",
    ),
    "grad_stab": (
        "(c) grad stability",
        "mean pairwise cosine of batch-mean g at layer L/2 across disjoint batches (drift vs noise; not a detector)",
    ),
}
LOG_FIGURES = {"hL_norm", "gL_norm", "d1_max"}


@dataclass
class RunAudit:
    run: RunRecord
    verdict: RunVerdict
    figures: dict[str, float | None]
    baseline: RunRecord | None


@dataclass
class RuleAudit:
    rule: str
    runs: list[RunAudit]
    verdict: RuleVerdict
    stats: dict[str, tuple[float, float, int]]  # figure -> (mean, std ddof=1, n)

    def fire_epochs(self, detector: str) -> list[int | None]:
        return [r.verdict.fired.get(detector) for r in self.runs]


@dataclass
class Audit:
    setting: str
    thresholds: Thresholds
    baseline_rule: str
    rules: list[RuleAudit]
    baseline: list[RunRecord]
    problems: list[str] = field(default_factory=list)
    not_finished: list[RunRecord] = field(default_factory=list)

    def unevaluated(self) -> list[str]:
        """``run path: reason`` for every audited run whose D3 could not be evaluated."""
        return [
            f"{r.run.path}: {r.verdict.d3_missing}"
            for ra in self.rules
            for r in ra.runs
            if r.verdict.d3_missing
        ]


def audit_run(
    run: RunRecord, finished: list[RunRecord], th: Thresholds, baseline: str = BASELINE_RULE
) -> RunAudit:
    """One run's verdict and figures; D3 against the ``baseline`` run of the same experiment among
    ``finished`` (every finished run of the results folder), when there is one."""
    base = find_baseline(run, finished, baseline)
    verdict = run_verdict(
        run.metrics,
        base.metrics if base else None,
        th,
        missing=missing_reason(baseline, run.setting),
    )
    figures = summarise(run.metrics)
    figures["depth_pp"] = verdict.depth_utility_pp
    return RunAudit(run, verdict, figures, base)


def build_audit(
    col: Collection,
    *,
    setting: str | None = None,
    thresholds: Thresholds | None = None,
    baseline: str = BASELINE_RULE,
    own_baseline: bool = False,
    rules: list[str] | None = None,
) -> Audit:
    """Verdicts and statistics of every rule in the results (one setting, when given); baselines
    are paired from the whole folder."""
    th = thresholds or Thresholds()
    everywhere = [r for r in col.runs if r.status == "finished"]
    runs = [r for r in col.runs if setting is None or r.setting == setting]
    finished = [r for r in runs if r.status == "finished"]
    not_finished = [r for r in runs if r.status != "finished"]
    audited = sorted({r.rule for r in finished if r.rule != baseline}, key=_rule_order)
    if rules is not None:
        audited = [r for r in audited if r in rules]
    out: list[RuleAudit] = []
    problems = list(col.problems)
    for rule in audited:
        ras = []
        base_rule = f"{rule.removesuffix('_frozen')}_frozen" if own_baseline else baseline
        for run in sorted((r for r in finished if r.rule == rule), key=lambda r: r.seed):
            ra = audit_run(run, everywhere, th, base_rule)
            ras.append(ra)
        stats = {k: mean_std([ra.figures.get(k) for ra in ras]) for k in FIGURES}
        out.append(RuleAudit(rule, ras, rule_verdict(rule, [ra.verdict for ra in ras]), stats))
    used = {
        id(ra.baseline): ra.baseline for rule in out for ra in rule.runs if ra.baseline is not None
    }
    return Audit(
        setting or "all",
        th,
        baseline,
        out,
        sorted(used.values(), key=lambda r: (r.seed, str(r.path))),
        problems,
        not_finished,
    )


def _rule_order(rule: str) -> tuple[int, str]:
    order = ["bp", "fa", "fa_layerwise", "dfa", "ep", "sb", "cb", "vec"]
    base = rule.split("_frozen")[0].split("_shallow")[0]
    return (order.index(base) if base in order else len(order), rule)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------
def fmt(stat: tuple[float, float, int], key: str) -> str:
    mean, std, n = stat
    if n == 0 or math.isnan(mean):
        return "–"
    if key in LOG_FIGURES or (abs(mean) < 1e-2 and mean != 0):
        body = f"{mean:.2e}" + (f" ± {std:.1e}" if not math.isnan(std) else "")
    else:
        body = f"{mean:.3f}" + (f" ± {std:.3f}" if not math.isnan(std) else "")
    return f"{body} (n={n})"


def fire_text(epochs: list[int | None]) -> str:
    fired = [e for e in epochs if e is not None]
    if not fired:
        return "–"
    return f"{len(fired)}/{len(epochs)} at ep {','.join(str(e) for e in fired)}"


TABLE_KEYS = [
    "test_acc",
    "depth_pp",
    "deep_cos",
    "rho_deep",
    "nudge",
    "train_loss_decrease",
    "hL_norm",
    "gL_norm",
    "d1_max",
    "grad_stab",
]


# The audit table's columns after the figures: when each detector fired, and what that decides.
VERDICT_COLUMNS = ["D1 fires", "D2 fires", "D3 fires", "verdict", "modes", "claim"]


def table_rows(audit: Audit) -> tuple[list[str], list[list[str]]]:
    header = ["rule"] + [FIGURES[k][0] for k in TABLE_KEYS] + VERDICT_COLUMNS
    rows = []
    for ra in audit.rules:
        modes = ", ".join(f"{m} {c}/{ra.verdict.n}" for m, c in ra.verdict.modes.items()) or "–"
        rows.append(
            [ra.rule]
            + [fmt(ra.stats[k], k) for k in TABLE_KEYS]
            + [fire_text(ra.fire_epochs(d)) for d in ("D1", "D2", "D3")]
            + [ra.verdict.label, modes, ra.verdict.claim]
        )
    return header, rows


def thresholds_text(audit: Audit) -> str:
    """Where each detector fires, and Mode 2 (Markdown, one line)."""
    th = audit.thresholds
    return (
        f"D1 fires when max_l ‖h_l‖/‖h_(l-1)‖ > {th.d1_ratio:g}; D2 when ‖g_L‖ < {th.d2_norm:g}; "
        f"D3 when depth utility < {th.d3_pp:g} pp against `{audit.baseline_rule}`; "
        f"Mode 2 when D2 passes and |deep cos| < {th.mode2_cos:g}"
    )


TABLE_NOTE = "Mean ± std (ddof=1) over seeds, with n."
FIRE_NOTE = "Fire epochs: seeds in which the diagnostic fired, and the first epoch it did."


def baseline_text(audit: Audit) -> str | None:
    """The frozen-blocks baseline's accuracy (Markdown, one line), when the audit used one."""
    if not audit.baseline:
        return None
    accs = mean_std([summarise(b.metrics)["test_acc"] for b in audit.baseline])
    return f"Frozen-blocks baseline `{audit.baseline_rule}`: test acc {fmt(accs, 'test_acc')}."


PER_RUN_HEADER = ["run", "test acc", "D3 (pp)", "deep cos", "‖h_L‖", "‖g_L‖", "verdict", "modes"]


def per_run_rows(audit: Audit) -> list[list[str]]:
    rows = []
    for ra in audit.rules:
        for r in ra.runs:
            f = r.figures
            rows.append(
                [
                    r.run.path.name,
                    _num(f["test_acc"]),
                    _num(f["depth_pp"]),
                    _num(f["deep_cos"]),
                    _num(f["hL_norm"], True),
                    _num(f["gL_norm"], True),
                    r.verdict.label,
                    ", ".join(r.verdict.modes) or "–",
                ]
            )
    return rows


# Plot name -> its heading in both reports.
PLOT_TITLES = {
    "norms": "Norms against the D1 and D2 thresholds",
    "cosines": "Credit cosine per block over epochs",
    "accuracy": "Test accuracy against the frozen-blocks baseline",
}


def markdown(
    audit: Audit,
    *,
    title: str = "Audit",
    context: dict[str, Any] | None = None,
    plots: dict[str, str] | None = None,
) -> str:
    lines = [f"# {title}", ""]
    for k, v in (context or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines += [
        f"- **thresholds**: {thresholds_text(audit)}",
        "",
        "## Audit table",
        "",
        f"{TABLE_NOTE} {FIRE_NOTE}",
        "",
    ]
    lines += md_table(*table_rows(audit))
    if base := baseline_text(audit):
        lines += ["", base]
    lines += ["", "## Per run", ""] + md_table(PER_RUN_HEADER, per_run_rows(audit))
    if plots:
        lines += ["", "## Plots"]
        for name, path in plots.items():
            lines += [
                "",
                f"### {PLOT_TITLES.get(name, name)}",
                "",
                f"![{PLOT_TITLES.get(name, name)}]({path})",
            ]
    lines += ["", "## Definitions", ""] + definitions()
    if audit.unevaluated():
        lines += [
            "",
            "## D3 not evaluated",
            "",
            'These runs read "D3 not evaluated" instead of PASS:',
            "",
        ]
        lines += [f"- {p}" for p in audit.unevaluated()]
    problems = audit.problems + [
        f"{r.path}: {unfinished_note(r, 'not audited')}" for r in audit.not_finished
    ]
    if problems:
        lines += ["", "## Skipped", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def figure_definitions() -> list[str]:
    """Every figure's definition, as Markdown list items (the audit's and the study tables')."""
    return [f"- **{t}**: {d}." for t, d in FIGURES.values()]


def definitions() -> list[str]:
    """The Definitions section of both audit reports, as Markdown list items: every figure, the
    verdict, the modes and the claim."""
    return figure_definitions() + [
        (
            "- **verdict**: PASS, or FAIL(D1 k/n + …) naming the detectors (D1, D2, D3) that "
            "fired, each with the k of n "
            'seeds in which it did (a run alone: n = 1); "D3 not evaluated (k/n)" (never PASS) when nothing fired but '
            "k seeds have no frozen-blocks baseline of their experiment."
        ),
        (
            "- **Mode 1(a)**: D1 fired (unchecked residual-stream growth). **Mode 1(b)**: D2 "
            "fired (the reference gradient "
            "collapsed). **Mode 2**: D2 passes but deep cos ≈ 0 (aggregation collapse)."
        ),
        (
            '- **claim** "learns with genuine credit": *trustworthy* when every seed passes and none shows Mode 2, '
            "*undetermined* when nothing fired but D3 could not be evaluated, else *needs "
            "walk-back*: a detector fired or "
            "Mode 2 shows, so the claim has to be withdrawn or narrowed."
        ),
    ]


def _num(v: float | None, log: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2e}" if log else f"{v:.4f}"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _curves(ra: RuleAudit, key: str) -> dict[int, list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for r in ra.runs:
        for rec in r.run.metrics:
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_epoch.setdefault(int(rec["epoch"]), []).append(float(v))
    return by_epoch


def plots(audit: Audit) -> dict[str, bytes]:
    """PNG figures: norms with thresholds (log axes), per-layer cosine over epochs, accuracy vs the
    frozen baseline. Curves are the mean over seeds; the band is ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return {
        "norms": _norms_plot(plt, audit),
        "cosines": _cosines_plot(plt, audit),
        "accuracy": _accuracy_plot(plt, audit),
    }


def _band(ax, ra: RuleAudit, key: str) -> None:
    """``key``'s mean over ``ra``'s seeds per epoch, and a band of ± one std around it."""
    c = _curves(ra, key)
    if not c:
        return
    ep = sorted(c)
    m = [mean_std(c[e])[0] for e in ep]
    s = [mean_std(c[e])[1] for e in ep]
    (line,) = ax.plot(ep, m, label=ra.rule)
    lo = [a - (b if not math.isnan(b) else 0) for a, b in zip(m, s, strict=True)]
    hi = [a + (b if not math.isnan(b) else 0) for a, b in zip(m, s, strict=True)]
    ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.15)


def _norms_plot(plt, audit: Audit) -> bytes:
    """‖h_L‖, ‖g_L‖ against D2's threshold and the D1 ratio against D1's, per rule (log axes)."""
    th = audit.thresholds
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ra in audit.rules:
        _band(axes[0], ra, "diag/hL_norm")
        _band(axes[1], ra, "diag/gL_norm")
        _band(axes[2], ra, "diag/d1")
    axes[0].set(title="‖$h_L$‖ (median over the eval batch)", yscale="log", xlabel="epoch")
    axes[1].set(title="‖$g_L$‖ — D2", yscale="log", xlabel="epoch")
    axes[1].axhline(th.d2_norm, color="red", ls="--", lw=1, label=f"D2 threshold {th.d2_norm:g}")
    axes[2].set(title="max$_l$ ‖$h_l$‖/‖$h_{l-1}$‖ — D1", yscale="log", xlabel="epoch")
    axes[2].axhline(th.d1_ratio, color="red", ls="--", lw=1, label=f"D1 threshold {th.d1_ratio:g}")
    for ax in axes:
        _legend(ax, 7)
    return _png(fig)


def _cosines_plot(plt, audit: Audit) -> bytes:
    """One panel per rule (four to a row): Γ_l, the credit cosine of each block, over epochs."""
    n = len(audit.rules)
    cols = min(n, 4) or 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, ra in zip(axes.flat, audit.rules, strict=False):  # the last row may end in empty cells
        for k in _cosine_keys(ra):
            c = _curves(ra, k)
            ep = sorted(c)
            ax.plot(
                ep, [mean_std(c[e])[0] for e in ep], label=f"$\\Gamma_{{{k.rsplit('l', 1)[1]}}}$"
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(
            title=f"{ra.rule}: cos($a_l$, $g_l$) per block $l$", xlabel="epoch", ylim=(-1.05, 1.05)
        )
        _legend(ax, 6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _png(fig)


def _cosine_keys(ra: RuleAudit) -> list[str]:
    """The per-block credit cosines ``credit/cos_l<l>`` that ``ra``'s runs logged, by block."""
    return sorted(
        {k for r in ra.runs for rec in r.run.metrics for k in rec if k.startswith("credit/cos_l")},
        key=lambda k: int(k.rsplit("l", 1)[1]),
    )


def _accuracy_plot(plt, audit: Audit) -> bytes:
    """Test accuracy per rule over epochs, and the frozen-blocks baseline's mean (dashed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for ra in audit.rules:
        _band(ax, ra, "test/acc")
    if audit.baseline:
        c: dict[int, list[float]] = {}
        for b in audit.baseline:
            for rec in b.metrics:
                if "test/acc" in rec:
                    c.setdefault(int(rec["epoch"]), []).append(rec["test/acc"])
        ep = sorted(c)
        ax.plot(
            ep, [mean_std(c[e])[0] for e in ep], "k--", label=f"{audit.baseline_rule} (baseline)"
        )
    ax.set(title="test accuracy vs the frozen-blocks baseline", xlabel="epoch", ylabel="accuracy")
    _legend(ax, 7)
    return _png(fig)


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# The HTML audit table in two halves, each within a 1400-pixel page with no figure wrapped: the
# verdict and what decided it, then the credit and scale figures.
HTML_SPLIT = (
    "Verdicts",
    ["test_acc", "depth_pp"],
    "Credit and scale figures",
    [
        "deep_cos",
        "rho_deep",
        "nudge",
        "train_loss_decrease",
        "hL_norm",
        "gL_norm",
        "d1_max",
        "grad_stab",
    ],
)
N_SUFFIX = re.compile(r" \(n=(\d+)\)$")

CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1400px}"
    ".wide{overflow-x:auto}table{border-collapse:collapse;font-size:13px;margin-bottom:.5em}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f0f0f0}"
    "td.num{white-space:nowrap;text-align:right;font-variant-numeric:tabular-nums}td.nowrap{white-space:nowrap}"
    "code{background:#f4f4f4;padding:0 3px}.PASS{color:#070}.FAIL{color:#b00}img{max-width:100%}"
)


def _html_table(
    header: list[str], rows: list[list[str]], *, nowrap: frozenset[str] | set[str] = frozenset()
) -> str:
    """A table whose figures (and the ``nowrap`` columns) never wrap; verdicts coloured."""
    esc = html.escape
    out = ["<div class='wide'><table><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        cells = []
        for h, c in zip(header, row, strict=True):
            cls = ["num"] if _FIGURE.match(c) else (["nowrap"] if h in nowrap else [])
            cls += ["PASS"] if c == "PASS" else (["FAIL"] if c.startswith("FAIL") else [])
            cells.append(
                f"<td class='{' '.join(cls)}'>{esc(c)}</td>" if cls else f"<td>{esc(c)}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table></div>"


_FIGURE = re.compile(r"^[+\-]?(\d|\.\d)")


def html_page(
    audit: Audit,
    pngs: dict[str, bytes],
    *,
    title: str = "Audit",
    context: dict[str, Any] | None = None,
) -> str:
    """A self-contained page with everything audit.md has: the thresholds, the audit table, the
    frozen baseline's accuracy, the per-run table, the plots inline (base64), the definitions. Text
    written as Markdown for the report (definitions, resume commands) is rendered by a Markdown
    parser (markdown-it-py, CommonMark, raw HTML escaped), so no ``**`` or backtick reaches the reader."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1><ul>",
    ]
    parts += [f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in (context or {}).items()]
    parts.append(f"<li><b>thresholds</b>: {_markdown_inline(thresholds_text(audit))}</li></ul>")
    parts.append(_html_audit_table(audit))
    if base := baseline_text(audit):
        parts.append(f"<p>{_markdown_inline(base)}</p>")
    parts.append("<h2>Per run</h2>" + _html_table(PER_RUN_HEADER, per_run_rows(audit)))
    if pngs:
        parts.append("<h2>Plots</h2>")
    for name, png in pngs.items():
        heading = PLOT_TITLES.get(name, name)
        parts.append(
            f"<h3>{esc(heading)}</h3><img alt='{esc(heading)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    parts.append("<h2>Definitions</h2>" + _markdown_html("\n".join(definitions()) + "\n"))
    parts.append(_html_unevaluated_and_skipped(audit))
    parts.append("</body></html>")
    return "".join(parts)


def _html_audit_table(audit: Audit) -> str:
    """The audit table's section in two halves (:data:`HTML_SPLIT`); when every figure is over the
    same n seeds, n is said once in the note instead of in every cell."""
    esc = html.escape
    header, rows = table_rows(audit)
    ns = {m.group(1) for r in rows for c in r if (m := N_SUFFIX.search(c))}
    note = TABLE_NOTE
    if len(ns) == 1:  # every figure over the same n seeds: said once, and the cells get its room
        rows = [[N_SUFFIX.sub("", c) for c in r] for r in rows]
        note = f"Mean ± std (ddof=1) over n={ns.pop()} seeds."
    col = {h: i for i, h in enumerate(header)}
    first_title, first, second_title, second = HTML_SPLIT
    verdict_cols = ["rule"] + [FIGURES[k][0] for k in first] + VERDICT_COLUMNS
    figure_cols = ["rule"] + [FIGURES[k][0] for k in second]
    parts = [f"<h2>Audit table</h2><p>{esc(note)} {esc(FIRE_NOTE)}</p>"]
    for name, cols in ((first_title, verdict_cols), (second_title, figure_cols)):
        parts.append(
            f"<h3>{esc(name)}</h3>"
            + _html_table(
                cols,
                [[r[col[h]] for h in cols] for r in rows],
                nowrap={"D1 fires", "D2 fires", "D3 fires", "claim"},
            )
        )
    return "".join(parts)


def _html_unevaluated_and_skipped(audit: Audit) -> str:
    """The sections on the runs whose D3 was not evaluated and on the folders skipped, when there
    are any; their reasons are Markdown (they name the command that trains or resumes a run)."""
    esc = html.escape
    parts = []
    unevaluated = [
        r for ra in audit.rules for r in ra.runs if r.verdict.d3_missing
    ]  # as Audit.unevaluated()
    if unevaluated:
        parts.append(
            "<h2>D3 not evaluated</h2><p>These runs read “D3 not evaluated” instead of PASS:</p><ul>"
            + "".join(
                f"<li>{esc(str(r.run.path))}: {_markdown_inline(r.verdict.d3_missing or '')}</li>"
                for r in unevaluated
            )
            + "</ul>"
        )
    if audit.problems or audit.not_finished:
        parts.append(
            "<h2>Skipped</h2><ul>"
            + "".join(f"<li>{esc(p)}</li>" for p in audit.problems)
            + "".join(
                f"<li>{esc(str(r.path))}: {_markdown_inline(unfinished_note(r, 'not audited'))}</li>"
                for r in audit.not_finished
            )
            + "</ul>"
        )
    return "".join(parts)


def _markdown_parser():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False})  # raw HTML in the text is shown, not run


def _markdown_html(text: str) -> str:
    """Markdown blocks as HTML."""
    return _markdown_parser().render(text)


def _markdown_inline(text: str) -> str:
    """One line of Markdown as inline HTML (no paragraph around it)."""
    return _markdown_parser().renderInline(text)


# ---------------------------------------------------------------------------------------------
# Writing the reports
# ---------------------------------------------------------------------------------------------
def report_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {
        "markdown": out / "audit.md",
        "html": out / "audit.html",
        **{n: out / f"audit_{n}.png" for n in ("norms", "cosines", "accuracy")},
    }


def write_reports(
    col: Collection,
    root: str | Path,
    *,
    setting: str | None = None,
    thresholds: Thresholds | None = None,
    own_baseline: bool = False,
    out: str | Path | None = None,
) -> list[tuple[Audit, dict[str, Path]]]:
    """Audit every setting of ``col`` (or ``setting``) and write its Markdown report, HTML page and
    plots to ``out/<setting>/`` (default ``<root>/_reports/<setting>/``); returns each audit and its paths."""
    from creditaudit.runs.io import atomic_write_bytes, atomic_write_text

    root = Path(root)
    written = []
    for s in sorted({r.setting for r in col.runs if setting is None or r.setting == setting}):
        audit = build_audit(col, setting=s, thresholds=thresholds, own_baseline=own_baseline)
        if not audit.rules:
            continue
        paths = report_paths(Path(out) / s if out else root / "_reports" / s)
        runs = [r.run for ra in audit.rules for r in ra.runs]
        context = {
            "results": f"{root}/{s}",
            "dataset": runs[0].dataset,
            "epochs": runs[0].config.get("epochs"),
            "runs audited": len(runs),
            "baseline runs": len(audit.baseline),
        }
        pngs = plots(audit)
        for name, png in pngs.items():
            atomic_write_bytes(paths[name], png)
        atomic_write_text(
            paths["markdown"],
            markdown(
                audit, title=f"Audit — {s}", context=context, plots={n: paths[n].name for n in pngs}
            ),
        )
        atomic_write_text(
            paths["html"], html_page(audit, pngs, title=f"Audit — {s}", context=context)
        )
        written.append((audit, paths))
    return written
