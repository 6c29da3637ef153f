"""Progress of a job of many runs: runs finished / total, failed, held by another process, elapsed,
and an ETA estimated from the epochs trained so far (runs found finished cost nothing and are left
out of the rate)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: outcomes that are failures: the run did not finish (a ``locked`` run is not one of them: another
#: process is training it)
FAILED = ("failed", "diverged", "interrupted")
HELD = "locked"


def clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class JobProgress:
    """``epochs``: run label -> its epochs; ``already``: labels finished before the job started."""

    epochs: dict[str, int]
    already: set[str] = field(default_factory=set)
    now: Callable[[], float] = time.monotonic
    start: float = -1.0
    done: int = 0
    failed: int = 0
    held: int = 0
    deaths: int = 0  # worker processes that died under a job (each job is started again once)
    epochs_trained: int = 0

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.now()

    @property
    def total(self) -> int:
        return len(self.epochs)

    @property
    def epochs_to_train(self) -> int:
        return sum(e for run, e in self.epochs.items() if run not in self.already)

    def update(self, run: str, status: str) -> None:
        self.done += 1
        self.failed += status in FAILED
        self.held += status == HELD
        if run not in self.already:
            self.epochs_trained += self.epochs.get(run, 0)

    def eta_s(self) -> float | None:
        """Seconds left at the rate of epochs trained so far (None before the first trained run)."""
        elapsed = self.now() - self.start
        if self.epochs_trained == 0 or elapsed <= 0:
            return None
        return (self.epochs_to_train - self.epochs_trained) * elapsed / self.epochs_trained

    def state(self) -> str:
        eta = self.eta_s()
        held = f", {self.held} held by another process" if self.held else ""
        deaths = f", {self.deaths} worker(s) died" if self.deaths else ""
        return f"{self.failed} failed{held}{deaths} · ETA {clock(eta) if eta is not None else '–'}"

    def line(self) -> str:
        return f"{self.done}/{self.total} runs, {self.state()}, {clock(self.now() - self.start)} elapsed"
