"""The main job: train the main audit (DESIGN §5: bp, fa, dfa, ep, sb, cb × 3 seeds, plus the
frozen-blocks baseline) and audit it; or audit a researcher's own rule the same way; or re-audit a
finished results folder without training.

Profiles scale data and epochs, never definitions. ``default`` fits a 2-core CPU without a GPU in
about 15 minutes (chosen by measurement, see docs/audit.md); ``paper`` is the study's: CIFAR-10,
100 epochs, the full training set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from creditaudit import config as C
from creditaudit.config import TrainConfig

MAIN_RULES = ("bp", "fa", "dfa", "ep", "sb", "cb")
SEEDS = (42, 123, 456)
BASELINE = "bp_frozen"
SETTING = "main_audit"


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    overrides: tuple[str, ...]


PROFILES = {
    p.name: p
    for p in (
        Profile("default", "Fashion-MNIST, 20k training examples, 6 epochs: within 15 min on a 2-core CPU",
                ("dataset=fashion_mnist", "train_subset=20000", "epochs=6")),
        Profile("double", "the default profile with twice the epochs (the check that the verdicts are stable)",
                ("dataset=fashion_mnist", "train_subset=20000", "epochs=12")),
        Profile("paper", "the study: CIFAR-10, full training set, 100 epochs (a GPU)", ("dataset=cifar10", "epochs=100")),
    )
}


def plan(rules: list[str], *, profile: str = "default", seeds: tuple[int, ...] = SEEDS, baseline: str | None = BASELINE,
         results: str = "results", setting: str = SETTING, overrides: tuple[str, ...] = ()) -> list[TrainConfig]:
    """The configs of the audit: every rule × seed, and the baseline × seed. EP first (the longest)."""
    if profile not in PROFILES:
        raise C.ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    base = [*PROFILES[profile].overrides, f"results={results}", f"setting={setting}", "progress=false", *overrides]
    names = list(dict.fromkeys([*rules, *([baseline] if baseline else [])]))
    cfgs = [C.apply_overrides(TrainConfig(), [*base, f"rule={r}", f"seed={s}"]) for r in names for s in seeds]
    cost = {"ep": 0, "cb": 1, "sb": 2, "vec": 3}
    return sorted(cfgs, key=lambda c: cost.get(c.rule.split("_")[0], 9))


def report_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"markdown": out / "audit.md", "html": out / "audit.html", **{n: out / f"audit_{n}.png" for n in ("norms", "cosines", "accuracy")}}
