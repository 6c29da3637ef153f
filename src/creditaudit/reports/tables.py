"""The study's tables, generated from a results folder alone (docs/science.md §6).

- **Table 1**: the main audit (setting ``main_audit``), as ``creditaudit audit`` prints it.
- **FA vs DFA**: the two feedback rules side by side on the main audit.
- **Penalty sweep**: every rule × penalty λ of the penalty settings and their matched controls.
- **Depth sweep**: DFA and FA at each depth L (setting ``depth_sweep``).
- **Cross-architecture**: every rule on every architecture variant of ``cross_arch`` and the
  architecture ablations (``no_terminal_ln``, ``no_residual``).
- **Functional triangulation**: accuracy, nudging, training-loss decrease and deep cos of the rules
  of one setting (``penalty_rescue`` by default), the ordering of the rules each metric implies,
  and whether the orderings agree.

Every figure is mean ± std (ddof=1) over seeds with n; a table whose runs are absent says so
rather than disappearing. Runs that are not finished, and folders that cannot be read, are listed
under "Skipped" and never averaged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from creditaudit.diagnostics.verdict import Thresholds, mean_std, rule_verdict, summarise
from creditaudit.models.base import ARCHS, ArchShape, ModelConfig, arch_shape
from creditaudit.reports.audit import (
    RunAudit,
    _rule_order,
    audit_run,
    build_audit,
    figure_definitions,
    fire_text,
    fmt,
    table_rows,
)
from creditaudit.reports.collect import Collection, RunRecord
from creditaudit.reports.markdown import md_table
from creditaudit.reports.resume import unfinished_note

PENALTY_SETTINGS = (
    "matched_30ep",
    "sbcb_vanilla_30ep",
    "penalty_1e-4",
    "penalty_rescue",
    "dfa_pen_30ep_diag",
    "penalty_1e-1",
    "bp_penalty",
    "dfa_pen_100ep",
)
ARCH_SETTINGS = ("main_audit", "cross_arch", "no_terminal_ln", "no_residual")
TRIANGULATION_METRICS: dict[str, tuple[str, bool]] = {  # figure -> (title, higher is better)
    "test_acc": ("accuracy", True),
    "nudge": ("nudging ΔL", False),
    "train_loss_decrease": ("training-loss decrease", False),
    "deep_cos": ("deep cos", True),
}


@dataclass
class Table:
    key: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> list[str] | None:
        """The columns a terminal shows (None: all): the figures that decide the verdict; the
        Markdown keeps every column."""
        return TERMINAL_COLUMNS.get(self.key)

    def markdown(self, level: int = 2) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        if self.rows:
            lines += md_table(self.header, self.rows)
        else:
            lines.append("*No finished runs for this table in the results folder.*")
        if self.notes:
            lines += [""] + self.notes
        return "\n".join(lines) + "\n"


@dataclass
class Group:
    """Runs that share a table row, audited one by one (D3 wherever a baseline exists)."""

    label: tuple[str, ...]
    runs: list[RunAudit]

    @property
    def n(self) -> int:
        return len(self.runs)

    def stat(self, key: str) -> tuple[float, float, int]:
        return mean_std([r.figures.get(key) for r in self.runs])

    def fires(self, detector: str) -> str:
        return fire_text([r.verdict.fired.get(detector) for r in self.runs])

    def verdict(self) -> str:
        return rule_verdict(self.label[0], [r.verdict for r in self.runs]).label


def groups(
    col: Collection,
    settings: Iterable[str],
    key: Callable[[RunRecord], tuple[str, ...]],
    th: Thresholds,
) -> list[Group]:
    """Finished runs of ``settings`` grouped by ``key`` (first element: the rule), in study order;
    the frozen and shallow baselines are references, not rows."""
    finished = [r for r in col.runs if r.status == "finished"]
    wanted = set(settings)
    out: dict[tuple[str, ...], list[RunAudit]] = {}
    for run in sorted(finished, key=lambda r: (r.setting, r.seed)):
        if run.setting in wanted and not run.rule.endswith(("_frozen", "_shallow")):
            out.setdefault(key(run), []).append(audit_run(run, finished, th))
    return [
        Group(k, v)
        for k, v in sorted(out.items(), key=lambda kv: (_rule_order(kv[0][0]), kv[0][1:]))
    ]


def d3_notes(runs: Iterable[RunAudit]) -> list[str]:
    """One note per reason, naming the runs whose D3 could not be evaluated."""
    by_reason: dict[str, list[str]] = {}
    for r in runs:
        if r.verdict.d3_missing:
            by_reason.setdefault(r.verdict.d3_missing, []).append(
                f"`{r.run.setting}/{r.run.path.name}`"
            )
    return [
        f"**D3 not evaluated** for {len(names)} run{'s' if len(names) > 1 else ''} ({reason}): {', '.join(names)}."
        for reason, names in by_reason.items()
    ]


def _all_runs(audit_or_groups) -> list[RunAudit]:
    if isinstance(audit_or_groups, list):
        return [r for g in audit_or_groups for r in g.runs]
    return [r for ra in audit_or_groups.rules for r in ra.runs]


# ---------------------------------------------------------------------------------------------
def table1(col: Collection, th: Thresholds) -> Table:
    audit = build_audit(col, setting="main_audit", thresholds=th)
    header, rows = table_rows(audit)
    notes = [
        f"Setting `main_audit`; D3 against `{audit.baseline_rule}` of the same experiment and seed."
    ]
    if audit.baseline:
        baseline = mean_std([summarise(b.metrics)["test_acc"] for b in audit.baseline])
        notes.append(f"Frozen-blocks baseline: test acc {fmt(baseline, 'test_acc')}.")
    return Table("table1", "Table 1: main audit", header, rows, notes + d3_notes(_all_runs(audit)))


def fa_vs_dfa(col: Collection, th: Thresholds) -> Table:
    audit = build_audit(col, setting="main_audit", thresholds=th, rules=["fa", "dfa"])
    by_rule = {ra.rule: ra for ra in audit.rules}
    if not by_rule:
        return Table("fa_vs_dfa", "FA vs DFA", [], [])
    total = {
        r: sum(1 for run in col.runs if run.rule == r and run.status == "finished")
        for r in ("fa", "dfa")
    }
    cols = [r for r in ("fa", "dfa") if r in by_rule]
    header = [""] + [f"{r.upper()} ({total[r]} runs in all)" for r in cols]

    def row(title: str, cell: Callable) -> list[str]:
        return [title] + [cell(by_rule[r]) for r in cols]

    rows = [
        row(
            "credit signal",
            lambda ra: (
                "a_l = B_l a_(l+1), fixed random d×d, sequential"
                if ra.rule == "fa"
                else "a_l = B_l e, fixed random d×C, direct"
            ),
        ),
        row("test acc (main audit)", lambda ra: fmt(ra.stats["test_acc"], "test_acc")),
        row(
            "D3 depth utility (pp) vs frozen baseline",
            lambda ra: fmt(ra.stats["depth_pp"], "depth_pp"),
        ),
        row("deep cos", lambda ra: fmt(ra.stats["deep_cos"], "deep_cos")),
        row("‖h_L‖", lambda ra: fmt(ra.stats["hL_norm"], "hL_norm")),
        row("‖g_L‖", lambda ra: fmt(ra.stats["gL_norm"], "gL_norm")),
        row("Mode 1(a): D1 fires", lambda ra: fire_text(ra.fire_epochs("D1"))),
        row("Mode 1(b): D2 fires", lambda ra: fire_text(ra.fire_epochs("D2"))),
        row("verdict", lambda ra: f"{ra.verdict.label} ({ra.verdict.claim})"),
    ]
    return Table(
        "fa_vs_dfa",
        "FA vs DFA",
        header,
        rows,
        [
            "Same local loss, architecture and optimizer; only how a_l is computed differs. Setting `main_audit`."
        ]
        + d3_notes(_all_runs(audit)),
    )


def _figure_cells(g: Group) -> list[str]:
    return (
        [fmt(g.stat(k), k) for k in ("test_acc", "depth_pp", "deep_cos", "hL_norm", "gL_norm")]
        + [g.fires(d) for d in ("D1", "D2")]
        + [g.verdict()]
    )


FIGURE_HEADER = [
    "test acc",
    "D3 (pp)",
    "deep cos",
    "‖h_L‖",
    "‖g_L‖",
    "D1 fires",
    "D2 fires",
    "verdict",
]
_DECIDING = ["n", "test acc", "D3 (pp)", "deep cos", "‖h_L‖", "‖g_L‖", "verdict"]
TERMINAL_COLUMNS = {
    "penalty_sweep": ["rule", "λ", "epochs", "setting", *_DECIDING],
    "depth_sweep": ["rule", "L", "d", *_DECIDING],
    "cross_arch": ["architecture", "rule", *_DECIDING],
    "extended_rules": ["rule", *_DECIDING],
}


def penalty_sweep(col: Collection, th: Thresholds) -> Table:
    gs = groups(
        col,
        PENALTY_SETTINGS,
        lambda r: (r.rule, f"{r.config.get('lam', 0.0):g}", str(r.config.get("epochs")), r.setting),
        th,
    )
    gs.sort(key=lambda g: (_rule_order(g.label[0]), float(g.label[1]), int(g.label[2])))
    rows = [
        [g.label[0], g.label[1], g.label[2], g.label[3], str(g.n)] + _figure_cells(g) for g in gs
    ]
    return Table(
        "penalty_sweep",
        "Penalty sweep",
        ["rule", "λ", "epochs", "setting", "n"] + FIGURE_HEADER,
        rows,
        [
            f"Settings: {', '.join(f'`{s}`' for s in PENALTY_SETTINGS)}. λ = 0 rows are the "
            "matched no-penalty controls."
        ]
        + d3_notes(_all_runs(gs)),
    )


def depth_sweep(col: Collection, th: Thresholds) -> Table:
    def key(r: RunRecord) -> tuple[str, ...]:
        shape = _shape(r)
        return (r.rule, f"{shape.L:d}", f"{shape.d:d}")

    gs = groups(col, ("depth_sweep",), key, th)
    gs.sort(key=lambda g: (_rule_order(g.label[0]), int(g.label[1])))
    rows = [
        [g.label[0], g.label[1], g.label[2], str(g.n)]
        + _figure_cells(g)
        + [fmt(g.stat("d1_max"), "d1_max")]
        for g in gs
    ]
    return Table(
        "depth_sweep",
        "Depth sweep",
        ["rule", "L", "d", "n"] + FIGURE_HEADER + ["D1 max ratio"],
        rows,
        ["Setting `depth_sweep`."] + d3_notes(_all_runs(gs)),
    )


def cross_arch(col: Collection, th: Thresholds) -> Table:
    gs = groups(col, ARCH_SETTINGS, lambda r: (r.rule, arch_description(r), r.setting), th)
    rows = [[g.label[1], g.label[0], g.label[2], str(g.n)] + _figure_cells(g) for g in gs]
    rows.sort(key=lambda row: (row[0], _rule_order(row[1])))
    return Table(
        "cross_arch",
        "Cross-architecture",
        ["architecture", "rule", "setting", "n"] + FIGURE_HEADER,
        rows,
        [
            f"Settings: {', '.join(f'`{s}`' for s in ARCH_SETTINGS)}. Mode 1(b)'s mechanism "
            "(‖g_L‖ ∝ 1/‖h_L‖ behind a terminal norm) needs a terminal norm: on an architecture "
            "without one, D2 firing has another cause, e.g. a network that classifies its eval "
            "examples with near-zero loss (BP too)."
        ]
        + d3_notes(_all_runs(gs)),
    )


def extended_rules(col: Collection, th: Thresholds) -> Table:
    """Every rule beyond the study's six on the main architecture (setting ``extended_rules``)."""
    gs = groups(col, ("extended_rules",), lambda r: (r.rule,), th)
    rows = [[g.label[0], str(g.n)] + _figure_cells(g) for g in gs]
    return Table(
        "extended_rules",
        "Rules beyond the study",
        ["rule", "n"] + FIGURE_HEADER,
        rows,
        [
            "Setting `extended_rules` (not one of the study's): the field's other rule families on the study's "
            "main architecture and recipe; D3 against the `bp_frozen` baseline of the same experiment."
        ]
        + d3_notes(_all_runs(gs)),
    )


def triangulation(col: Collection, th: Thresholds, setting: str | None = None) -> Table:
    if setting is None:
        has = {r.setting for r in col.runs if r.status == "finished"}
        setting = next((s for s in ("penalty_rescue", "main_audit") if s in has), "penalty_rescue")
    gs = groups(col, (setting,), lambda r: (r.rule,), th)
    rules = [g.label[0] for g in gs]
    stats = {k: {g.label[0]: g.stat(k) for g in gs} for k in TRIANGULATION_METRICS}
    orders = {
        k: ordering(stats[k], higher_better=hb) for k, (_, hb) in TRIANGULATION_METRICS.items()
    }
    rows = (
        [
            [title] + [fmt(stats[k][r], k) for r in rules] + [render_ordering(orders[k])]
            for k, (title, _) in TRIANGULATION_METRICS.items()
        ]
        if rules
        else []
    )
    notes = [
        f"Setting `{setting}`. Better = higher accuracy and deep cos, more negative nudging ΔL and "
        "training-loss decrease. `a > b`: a is better by more than the larger of the two stds; `a ≈ b`: not."
    ]
    if rules:
        notes.append(agreement_sentence(orders))
    return Table(
        "triangulation", "Functional triangulation", ["metric"] + rules + ["ordering"], rows, notes
    )


# ---------------------------------------------------------------------------------------------
# Orderings
# ---------------------------------------------------------------------------------------------
@dataclass
class Ordering:
    ranked: list[str]  # best first
    better: set[tuple[str, str]]  # (a, b): a is clearly better than b

    def conflicts(self, other: Ordering) -> list[tuple[str, str]]:
        return sorted((a, b) for a, b in self.better if (b, a) in other.better)


def ordering(stats: dict[str, tuple[float, float, int]], *, higher_better: bool) -> Ordering:
    """Rules ranked by mean; a is *clearly* better than b when the gap exceeds the larger std (a
    rule seen once has std 0 here, so any gap counts)."""
    vals = {r: s for r, s in stats.items() if s[2] > 0 and math.isfinite(s[0])}
    sign = 1.0 if higher_better else -1.0
    ranked = sorted(vals, key=lambda r: (-sign * vals[r][0], _rule_order(r)))
    better = set()
    for a in ranked:
        for b in ranked:
            gap = sign * (vals[a][0] - vals[b][0])
            spread = max(_std0(vals[a][1]), _std0(vals[b][1]))
            if gap > spread and gap > 0:
                better.add((a, b))
    return Ordering(ranked, better)


def _std0(s: float) -> float:
    return 0.0 if math.isnan(s) else s


def render_ordering(o: Ordering) -> str:
    if not o.ranked:
        return "–"
    out = o.ranked[0]
    for prev, cur in itertools.pairwise(o.ranked):
        out += (" > " if (prev, cur) in o.better else " ≈ ") + cur
    return out


def agreement_sentence(orders: dict[str, Ordering]) -> str:
    """Which metrics order the rules compatibly (no pair of rules clearly ordered both ways)."""
    names = {k: TRIANGULATION_METRICS[k][0] for k in orders}
    keys = list(orders)
    agreeing = [keys[0]]
    for k in keys[1:]:
        if all(not orders[k].conflicts(orders[j]) for j in agreeing):
            agreeing.append(k)
    others = [k for k in keys if k not in agreeing]
    text = f"{', '.join(names[k] for k in agreeing)} {'agree' if len(agreeing) > 1 else 'stands alone'}"
    if not others:
        return f"Agreement: all {len(keys)} metrics order the rules compatibly."
    parts = []
    for k in others:
        pairs = sorted({f"{a} vs {b}" for j in agreeing for a, b in orders[k].conflicts(orders[j])})
        parts.append(f"{names[k]} disagrees ({'; '.join(pairs)})")
    return f"Agreement: {text}; " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
def _model_fields(r: RunRecord) -> dict:
    known = set(ModelConfig.__dataclass_fields__)
    m = {k: v for k, v in (r.config.get("model") or {}).items() if k in known}
    if isinstance(m.get("channels"), list):
        m["channels"] = tuple(m["channels"])
    return m


def arch_description(r: RunRecord) -> str:
    """A readable architecture name from a run's config: ``resmlp d=256 L=4``, ``… no terminal LN``."""
    arch = r.config.get("arch", r.arch)
    if arch not in ARCHS:
        return f"{arch} (an architecture this installation does not register)"
    shape, default = _shape(r), ARCHS.get(arch).defaults
    text = f"{arch} d={shape.d} L={shape.L}"
    if shape.out_ln or (default and default.out_ln):
        text += " + terminal LN" if shape.out_ln else " no terminal LN"
    if default and shape.residual != default.residual:
        text += " + residual" if shape.residual else " no residual"
    return text


def _shape(r: RunRecord) -> ArchShape:
    return arch_shape(r.config.get("arch", r.arch), ModelConfig(**_model_fields(r)))


TABLES: dict[str, Callable[[Collection, Thresholds], Table]] = {
    "table1": table1,
    "fa_vs_dfa": fa_vs_dfa,
    "penalty_sweep": penalty_sweep,
    "depth_sweep": depth_sweep,
    "cross_arch": cross_arch,
    "triangulation": triangulation,
    "extended_rules": extended_rules,
}


def all_tables(col: Collection, th: Thresholds | None = None) -> list[Table]:
    th = th or Thresholds()
    return [make(col, th) for make in TABLES.values()]


def skipped(col: Collection) -> list[str]:
    return list(col.problems) + [
        f"{r.path}: {unfinished_note(r)}" for r in col.runs if r.status != "finished"
    ]


def tables_markdown(
    col: Collection,
    th: Thresholds | None = None,
    *,
    source: str = "",
    only: list[Table] | None = None,
) -> str:
    """Every table (or the ``only`` ones, already built) as one Markdown page."""
    lines = ["# Tables", ""]
    if source:
        lines += [f"Generated from `{source}` alone. Mean ± std (ddof=1) over seeds, with n.", ""]
    body = "\n".join(t.markdown() for t in (only if only is not None else all_tables(col, th)))
    defs = ["## Definitions", ""] + figure_definitions()
    skip = skipped(col)
    tail = ["", "## Skipped", ""] + [f"- {p}" for p in skip] if skip else []
    return "\n".join(lines) + body + "\n" + "\n".join(defs + tail) + "\n"


__all__ = [
    "TABLES",
    "Table",
    "all_tables",
    "arch_description",
    "ordering",
    "render_ordering",
    "tables_markdown",
]
