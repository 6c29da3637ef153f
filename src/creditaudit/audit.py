"""The main job: train the main audit (docs/science.md §5: bp, fa, dfa, ep, sb, cb × 3 seeds, plus the
frozen-blocks baseline) and audit it; or audit a researcher's own rule the same way; or re-audit a
finished results folder without training.

The audit's profiles are views of the experiment registry's (``creditaudit.experiments``), which
scale data and epochs, never definitions: ``default`` is the ``cpu`` profile of the main-audit
setting (Fashion-MNIST, 20k examples, 6 epochs: 7 minutes on a 2-core CPU, chosen by measurement,
see docs/audit.md), ``double`` the same with twice the epochs, ``paper`` the study's.
"""
from __future__ import annotations

from pathlib import Path

from creditaudit import config as C
from creditaudit.config import TrainConfig
from creditaudit.experiments import PROFILES as SWEEP_PROFILES
from creditaudit.experiments import SETTINGS

MAIN_RULES = ("bp", "fa", "dfa", "ep", "sb", "cb")
SEEDS = (42, 123, 456)
BASELINE = "bp_frozen"
SETTING = "main_audit"


# audit profile -> (experiment-registry profile, epoch multiplier)
PROFILES = {"default": ("cpu", 1), "double": ("cpu", 2), "paper": ("paper", 1)}


def plan(rules: list[str], *, profile: str = "default", seeds: tuple[int, ...] = SEEDS, baseline: str | None = BASELINE,
         results: str = "results", setting: str = SETTING, overrides: tuple[str, ...] = ()) -> list[TrainConfig]:
    """The configs of the audit: every rule × seed, and the baseline × seed. EP first (the longest)."""
    if profile not in PROFILES:
        raise C.ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    name, factor = PROFILES[profile]
    prof = SWEEP_PROFILES[name]
    epochs = prof.epochs(SETTINGS.get(SETTING).epochs) * factor
    base = [*prof.overrides, f"epochs={epochs}", f"results={results}", f"setting={setting}", "progress=false", *overrides]
    names = list(dict.fromkeys([*rules, *([baseline] if baseline else [])]))
    cfgs = [C.apply_overrides(TrainConfig(), [*base, f"rule={r}", f"seed={s}"]) for r in names for s in seeds]
    cost = {"ep": 0, "cb": 1, "sb": 2, "vec": 3}
    return sorted(cfgs, key=lambda c: cost.get(c.rule.split("_")[0], 9))


def report_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"markdown": out / "audit.md", "html": out / "audit.html", **{n: out / f"audit_{n}.png" for n in ("norms", "cosines", "accuracy")}}
