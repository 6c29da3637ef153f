"""Credit-assignment rules by name. Importing this package registers every built-in rule."""
from creditaudit.rules.base import RULES, VARIANTS, Rule, build_rule, parse_rule_name
from creditaudit.rules import bp  # noqa: F401  (registration)

__all__ = ["RULES", "VARIANTS", "Rule", "build_rule", "parse_rule_name"]
