"""Checks of a rule's options, one way for every rule: each ``Options`` dataclass checks its values
in ``__post_init__`` with these helpers, so a bad value fails when the config is validated (building
the options is part of validation), with one line naming ``<rule>.<option>=value`` and what is
expected — never later, when a run has started."""
from __future__ import annotations

import math
from typing import Any

from creditaudit.errors import ConfigError


def check(rule: str, option: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{rule}.{option}={value!r}: expected {expected}")


def check_choice(rule: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    check(rule, option, value, value in choices, f"one of {', '.join(choices)}")


def check_positive(rule: str, option: str, value: float) -> None:
    check(rule, option, value, value > 0 and math.isfinite(value), "a finite number > 0")


def check_nonnegative(rule: str, option: str, value: float) -> None:
    check(rule, option, value, value >= 0 and math.isfinite(value), "a finite number >= 0")


def check_at_least(rule: str, option: str, value: int, low: int, note: str = "") -> None:
    check(rule, option, value, value >= low, f"an integer >= {low}{note}")


def check_fraction(rule: str, option: str, value: float) -> None:
    check(rule, option, value, 0 <= value <= 1, "a number in [0, 1]")
