"""What the per-epoch diagnostics cost, as a share of training time (target: at most 10% at the
default cadence).

    python bench/bench_diagnostics.py                 # trains bp and dfa (seed 42) at the audit's default profile
    # reads the timings logged by finished runs (e.g. after `make audit`)
    python bench/bench_diagnostics.py RESULTS_DIR

Both the probe (``time/diag_s``, epoch 0 included) and the training (``time/train_s``) are timed in
the same processes, so the ratio is not disturbed by what else the machine does in between.
"""

from __future__ import annotations

import sys
import tempfile
from collections import defaultdict

from creditaudit.reports.collect import collect


def ratios(results: str) -> None:
    col = collect(results)
    per_rule: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for run in col.runs:
        if run.status != "finished":
            continue
        for rec in run.metrics:
            per_rule[run.rule][0] += rec.get("time/diag_s", 0.0)
            per_rule[run.rule][1] += rec.get("time/train_s", 0.0)
    if not per_rule:
        sys.exit(f"no finished runs under {results}")
    print(f"{'rule':<14}{'diagnostics s':>15}{'training s':>12}{'ratio':>9}")
    total = [0.0, 0.0]
    for rule, (d, t) in sorted(per_rule.items()):
        total[0] += d
        total[1] += t
        print(f"{rule:<14}{d:>15.1f}{t:>12.1f}{d / t:>9.1%}")
    print(
        f"{'all runs':<14}{total[0]:>15.1f}{total[1]:>12.1f}{total[0] / total[1]:>9.1%}  (target <= 10%)"
    )


def main(argv: list[str]) -> None:
    if argv:
        ratios(argv[0])
        return
    from creditaudit.experiments import audit_configs
    from creditaudit.jobs import run_many

    with tempfile.TemporaryDirectory() as tmp:
        cfgs = audit_configs(["bp", "dfa"], seeds=(42,), baseline=None, results=tmp)
        print(
            f"training bp and dfa at the default audit profile ({cfgs[0].data.dataset}, "
            f"{cfgs[0].data.train_subset or 'all'} examples, {cfgs[0].epochs} epochs), one thread each"
        )
        run_many(cfgs, workers=1)
        ratios(tmp)


if __name__ == "__main__":
    main(sys.argv[1:])
