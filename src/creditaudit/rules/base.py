"""The interface every credit-assignment rule implements, and the rule registry.

A rule turns a batch into credits a_0..a_L (``a_l ≈ g_l = d CE_i / d h_l``, the shape of h_l).
The trainer feeds them through the shared local update (DESIGN §1, ``creditaudit.train.local``);
only ``end_to_end`` rules (plain BP) are instead trained by autograd on the CE loss.

To add a rule: subclass :class:`Rule`, implement :meth:`Rule.credits` (and :meth:`Rule.step` when the
rule trains an estimator of its own), and register it with ``@RULES.register("name", "one line")``.
Nothing in the trainer changes. Variants are derived by name for any rule: ``<rule>_frozen`` keeps
the blocks at their random init (only embedding, terminal norm and head learn, the embedding from the
rule's own credit a_0) and ``<rule>_shallow`` uses L=0.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet, Forward
from creditaudit.registry import Registry, UnknownNameError

VARIANTS = ("frozen", "shallow")


class Rule:
    """Base class of a credit-assignment rule (one instance per run)."""

    #: trained end to end by autograd on CE (BP); otherwise through the local update
    end_to_end: ClassVar[bool] = False

    def setup(self, model: CreditNet, device: torch.device) -> None:
        """Build the rule's state (feedback matrices, estimators) for ``model``.

        Called right after the model is built, while it is still on the CPU and torch's global RNG
        is still seeded from the run seed: draw random state here on the CPU (reproducible from the
        seed alone, whatever the device) and then place it on ``device``, where the model will live.
        """

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        """Credits a_0..a_L for this batch, detached, ``credits[l].shape == fwd.hs[l].shape``.

        ``fwd`` is the local-update forward pass (each block saw a detached input); use
        ``fwd.hs[l].detach()`` as the state values.
        """
        raise NotImplementedError

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        """Train the rule's own estimator on this batch, after the model's update; return scalar
        metrics (logged as ``rule/<key>``, averaged over the epoch). Default: nothing to train."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, nested dicts/lists of them, numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but a checkpoint holds {sorted(state)}")


RULES: Registry[type[Rule]] = Registry("rule")


def parse_rule_name(name: str) -> tuple[str, str | None]:
    """``"dfa_frozen"`` -> ``("dfa", "frozen")``; ``"bp"`` -> ``("bp", None)``. Unknown -> error."""
    if name in RULES:
        return name, None
    base, _, variant = name.rpartition("_")
    if variant in VARIANTS and base in RULES:
        return base, variant
    raise UnknownNameError(
        RULES.unknown_message(name).replace("(see", f"(each also as <rule>_{'/_'.join(VARIANTS)}; see")
    )


def build_rule(name: str) -> tuple[Rule, str | None]:
    base, variant = parse_rule_name(name)
    return RULES.get(base)(), variant
