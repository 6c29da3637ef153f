"""Every registered rule × every architecture × every variant, through the conformance kit that a
rule's author runs on their own rule (``creditaudit.testing``; timm's test_models style: nobody has
to remember to add a new rule or architecture here). One training step through the real trainer
path (finite loss and rule metrics, credits of the right shape, finite and detached, the parameters
that should move do and frozen ones do not, no layer left patched); typed, documented, valid
options; the same seed gives the same metrics; a checkpoint resumes bit for bit; a rule that says
it stacks does. This is the one place these properties are tested for every rule; the rule files'
own tests pin their math."""

from __future__ import annotations

import pytest

from creditaudit.rules import RULES
from creditaudit.rules.base import VARIANTS
from creditaudit.testing import (
    check_options,
    check_resume,
    check_same_seed,
    check_stack,
    check_step,
)


@pytest.fixture(params=RULES.names())
def rule(request):
    return request.param


@pytest.mark.parametrize("variant", ["", *(f"_{v}" for v in VARIANTS)])
def test_one_step_moves_what_it_should(rule, arch, variant):
    check_step(rule, arch, variant)


def test_options_are_typed_documented_and_valid(rule):
    check_options(rule)


def test_same_seed_same_metrics(rule):
    check_same_seed(rule)


def test_a_checkpoint_resumes_bit_for_bit(rule):
    check_resume(rule)


def test_a_rule_that_says_it_stacks_takes_each_runs_own_step_in_a_stack(rule):
    seen = check_stack(rule)
    assert seen.startswith("runs alone") == (RULES.get(rule).stack_refusal is not None), seen
