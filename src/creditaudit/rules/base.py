"""The interface every credit-assignment rule implements, and the rule registry.

A rule turns a batch into credits a_0..a_L (``a_l ≈ g_l = d CE_i / d h_l``, the shape of h_l).
The trainer feeds them through the shared local update (docs/science.md §1, ``creditaudit.training.objective``);
only ``end_to_end`` rules (plain BP) are instead trained by autograd on the CE loss.

To add a rule: subclass :class:`Rule`, implement :meth:`Rule.credits` (and :meth:`Rule.step` when the
rule trains an estimator of its own), and register it with ``@RULES.register("name", "one line")``.
Nothing in the trainer changes. Variants are derived by name for any rule: ``<rule>_frozen`` keeps
the blocks at their random init (only embedding, terminal norm and head learn, the embedding from the
rule's own credit a_0) and ``<rule>_shallow`` uses L=0.

Stacks. Several runs of one rule can train as one program with a leading run axis
(``creditaudit.training.stack``): the rule's code stays written for one run and ``torch.func.vmap``
adds the axis around it. A rule stacks when ``credits`` is a function of the model, the batch and
the rule's fixed state (tensors set in ``setup``, returned by ``state_dict``): derivatives taken with
``torch.func`` (``vjp``, ``grad``, ``jvp``) rather than ``torch.autograd.grad``, no random draw,
no state that changes during a step, no estimator of its own. Such a rule sets
``stack_refusal = None``; any other rule states why it cannot, and runs alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet, Forward
from creditaudit.registry import Registry, UnknownNameError
from creditaudit.rules.options import OptionError
from creditaudit.typedconfig import parse_value

VARIANTS = ("frozen", "shallow")

#: a rule's options type (its ``Options`` dataclass): ``class DFA(Rule[DFAOptions])`` types ``self.opts``
OptionsT = TypeVar("OptionsT")


@dataclass
class NoOptions:
    """This rule has no options."""


@dataclass(frozen=True)
class RuleContext:
    """What a rule may know about the run it serves."""

    device: torch.device  # where the model and the batches live
    num_classes: int
    steps_per_epoch: int
    total_steps: int  # optimizer steps over the whole run (for warm-ups and schedules)
    seed: int
    state_shapes: tuple[tuple[int, ...], ...] = ()  # per-sample shapes of h_0..h_L
    norm_shape: tuple[int, ...] = ()  # per-sample shape of z = N(h_L), the head's input


class Rule(Generic[OptionsT]):
    """Base class of a credit-assignment rule (one instance per run).

    ``Options`` is a dataclass of the rule's own settings (each field with ``metadata={"help": ...}``),
    set from the command line as ``<rule>.<field>=value`` (or ``<field>=value``) and stored, fully
    resolved, in the run's config under ``rule_opts``. A rule names it twice, as the class the
    registry builds and as the type of ``self.opts``: ``class DFA(Rule[DFAOptions])`` with
    ``Options = DFAOptions`` (a plain ``Rule`` subclass works too, its ``self.opts`` untyped).
    """

    #: the registry name, set by ``@RULES.register(name, ...)`` (never written by the rule itself)
    name: ClassVar[str] = ""
    #: trained end to end by autograd on CE (BP); otherwise through the local update
    end_to_end: ClassVar[bool] = False
    Options: ClassVar[type[Any]] = NoOptions
    #: why runs of this rule cannot train in a stack (module docstring), or None when they can
    stack_refusal: ClassVar[str | None] = (
        "not declared stackable by its author (see creditaudit.rules.base: Stacks)"
    )

    def __init__(self, options: OptionsT | None = None):
        self.opts: OptionsT = options if options is not None else self.Options()
        self._reported: dict[str, Tensor] = {}

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        """Build the rule's state (feedback matrices, estimators) for ``model``.

        Called right after the model is built, while it is still on the CPU and torch's global RNG
        is still seeded from the run seed: draw random state here on the CPU (reproducible from the
        seed alone, whatever the device) and then place it on ``ctx.device``, where the model will
        live. Estimators get their own optimizer here.
        """

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        """Credits a_0..a_L for this batch, detached, ``credits[l].shape == fwd.hs[l].shape``.

        ``fwd`` is the local-update forward pass (each block saw a detached input); use
        ``fwd.hs[l].detach()`` as the state values.
        """
        raise NotImplementedError

    def local_forward(self, model: CreditNet) -> contextlib.AbstractContextManager:
        """Context in which the trainer runs the local-update forward pass and its backward pass.

        Default: nothing changes. A rule whose *parameter* updates inside a block are not plain
        backprop (textbook FA: random matrices in place of weight transposes) patches the model's
        layers here; the credits are computed inside it too.
        """
        return contextlib.nullcontext()

    def report(self, **metrics: Tensor) -> None:
        """Log scalar tensors about this step's credits (``rule/<key>``, averaged over the epoch);
        called from ``credits``. The trainer collects them right after ``credits`` returns."""
        self._reported = {**getattr(self, "_reported", {}), **metrics}

    def reported(self) -> dict[str, Tensor]:
        """The metrics :meth:`report`-ed since the last call (and forget them)."""
        out, self._reported = getattr(self, "_reported", {}), {}
        return out

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        """Train the rule's own estimator on this batch, after the model's update; return scalar
        metrics (logged as ``rule/<key>``, averaged over the epoch). Default: nothing to train."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, nested dicts/lists of them, numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state but a checkpoint holds {sorted(state)}"
            )


class RuleRegistry(Registry[type[Rule]]):
    """The rule registry: registering a class under a name also gives the class that name
    (``Rule.name``, for its messages), so a rule's name is written once, in its registration."""

    def add(self, name: str, obj: type[Rule], summary: str = "") -> None:
        if not (isinstance(obj, type) and issubclass(obj, Rule)):
            raise TypeError(
                f"rule {name!r}: register a subclass of creditaudit.rules.Rule, not {obj!r}"
            )
        if "name" in vars(obj) and obj.name not in ("", name):
            raise ValueError(
                f"rule class {obj.__name__} is registered as {obj.name!r} and as {name!r}: one class, one name"
            )
        super().add(name, obj, summary)
        obj.name = name


RULES = RuleRegistry("rule")


def parse_rule_name(name: str) -> tuple[str, str | None]:
    """``"dfa_frozen"`` -> ``("dfa", "frozen")``; ``"bp"`` -> ``("bp", None)``. Unknown -> error."""
    if name in RULES:
        return name, None
    base, _, variant = name.rpartition("_")
    if variant in VARIANTS and base in RULES:
        return base, variant
    raise UnknownNameError(
        RULES.unknown_message(name).replace(
            "(see", f"(each also as <rule>_{'/_'.join(VARIANTS)}; see"
        )
    )


def rule_options(name: str, given: dict[str, Any] | None = None) -> Any:
    """The ``Options`` instance of rule ``name`` with ``given`` applied (strings are parsed by the
    field's type). An unknown option is one clear error listing the rule's options."""
    base, _ = parse_rule_name(name)
    cls = RULES.get(base).Options
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (given or {}).items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"rule {base!r} has no option {key!r} (its options: {known})")
        tp = hints[key]
        if isinstance(value, str) and tp is not str:
            value = parse_value(value, tp, f"{base}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except OptionError as e:  # the Options class names the option; the rule's name is added here
        raise e.for_rule(base) from None


def build_rule(name: str, options: dict[str, Any] | None = None) -> tuple[Rule, str | None]:
    """A fresh rule instance for ``name`` (variants included) and its variant."""
    base, variant = parse_rule_name(name)
    return RULES.get(base)(rule_options(name, options)), variant
