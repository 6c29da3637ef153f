"""Golden numbers (torchtune style): a seeded tiny run per rule, whose training losses after its
first updates must match stored values. The loss of the first batch is left out: it is taken
before any update, from the same initial model and data for every rule, so it pins nothing a rule
computes. A change of these numbers is a change of what a rule computes: if it is intended,
regenerate with

    CREDITAUDIT_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py

and say why in the commit message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from creditaudit.rules import RULES
from creditaudit.training.run import build_run, train_step
from tests.conftest import tiny_config

GOLDEN = Path(__file__).parent / "golden" / "first_losses.json"
STEPS = 5  # losses pinned per rule: those of batches 2..STEPS + 1, after 1..STEPS updates
BUILTIN_RULES = [
    e.name for e in RULES.entries() if e.obj.__module__.startswith("creditaudit.rules.")
]


def first_losses(tmp_path, rule: str) -> list[float]:
    """The training losses of batches 2..STEPS + 1 (each taken before that batch's update), per sample."""
    torch.set_num_threads(1)
    # The stored values are CPU float32 values: a GPU rounds differently (checked on one: within 1e-3).
    cfg = tiny_config(tmp_path, f"rule={rule}", "d=16", "L=2", "batch_size=32", "device=cpu")
    run = build_run(cfg)
    losses = []
    for i, (x, y) in enumerate(run.loader.epoch(0)):
        if i == STEPS + 1:
            break
        loss, _, _ = train_step(run, x, y)
        losses.append(loss.item() / y.shape[0])
    return losses[1:]  # the first is every rule's: no update has happened yet


@pytest.mark.parametrize("rule", BUILTIN_RULES)
def test_first_losses_match_the_stored_values(tmp_path, rule):
    got = first_losses(tmp_path, rule)
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("CREDITAUDIT_REGEN_GOLDEN") == "1":
        stored[rule] = got
        GOLDEN.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"regenerated golden numbers for {rule}")
    assert rule in stored, (
        f"no golden numbers for rule {rule!r}: regenerate them (see this module's docstring)"
    )
    # float32 on CPU: identical on one platform; the tolerance allows for other BLAS builds.
    assert got == pytest.approx(stored[rule], rel=1e-4, abs=1e-6)


def test_every_stored_loss_depends_on_the_rule():
    """What the golden numbers exist for: no pinned step is one that every rule shares (as the loss
    before any update is)."""
    stored = json.loads(GOLDEN.read_text())
    assert all(len(losses) == STEPS for losses in stored.values())
    shared = [i for i in range(STEPS) if len({losses[i] for losses in stored.values()}) == 1]
    assert not shared, f"steps {shared} hold the same loss for every rule"


@pytest.mark.parametrize("rule", BUILTIN_RULES)
def test_the_first_steps_lower_the_loss_of_a_fixed_batch(tmp_path, rule):
    """The run learns: after the golden steps, the loss of one fixed batch (the first) is lower."""
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path, f"rule={rule}", "d=16", "L=2", "batch_size=32", "device=cpu")
    run = build_run(cfg)
    batches = list(run.loader.epoch(0))[:STEPS]
    x0, y0 = batches[0]

    def fixed_loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(run.model(x0), y0).item()

    before = fixed_loss()
    for x, y in batches:
        train_step(run, x, y)
    assert fixed_loss() < before
