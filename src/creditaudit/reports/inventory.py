"""TRAINING_INVENTORY.md from a results folder alone, in the shape of the study's inventory:
summary counts, runs by method, by architecture, by setting (and by dataset and status), the key
comparison tables, where the files are, and estimated device-hours from the logged wall time.

Counts are of run folders that could be read; a finished run counts toward the key tables, every
readable run toward the counts (with its status shown), and unreadable folders and unfinished runs
are listed at the end — an interrupted run (its process gone) with the command that resumes it.
Nothing here trains or measures.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from creditaudit.diagnostics.verdict import Thresholds
from creditaudit.reports.collect import Collection, RunRecord
from creditaudit.reports.markdown import md_table
from creditaudit.reports.resume import unfinished_note
from creditaudit.reports.tables import _rule_order, arch_description, fa_vs_dfa, triangulation
from creditaudit.runs.pairing import CONTROLS


@dataclass
class Inventory:
    runs: list[RunRecord]

    @property
    def epochs(self) -> int:
        return sum(int(r.summary.get("epochs_done") or 0) for r in self.runs)

    def hours_by_device(self) -> dict[str, float]:
        return {dev: device_hours(rs) for dev, rs in sorted(self.by(device_kind).items())}

    def by(self, key) -> dict[str, list[RunRecord]]:
        out: dict[str, list[RunRecord]] = defaultdict(list)
        for r in self.runs:
            out[key(r)].append(r)
        return dict(out)


def device_hours(runs: list[RunRecord]) -> float:
    """Logged wall time of ``runs``, in hours."""
    return sum(float(r.summary.get("wall_s") or 0.0) for r in runs) / 3600


def device_kind(r: RunRecord) -> str:
    dev = str(r.summary.get("device") or "unknown")
    return dev.split(":")[0]


def method_description(rule: str) -> str:
    from creditaudit.rules import RULES
    from creditaudit.rules.base import parse_rule_name

    try:
        base, variant = parse_rule_name(rule)
    except KeyError:
        return "(a rule this installation does not know: its plugin file is not loaded)"
    summary = RULES.summary(base)
    if variant == "frozen":
        return (
            f"{base.upper()} training only embedding, terminal norm and head; "
            "blocks frozen at random init (frozen-blocks baseline)."
        )
    if variant == "shallow":
        return f"{base.upper()} on the L=0 network: embedding, terminal norm and head only (shallow baseline)."
    return summary


def setting_description(name: str) -> str:
    from creditaudit.experiments import SETTINGS

    if name == CONTROLS:
        return (
            "added controls: the bp_frozen baselines other settings' D3 needs "
            "and the study's inventory does not list"
        )
    return SETTINGS.summary(name) if name in SETTINGS else "(not a setting of the study's registry)"


def _count_row(name: str, runs: list[RunRecord], desc: str, *, statuses: bool = True) -> list[str]:
    """``name | n [(k finished; other statuses)] [(of which c added controls)] | desc``: a row
    mixing study runs and added controls says how many are controls, so its count compares with
    the study's inventory (which lists no controls)."""
    counts = Counter(r.status for r in runs)
    finished = counts.pop("finished", 0)
    extra = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if statuses else ""
    added = sum(r.setting == CONTROLS for r in runs)
    count = str(len(runs)) + (f" ({finished} finished; {extra})" if extra else "")
    if 0 < added < len(runs):
        count += f" (of which {added} added control{'s' if added > 1 else ''})"
    return [name, count, desc]


def count_sections(inv: Inventory, *, planned: bool = False) -> list[str]:
    """Summary, By Method, By Architecture and By Experiment Setting: the counts of the study's
    inventory, for run folders that exist or (``planned``) for the runs a sweep would train."""
    runs = inv.runs
    methods = inv.by(lambda r: r.rule)
    primary = [m for m in methods if not m.endswith(("_frozen", "_shallow"))]
    archs = inv.by(arch_description)
    settings = inv.by(lambda r: r.setting)
    controls = settings.get(CONTROLS, [])
    beyond = [r for r in runs if _beyond_study(r.setting)]
    combos = {(r.rule, arch_description(r)) for r in runs}
    # the architecture as its folder names it: an added control's label carries its epochs and
    # random labels (bp_frozen__resmlp-ep2__s42), two models the description alone would merge
    models = {(r.rule, r.arch, r.seed, r.setting) for r in runs}
    statuses = Counter(r.status for r in runs)
    total = f"**{len(runs)}**"
    if runs and not planned:
        total += f" ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})"
    rows = [("**Total training runs**", total)]
    if controls or beyond:
        title = "Study runs + **added controls** (D3 baselines, `controls/`)" + (
            " + runs beyond the study" if beyond else ""
        )
        rows.append(
            (
                title,
                f"{len(runs) - len(controls) - len(beyond)} + **{len(controls)}**"
                + (f" + {len(beyond)}" if beyond else ""),
            )
        )
    rows += [
        ("**Unique models** (method × arch × seed × setting)", f"**{len(models)}**"),
        ("**Total training epochs**", f"**{inv.epochs:,}**"),
    ]
    if not planned:
        hours = inv.hours_by_device()
        hours_text = ", ".join(f"{h:.2f} h {dev}" for dev, h in hours.items()) or "0 h"
        rows.append(
            (
                "**Estimated total device time** (logged wall time)",
                f"**{device_hours(runs):.2f} hours** ({hours_text})",
            )
        )
    rows += [
        (
            "**Training methods**",
            f"**{len(methods)}** ({len(primary)} primary + {len(methods) - len(primary)} frozen/shallow variants)",
        ),
        ("**Architectures**", f"**{len(archs)}**"),
        ("**Experiment settings**", f"**{len(settings)}**"),
        ("**Method × architecture combinations**", f"**{len(combos)}**"),
        (
            "**Datasets**",
            f"**{len({r.dataset for r in runs})}** ({', '.join(sorted({r.dataset for r in runs})) or '–'})",
        ),
    ]
    lines = ["## Summary", ""] + md_table(["Dimension", "Count"], [list(r) for r in rows])

    lines += ["", f"## By Method ({len(methods)} types)", ""]
    lines += md_table(
        ["Method", "Runs", "Description"],
        [
            _count_row(m, methods[m], method_description(m), statuses=not planned)
            for m in sorted(methods, key=lambda m: (-len(methods[m]), _rule_order(m)))
        ],
    )

    lines += ["", f"## By Architecture ({len(archs)})", ""]
    lines += md_table(
        ["Architecture", "Runs", "Settings"],
        [
            _count_row(
                a, archs[a], ", ".join(sorted({r.setting for r in archs[a]})), statuses=not planned
            )
            for a in sorted(archs, key=lambda a: (-len(archs[a]), a))
        ],
    )

    head = ["Setting", "Runs", "Epochs"] + ([] if planned else ["Device-hours"]) + ["Description"]
    setting_rows = []
    for s in sorted(settings, key=_setting_order):
        rs = settings[s]
        eps = sorted({int(r.config.get("epochs") or 0) for r in rs})
        row = _count_row(s, rs, setting_description(s), statuses=not planned)
        hrs = [] if planned else [f"{device_hours(rs):.2f}"]
        setting_rows.append([row[0], row[1], ", ".join(map(str, eps)), *hrs, row[2]])
    lines += ["", f"## By Experiment Setting ({len(settings)})", ""] + md_table(head, setting_rows)
    return lines


def inventory_markdown(
    col: Collection,
    results: str | Path,
    *,
    th: Thresholds | None = None,
    generated: str | None = None,
) -> str:
    th = th or Thresholds()
    inv = Inventory(col.runs)
    root = Path(results)
    settings = inv.by(lambda r: r.setting)
    lines = [
        "# Training Inventory",
        "",
        f"Generated: {generated or time.strftime('%Y-%m-%d')}. Source: scan of `{root}` (run "
        "folders `<setting>/<rule>__<arch>__s<seed>/`).",
        "",
    ]
    lines += count_sections(inv)

    datasets = inv.by(lambda r: r.dataset)
    lines += ["", "## By Dataset", ""] + md_table(
        ["Dataset", "Runs", "Settings"],
        [
            _count_row(d, datasets[d], ", ".join(sorted({r.setting for r in datasets[d]})))
            for d in sorted(datasets)
        ],
    )

    lines += [
        "",
        "## Key Tables",
        "",
        "Generated from the finished runs (all ± use ddof=1; n = seeds).",
        "",
    ]
    lines += [t.markdown(level=3) for t in (fa_vs_dfa(col, th), triangulation(col, th))]
    lines += [
        "`creditaudit tables` writes every table of the study (Table 1, penalty and depth sweeps, cross-architecture).",
        "",
    ]

    lines += [
        "## File Locations",
        "",
        f"All training results are in `{root}/`, one folder per setting:",
    ]
    for s in sorted(settings, key=_setting_order):
        rules = sorted({r.rule for r in settings[s]}, key=_rule_order)
        n = len(settings[s])
        lines.append(f"- `{root}/{s}/` — {n} run{'s' if n != 1 else ''}: {', '.join(rules)}")
    lines += [
        "",
        "Each run folder holds `config.json` (the resolved config), `metrics.jsonl` (one line per epoch), "
        "`summary.json` (status, final metrics, wall time, device, versions, git commit) and safetensors checkpoints.",
        f"Generated reports live in `{root}/_reports/`. All ± values use ddof=1 (sample std with Bessel correction).",
    ]
    # interrupted runs (their process is gone) say which command resumes them
    skip = list(col.problems) + [
        f"{r.path}: {unfinished_note(r)}" for r in col.runs if r.status != "finished"
    ]
    if skip:
        lines += ["", "## Skipped or unfinished", ""] + [f"- {p}" for p in skip]
    return "\n".join(lines) + "\n"


def planned_runs(cfgs: list) -> list[RunRecord]:
    """Run records for configs not trained yet (status ``planned``): what a sweep would produce."""
    from creditaudit.config import run_path, to_dict

    out = []
    for c in cfgs:
        path = run_path(c)
        out.append(
            RunRecord(
                c.setting,
                c.rule,
                c.arch_label or c.arch,
                c.seed,
                path,
                to_dict(c),
                {"status": "planned", "epochs_done": c.epochs},
                [],
            )
        )
    return out


def plan_markdown(cfgs: list, *, title: str, notes: Sequence[str] = ()) -> str:
    """The inventory's counts for the runs ``cfgs`` (nothing trained): check a plan against the
    study. ``notes``: what the profile trains otherwise than the study, one line each, with why."""
    said = (
        ["**Read otherwise by the profile:**", "", *(f"- {line}" for line in notes), ""]
        if notes
        else []
    )
    return (
        "\n".join(
            [
                f"# Training Inventory (plan): {title}",
                "",
                "Counts of the runs a sweep would train; nothing was trained.",
                "",
                *said,
                *count_sections(Inventory(planned_runs(cfgs)), planned=True),
            ]
        )
        + "\n"
    )


def _beyond_study(setting: str) -> bool:
    """A registry setting that is not one of the study's (``extended_rules``)."""
    from creditaudit.experiments import SETTINGS

    return setting in SETTINGS and not SETTINGS.get(setting).study


def _setting_order(name: str) -> tuple[int, str]:
    from creditaudit.experiments import SETTINGS

    names = SETTINGS.in_order()
    return (names.index(name) if name in names else len(names), name)
