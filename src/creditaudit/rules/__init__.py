"""Credit-assignment rules by name. Importing this package registers every built-in rule: each
module of this package (one rule a file) registers itself with ``@RULES.register``."""
import importlib
import pkgutil

from creditaudit.rules.base import RULES, VARIANTS, NoOptions, Rule, RuleContext, build_rule, parse_rule_name, rule_options

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RULES", "VARIANTS", "NoOptions", "Rule", "RuleContext", "build_rule", "parse_rule_name", "rule_options"]
