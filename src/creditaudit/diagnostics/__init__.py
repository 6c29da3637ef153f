"""Diagnostics (docs/science.md §4): the per-epoch probe of a run, and the verdicts drawn from its log."""

from creditaudit.diagnostics.probe import DiagConfig, due, probe

__all__ = ["DiagConfig", "due", "probe"]
