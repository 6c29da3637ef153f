"""Where a finished sweep's time went, per setting, from its results folder alone.

    python bench/sweep_times.py RESULTS [settings=NAME,NAME]

Reads every run's ``summary.json`` (its start time and ``wall_s``, the seconds its training took,
probes and checkpoints included) and prints, per setting: the runs, their summed worker time, the
span from the first run's start to the last run's end (on a machine where the settings' runs
interleave, spans overlap), and the longest run; then the whole folder's span and worker time.
Compare with ``bench/bench_study.py``'s projection of the same settings (docs/performance.md).
Runs resumed from a checkpoint count only their last session's time, as their summary does.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def fmt(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def collect(results: Path, settings: set[str] | None = None) -> dict[str, list[dict]]:
    by_setting: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*/*/summary.json")):
        setting = path.parent.parent.name
        if settings and setting not in settings:
            continue
        try:
            s = json.loads(path.read_text())
            start, wall = _time(s["started"]), float(s["wall_s"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(
                f"skipped {path.parent.relative_to(results)}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            continue
        by_setting.setdefault(setting, []).append(
            {
                "run": path.parent.name,
                "status": s.get("status"),
                "start": start,
                "end": start + wall,
                "wall": wall,
            }
        )
    return by_setting


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    results = Path(argv[0])
    opts = dict(a.split("=", 1) for a in argv[1:])
    settings = set(opts["settings"].split(",")) if opts.get("settings") else None
    by_setting = collect(results, settings)
    if not by_setting:
        sys.exit(
            f"no run summaries under {results}: is it a results folder (RESULTS/SETTING/RUN/summary.json)?"
        )
    print(
        f"{'setting':22} {'runs':>4} {'worker time':>12} {'span':>10} {'longest run':>12}  unfinished"
    )
    rows = sorted(by_setting.items(), key=lambda kv: min(r["start"] for r in kv[1]))
    for name, runs in rows:
        span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
        longest = max(runs, key=lambda r: r["wall"])
        unfinished = sum(r["status"] != "finished" for r in runs)
        print(
            f"{name:22} {len(runs):>4} {fmt(sum(r['wall'] for r in runs)):>12} {fmt(span):>10} "
            f"{fmt(longest['wall']):>12}  {unfinished or ''}"
        )
    every = [r for runs in by_setting.values() for r in runs]
    span = max(r["end"] for r in every) - min(r["start"] for r in every)
    print(
        f"\n{len(every)} runs: {fmt(sum(r['wall'] for r in every))} of worker time, "
        f"{fmt(span)} from the first run's start to the last run's end"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
