"""The conformance kit (``creditaudit.testing``): it passes the example rule of ``examples/`` and
catches each way a rule can break the contract, saying what to fix; ``creditaudit check-rule`` prints
its checks and exits 1 on a failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.rules import RULES, Rule
from creditaudit.testing import (
    RuleCheckError,
    check_options,
    check_resume,
    check_rule,
    check_same_seed,
    check_stack,
    check_step,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rules" / "sparse_dfa.py"


@pytest.fixture
def registry(monkeypatch):
    """Rules registered by a test are gone after it (the other tests walk the registry)."""
    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))
    return RULES


class _Projection(Rule):
    """a_l = e_T projected by fixed random matrices (a correct rule the broken ones below vary)."""

    stack_refusal = None

    def setup(self, model, ctx):
        self.B = [torch.randn(torch.Size(s).numel(), ctx.num_classes) / 3 for s in ctx.state_shapes]

    def error(self, fwd, y):
        return torch.softmax(fwd.logits.detach(), 1) - torch.nn.functional.one_hot(
            y, fwd.logits.shape[1]
        )

    def credits(self, model, x, y, fwd):
        e = self.error(fwd, y)
        return [(e @ B.T).view_as(h) for B, h in zip(self.B, fwd.hs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"B": list(self.B)}

    def load_state_dict(self, state):
        self.B = list(state["B"])


def test_the_example_rule_passes_every_check():
    results = check_rule(EXAMPLE)
    assert all(c.passed for c in results) and len(results) == 13
    assert any(c.name == "stack" and "each run's own step" in c.detail for c in results)


def test_a_correct_rule_passes(registry):
    registry.register("kit_ok")(type("KitOk", (_Projection,), {}))
    check_step("kit_ok", "smallcnn")
    check_resume("kit_ok")
    assert check_stack("kit_ok") == "a stacked step is each run's own step"


@pytest.mark.parametrize(
    "broken, check, message",
    [
        (
            {
                "credits": lambda self, model, x, y, fwd: [
                    a.requires_grad_(True) for a in _Projection.credits(self, model, x, y, fwd)
                ]
            },
            check_step,
            "requires grad .* return detached credits",
        ),
        (
            {
                "credits": lambda self, model, x, y, fwd: [
                    a.flatten(1) for a in _Projection.credits(self, model, x, y, fwd)
                ]
            },
            lambda name: check_step(name, "smallcnn"),
            "a_0 is .*give a_l the shape and dtype of h_l",
        ),
        (
            {
                "credits": lambda self, model, x, y, fwd: _Projection.credits(
                    self, model, x, y, fwd
                )[:1]
            },
            check_step,
            "1 credits for 4 states",
        ),
        (
            {
                "credits": lambda self, model, x, y, fwd: [
                    a * 0 for a in _Projection.credits(self, model, x, y, fwd)
                ]
            },
            check_step,
            "did not move .* non-zero credit",
        ),
        (
            {
                "setup": lambda self, model, ctx: setattr(
                    self,
                    "B",
                    [
                        torch.randn(
                            torch.Size(s).numel(),
                            ctx.num_classes,
                            generator=torch.Generator().manual_seed(torch.seed() % 2**31),
                        )
                        for s in ctx.state_shapes
                    ],
                )
            },
            check_same_seed,
            "two runs of one seed differ .* draw every random number in setup",
        ),
        (
            {
                "step": lambda self, model, x, y, fwd: (
                    setattr(self, "B", [b * 1.01 for b in self.B]),
                    {},
                )[1],  # state that changes ...
                "state_dict": lambda self: {},
                "load_state_dict": lambda self, state: None,
            },  # ... and is not checkpointed
            check_resume,
            "resumed run differs .* state_dict",
        ),
    ],
)
def test_each_broken_contract_is_caught_and_says_what_to_fix(registry, broken, check, message):
    registry.register("kit_broken")(type("KitBroken", (_Projection,), broken))
    with pytest.raises(RuleCheckError, match=message):
        check("kit_broken")


def test_a_rule_that_cannot_stack_but_says_it_can_or_leaves_a_layer_patched_is_caught(registry):
    class Autograd(_Projection):
        def credits(self, model, x, y, fwd):  # torch.autograd.grad: no run axis under vmap
            with torch.enable_grad():
                h = fwd.hs[-1].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(
                    torch.nn.functional.cross_entropy(model.readout(h), y, reduction="sum"), h
                )
            return [*super().credits(model, x, y, fwd)[:-1], g.detach()]

    class Patching(_Projection):
        stack_refusal = "patches layers"

        def local_forward(self, model):
            import contextlib

            model.head.forward = model.head.forward  # patched, never restored
            return contextlib.nullcontext()

    registry.register("kit_autograd")(Autograd)
    check_step("kit_autograd")  # alone it is a fine rule
    with pytest.raises(RuleCheckError, match=r"a stack of two runs fails .* set stack_refusal"):
        check_stack("kit_autograd")
    registry.register("kit_patch")(Patching)
    with pytest.raises(RuleCheckError, match=r"still patched .* restore every patched forward"):
        check_step("kit_patch")
    assert check_stack("kit_patch") == "runs alone (patches layers)"


def test_options_without_help_or_with_bad_defaults_are_caught(registry):
    from dataclasses import dataclass, field

    from creditaudit.rules.options import check_positive

    @dataclass
    class NoHelp:
        scale: float = 1.0

    @dataclass
    class BadDefault:
        scale: float = field(default=0.0, metadata={"help": "a scale"})

        def __post_init__(self) -> None:
            check_positive("scale", self.scale)

    registry.register("kit_nohelp")(type("KitNoHelp", (_Projection,), {"Options": NoHelp}))
    registry.register("kit_baddefault")(
        type("KitBadDefault", (_Projection,), {"Options": BadDefault})
    )
    with pytest.raises(RuleCheckError, match=r"kit_nohelp\.scale has no help text"):
        check_options("kit_nohelp")
    with pytest.raises(
        RuleCheckError, match=r"default options do not validate .*kit_baddefault\.scale=0\.0"
    ):
        check_options("kit_baddefault")
    results = check_rule("kit_nohelp", archs=("resmlp",), variants=False, raise_on_failure=False)
    assert [c.name for c in results if not c.passed] == ["options"]
    with pytest.raises(RuleCheckError, match=r"kit_nohelp: 1 of 5 checks failed"):
        check_rule("kit_nohelp", archs=("resmlp",), variants=False)


def test_check_rule_on_the_command_line(registry):
    res = CliRunner().invoke(
        main, ["check-rule", str(EXAMPLE), "--arch", "resmlp", "--no-variants"]
    )
    assert res.exit_code == 0, res.output
    assert "sparse_dfa: 5 of 5 checks passed" in res.output
    registry.register("kit_cli")(
        type(
            "KitCli",
            (_Projection,),
            {
                "step": lambda self, model, x, y, fwd: (
                    setattr(self, "B", [b * 1.01 for b in self.B]),
                    {},
                )[1],
                "state_dict": lambda self: {},
                "load_state_dict": lambda self, s: None,
            },
        )
    )
    res = CliRunner().invoke(main, ["check-rule", "kit_cli", "--arch", "resmlp", "--no-variants"])
    assert (
        res.exit_code == 1
        and "FAIL checkpoint resumes bit for bit" in res.output
        and "1 of 5 checks failed" in res.output
    )
    res = CliRunner().invoke(main, ["check-rule", "no_such_rule"])
    assert res.exit_code == 2 and "unknown rule 'no_such_rule'" in res.output
