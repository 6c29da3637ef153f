"""Running many runs: parallel single-thread worker processes on one machine (DESIGN §8)."""
from creditaudit.sweep.local import RunOutcome, run_many

__all__ = ["RunOutcome", "run_many"]
