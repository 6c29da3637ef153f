"""Checks of a rule's options, one way for every rule (the public import path for a rule's author).

Each ``Options`` dataclass checks its values in ``__post_init__`` with these helpers:

    @dataclass
    class MyOptions:
        scale: float = field(default=1.0, metadata={"help": "std of the feedback matrices"})

        def __post_init__(self) -> None:
            check_positive("scale", self.scale)

A bad value fails when the config is validated (building the options is part of validation), never
later when a run has started, with one line naming ``<rule>.<option>=value`` and what is expected:
the rule's registry name is added where the options are built for a rule
(:func:`creditaudit.rules.base.rule_options`), so an ``Options`` class never writes it.
"""

from __future__ import annotations

import math
from typing import Any

from creditaudit.errors import ConfigError


class OptionError(ConfigError):
    """A rule option outside its domain: ``option``, the ``value`` given and what is ``expected``."""

    def __init__(self, option: str, value: Any, expected: str, rule: str = ""):
        self.option, self.value, self.expected, self.rule = option, value, expected, rule
        where = f"{rule}.{option}" if rule else option
        super().__init__(f"{where}={value!r}: expected {expected}")

    def for_rule(self, rule: str) -> OptionError:
        """The same error, naming the rule."""
        return OptionError(self.option, self.value, self.expected, rule)


def check(option: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise OptionError(option, value, expected)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    check(option, value, value in choices, f"one of {', '.join(choices)}")


def check_positive(option: str, value: float) -> None:
    check(option, value, value > 0 and math.isfinite(value), "a finite number > 0")


def check_nonnegative(option: str, value: float) -> None:
    check(option, value, value >= 0 and math.isfinite(value), "a finite number >= 0")


def check_at_least(option: str, value: int, low: int, note: str = "") -> None:
    check(option, value, value >= low, f"an integer >= {low}{note}")


def check_fraction(option: str, value: float) -> None:
    check(option, value, 0 <= value <= 1, "a number in [0, 1]")
