"""Credit-assignment rules by name. Importing this package registers every built-in rule: each
module of this package (one rule a file) registers itself with ``@RULES.register``."""

import importlib
import pkgutil

from creditaudit.rules.base import (
    RULES,
    VARIANTS,
    NoOptions,
    Rule,
    RuleContext,
    build_rule,
    parse_rule_name,
    rule_options,
)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in ("base", "options", "plugins"):
        importlib.import_module(f"{__name__}.{_module.name}")

from creditaudit.rules.plugins import load_entry_point_rules, load_rule_file  # noqa: E402

load_entry_point_rules()

__all__ = [
    "RULES",
    "VARIANTS",
    "NoOptions",
    "Rule",
    "RuleContext",
    "build_rule",
    "load_rule_file",
    "parse_rule_name",
    "rule_options",
]
