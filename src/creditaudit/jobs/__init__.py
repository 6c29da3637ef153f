"""Running many runs: parallel single-thread worker processes on one machine (``processes``) or
one Ray task per run on a cluster (``ray_backend``)."""

from creditaudit.jobs.processes import RunOutcome, in_processes, run_many
from creditaudit.jobs.progress import JobProgress

__all__ = ["JobProgress", "RunOutcome", "in_processes", "run_many"]
