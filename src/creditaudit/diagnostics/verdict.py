"""Verdicts (docs/science.md §4): which diagnostics fire, when, which failure mode that names, per run and
per rule over seeds. Pure functions of metrics logs — nothing here trains or loads a model.

- D1 (scale stability) fires when ``diag/d1`` > ``d1_ratio`` at any logged epoch;
- D2 (reference validity) fires when ``diag/gL_norm`` < ``d2_norm`` at any logged epoch;
  "fires at epoch N" = the first logged epoch whose figure crosses the threshold;
- D3 (depth utility) compares test accuracy with the frozen-blocks baseline's at the same epoch;
  it fires when the FINAL depth utility is below ``d3_pp`` percentage points — the accuracy one would
  publish — and its fire epoch is the first epoch from which it stays below until the end;
- Mode 1(a) = D1 fired; Mode 1(b) = D2 fired; Mode 2 (aggregation collapse) = D2 never fired but
  the final |deep cos| < ``mode2_cos``.

A verdict is written one way in every report and terminal: ``FAIL(D1 3/3 + D3 3/3)`` names the
detectors that fired and in how many of the n seeds (a single run is n = 1: ``FAIL(D3 1/1)``);
otherwise PASS only when D3 was evaluated (a baseline of the same experiment exists): a run without
one reads "D3 not evaluated (1/1)", never PASS. A rule over seeds is PASS when every seed passes;
its claim "learns with genuine credit" is
*trustworthy* when it passes and no seed shows Mode 2, *needs walk-back* when a detector fired or
Mode 2 shows, and *undetermined* when nothing fired but D3 could not be evaluated for some seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DETECTORS = ("D1", "D2", "D3")
NOT_EVALUATED = "D3 not evaluated"


@dataclass
class Thresholds:
    """Where each diagnostic fires (docs/science.md §4 defaults)."""

    d1_ratio: float = field(
        default=50.0, metadata={"help": "D1 fires when max_l ‖h_l‖/‖h_{l-1}‖ exceeds this"}
    )
    d2_norm: float = field(
        default=1e-7, metadata={"help": "D2 fires when the median ‖g_L‖ falls below this"}
    )
    d3_pp: float = field(
        default=2.0,
        metadata={
            "help": (
                "D3 fires when test accuracy minus the frozen-blocks baseline's is below this "
                "many percentage points"
            )
        },
    )
    mode2_cos: float = field(
        default=0.1,
        metadata={"help": "Mode 2 when D2 passes but the final |deep cos| is below this"},
    )


@dataclass
class RunVerdict:
    fired: dict[str, int | None]  # detector -> fire epoch (None = did not fire)
    modes: list[str]
    depth_utility_pp: float | None  # final test acc − baseline acc, in percentage points
    depth_utility_curve: dict[int, float]  # epoch -> pp
    d3_missing: str | None = None  # why D3 could not be evaluated (None: it was)

    @property
    def failed(self) -> list[str]:
        return [d for d in DETECTORS if self.fired.get(d) is not None]

    @property
    def label(self) -> str:
        """The verdict in the rule's form with n = 1: ``FAIL(D1 1/1 + D3 1/1)``, ``PASS``,
        ``D3 not evaluated (1/1)``."""
        return verdict_label(
            {d: int(d in self.failed) for d in DETECTORS}, 1, int(self.d3_missing is not None)
        )


def verdict_label(failed_counts: dict[str, int], n: int, unevaluated: int = 0) -> str:
    """The one written form of a verdict over n seeds: ``FAIL(D1 3/3 + D3 3/3)`` (detectors that
    fired, in how many seeds), else ``D3 not evaluated (1/3)`` (seeds without a baseline), else ``PASS``."""
    failed = [f"{d} {c}/{n}" for d, c in failed_counts.items() if c]
    if failed:
        return f"FAIL({' + '.join(failed)})"
    return f"{NOT_EVALUATED} ({unevaluated}/{n})" if unevaluated else "PASS"


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out.append((int(r["epoch"]), float(v)))
    return out


def first_crossing(records: list[dict], key: str, crosses) -> int | None:
    for epoch, v in _series(records, key):
        if crosses(v):
            return epoch
    return None


def final(records: list[dict], key: str) -> float | None:
    s = _series(records, key)
    return s[-1][1] if s else None


def depth_utility(records: list[dict], baseline: list[dict] | None) -> dict[int, float]:
    """epoch -> (test acc − baseline test acc) in percentage points, over the epochs both logged."""
    if not baseline:
        return {}
    base = dict(_series(baseline, "test/acc"))
    return {e: 100.0 * (acc - base[e]) for e, acc in _series(records, "test/acc") if e in base}


def run_verdict(
    records: list[dict],
    baseline: list[dict] | None,
    th: Thresholds,
    *,
    missing: str = "no frozen-blocks baseline of the same experiment",
) -> RunVerdict:
    """``missing``: the reason D3 is not evaluated when ``baseline`` is None."""
    fired: dict[str, int | None] = {
        "D1": first_crossing(records, "diag/d1", lambda v: v > th.d1_ratio),
        "D2": first_crossing(records, "diag/gL_norm", lambda v: v < th.d2_norm),
        "D3": None,
    }
    curve = depth_utility(records, baseline)
    du = curve[max(curve)] if curve else None
    final_epoch = max((e for e, _ in _series(records, "test/acc")), default=None)
    if baseline is None:
        d3_missing: str | None = missing
    elif final_epoch is None or final_epoch not in curve:
        d3_missing = "the baseline logged no test accuracy at this run's last epoch"
        du = None
    else:
        d3_missing = None
    if du is not None and du < th.d3_pp:
        epochs = sorted(curve)
        start = epochs[-1]
        for e in reversed(epochs):
            if curve[e] < th.d3_pp:
                start = e
            else:
                break
        fired["D3"] = start
    modes = []
    if fired["D1"] is not None:
        modes.append("Mode 1(a)")
    if fired["D2"] is not None:
        modes.append("Mode 1(b)")
    deep = final(records, "credit/deep_cos")
    if fired["D2"] is None and deep is not None and abs(deep) < th.mode2_cos:
        modes.append("Mode 2")
    return RunVerdict(fired, modes, du, curve, d3_missing)


@dataclass
class RuleVerdict:
    rule: str
    n: int
    failed_counts: dict[str, int]  # detector -> seeds in which it fired
    modes: dict[str, int]  # mode -> seeds showing it
    unevaluated: int = 0  # seeds whose D3 could not be evaluated

    @property
    def label(self) -> str:
        return verdict_label(self.failed_counts, self.n, self.unevaluated)

    @property
    def trustworthy(self) -> bool:
        return (
            self.n > 0
            and not self.unevaluated
            and not any(self.failed_counts.values())
            and not self.modes.get("Mode 2")
        )

    @property
    def claim(self) -> str:
        if self.trustworthy:
            return "trustworthy"
        if (
            self.unevaluated
            and not any(self.failed_counts.values())
            and not self.modes.get("Mode 2")
        ):
            return "undetermined"
        return "needs walk-back"


def rule_verdict(rule: str, verdicts: list[RunVerdict]) -> RuleVerdict:
    counts = {d: sum(v.fired.get(d) is not None for v in verdicts) for d in DETECTORS}
    modes: dict[str, int] = {}
    for v in verdicts:
        for m in v.modes:
            modes[m] = modes.get(m, 0) + 1
    return RuleVerdict(
        rule, len(verdicts), counts, modes, sum(v.d3_missing is not None for v in verdicts)
    )


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; NaN for n < 2) and n of the finite values (None skipped)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def summarise(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """The per-run figures the audit table reports (final values unless named otherwise)."""
    train_fixed = _series(records, "diag/train_loss_fixed")
    return {
        "test_acc": final(records, "test/acc"),
        "deep_cos": final(records, "credit/deep_cos"),
        "rho_deep": final(records, "credit/rho_deep"),
        "nudge": final(records, "credit/nudge"),
        "train_loss_decrease": (train_fixed[-1][1] - train_fixed[0][1])
        if len(train_fixed) >= 2
        else None,
        "hL_norm": final(records, "diag/hL_norm"),
        "gL_norm": final(records, "diag/gL_norm"),
        "d1_max": max((v for _, v in _series(records, "diag/d1")), default=None),
        "grad_stab": final(records, "diag/grad_stab"),
    }
