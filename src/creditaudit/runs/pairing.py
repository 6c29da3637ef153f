"""The one pairing rule between a run and its frozen-blocks baseline (diagnostic D3, docs/audit.md).

A run's baseline is the run of the baseline rule (``bp_frozen`` by default) with the same
*experiment*: the same architecture and model, data, seed, epochs, batch size and optimizer recipe,
wherever it lives in the results folder. What may differ is how credit is assigned (rule, its
options, the local rule, the penalty — the baseline's blocks do not train), what is only logged
(diagnostics' cadence, trajectories, extra checkpoints) and fields that never change results
(where and how it ran, folder names).

Every report (audit, tables, inventory, notebook) pairs through :func:`find_baseline`, and a sweep
``--with-baselines`` derives the baselines it trains through :func:`experiment_key`, so the run a
sweep trains as a baseline is, by construction, the one the reports pair with.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

BASELINE_RULE = "bp_frozen"
# The setting that holds the baselines a sweep adds (``--with-baselines``) where the study lists none.
CONTROLS = "controls"

# Config fields that a run and its baseline may differ in, besides those that never change what a
# run computes (marked semantic=False in the config).
CREDIT_FIELDS = ("rule", "rule_opts", "local_rule", "lam", "plugins")
LOGGING_FIELDS = ("diag", "save_epochs")
# Where a baseline is looked for first, after the run's own setting.
BASELINE_SETTINGS = ("frozen_baselines", CONTROLS)


@functools.lru_cache(maxsize=1)
def _place_paths() -> tuple[str, ...]:
    """The config's semantic=False fields (read once: every pairing of a report asks for them)."""
    from creditaudit.config import TrainConfig
    from creditaudit.typedconfig import non_semantic_paths

    return tuple(non_semantic_paths(TrainConfig))


def experiment_key(config: dict[str, Any]) -> str:
    """What a run shares with its baseline, as a canonical string (a config as in ``config.json``)."""
    kept = json.loads(
        json.dumps({k: v for k, v in config.items() if k not in CREDIT_FIELDS + LOGGING_FIELDS})
    )
    for path in _place_paths():
        *parents, leaf = path.split(".")
        node = kept
        for p in parents:
            node = node.get(p) or {}
        node.pop(leaf, None)
    return json.dumps(kept, sort_keys=True)


class _Run(Protocol):
    rule: str
    setting: str
    path: Path
    config: dict[str, Any]


R = TypeVar("R", bound=_Run)


def find_baseline(run: _Run, candidates: Iterable[R], baseline: str = BASELINE_RULE) -> R | None:
    """The ``baseline`` run of ``run``'s experiment among ``candidates`` (finished runs of the whole
    results folder). Several matches (the same baseline trained in two settings) are equivalent;
    the run's own setting is preferred, then ``frozen_baselines``, then ``controls``, then by path."""
    key = experiment_key(run.config)
    matches = [c for c in candidates if c.rule == baseline and experiment_key(c.config) == key]
    if not matches:
        return None
    order = (run.setting, *BASELINE_SETTINGS)
    return min(
        matches,
        key=lambda c: (order.index(c.setting) if c.setting in order else len(order), str(c.path)),
    )


def missing_reason(baseline: str = BASELINE_RULE, setting: str | None = None) -> str:
    """Why D3 was not evaluated, and the command that trains what is missing."""
    fix = (
        f"`creditaudit sweep {setting} --with-baselines`"
        if setting
        else "`creditaudit sweep SETTING --with-baselines`"
    )
    return (
        f"no finished {baseline} run with the same architecture, data, seed and epochs in the results folder "
        f"({fix} trains it)"
    )
