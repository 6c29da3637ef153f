"""creditaudit: train networks with backprop and its alternatives, and audit their credit assignment.

The verbs of the command line as functions (``creditaudit.api``), with the same defaults and the
same results on disk:

    import creditaudit
    run = creditaudit.train(rule="dfa", dataset="digits", epochs=3)
    result = creditaudit.audit(rules=["bp", "dfa"], dataset="digits", epochs=3)
    result.to_frame()

``train``, ``audit``, ``sweep``, ``plan``, ``tables``, ``inventory``, ``load``, ``make_config``; the
conformance kit for a rule of your own is ``creditaudit.testing.check_rule``.
"""

from __future__ import annotations

from creditaudit._version import __version__

_API = (
    "train",
    "train_many",
    "audit",
    "sweep",
    "plan",
    "tables",
    "inventory",
    "load",
    "make_config",
    "RunResult",
    "AuditResult",
    "SweepResult",
    "TablesResult",
)
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    """The API's names, imported on first use (``import creditaudit`` alone loads no torch)."""
    if name in _API:
        from creditaudit import api

        return getattr(api, name)
    raise AttributeError(f"module 'creditaudit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
