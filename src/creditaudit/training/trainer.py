"""A training run in its run folder (docs/science.md §6): ``train(cfg)``.

``train(cfg)`` owns the run folder: it skips a finished run, resumes a killed one from its last
checkpoint (bit-identical to an uninterrupted run on the same device: data order and augmentation
are functions of (seed, epoch), and every RNG and optimizer state is checkpointed), records a
diverged or crashed run with its status, and appends one JSON line of metrics per epoch.

The folder's side of a run is a :class:`RunSession` — opened (skipped, or locked and resumed),
fed one record per epoch, closed with a status — so that one run (``train`` below) and a stack of
runs trained as one program (``training/stack.py``) keep their folders the same way.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from creditaudit import config, trackers, typedconfig
from creditaudit.config import TrainConfig
from creditaudit.diagnostics import due
from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint
from creditaudit.runs.folder import RunFolder
from creditaudit.runs.lock import RunLockLost, say
from creditaudit.runs.provenance import provenance
from creditaudit.training import run as training_run
from creditaudit.training.allocator import keep_freed_memory
from creditaudit.training.run import Run, StepCallback


# ---------------------------------------------------------------------------------------------
# One run: open or resume its folder, train its epochs, close it
# ---------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig, *, reporter: Reporter | None = None, stop_after: int | None = None
) -> dict:
    """Train (or resume, or skip) the run ``cfg`` names; return its summary.

    ``stop_after`` ends the session after that many epochs in total, leaving the run resumable
    with status ``interrupted`` (used by tests and by time-boxed workers).
    """
    cfg = prepare(cfg)
    reporter = reporter or Reporter()
    set_up_process(cfg)
    with open_session(cfg, reporter) as session:
        if not isinstance(session, RunSession):
            return session  # finished already
        with session.recording():
            ended = _train_epochs(session, reporter.on_step, stop_after)
        return ended or session.write_summary("finished")


def _train_epochs(
    session: RunSession, on_step: StepCallback | None, stop_after: int | None
) -> dict | None:
    """The epochs of the session's run still to train, after its epoch-0 probe; the closing
    summary when the run stops early (at ``stop_after``: interrupted; or diverged), else None."""
    run = session.run
    session.begin()
    while run.epoch < run.cfg.epochs:
        if stop_after is not None and run.epoch >= stop_after:
            return session.write_summary("interrupted")
        t0 = time.perf_counter()
        trained = training_run.train_epoch(run, on_step)
        ended = session.end_epoch(trained, time.perf_counter() - t0)
        if ended is not None:
            return ended
    return None


def prepare(cfg: TrainConfig) -> TrainConfig:
    """The config as a run folder records it: checked (:func:`config.checked`: once, where it
    entered, or here for a config built in Python), every option of the rule resolved; frozen."""
    return typedconfig.freeze(config.resolve_rule_options(config.checked(cfg)))


def set_up_process(cfg: TrainConfig) -> None:
    """This process's side of a run: torch's CPU threads (``threads``; 0 leaves torch's), and
    large CPU tensors reusing freed pages (training/allocator.py)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()


@dataclass
class Reporter:
    """What the trainer tells the outside world (the CLI shows a progress bar from it)."""

    on_start: Callable[[Run | None, str], None] = lambda run, how: None
    on_step: StepCallback | None = None
    on_epoch: Callable[[Run, dict], None] = lambda run, record: None


# ---------------------------------------------------------------------------------------------
# A run's folder while it trains
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_session(
    cfg: TrainConfig,
    reporter: Reporter,
    *,
    build: Callable[[TrainConfig], Run] = training_run.build_run,
) -> Iterator[RunSession | dict]:
    """Hold ``cfg``'s run folder for the duration: yields its summary when the run is finished
    (nothing written), else an open :class:`RunSession` (locked, resumed). The data, model and rule
    are built (``build``) before the folder is touched: a config that cannot run fails first."""
    done = finished_summary(cfg)
    if done is not None:
        reporter.on_start(None, "skipped")
        yield done
        return
    run = build(cfg)
    folder = RunFolder(config.run_path(cfg))
    folder.path.mkdir(parents=True, exist_ok=True)
    with folder.lock() as lock:
        folder.check_config(lambda stored: config.semantic_diff(stored, cfg))
        summary = folder.read_summary()
        if summary is not None and summary.get("status") == "finished":  # finished meanwhile
            reporter.on_start(None, "skipped")
            yield summary
            return
        yield RunSession(run, folder, lock, reporter, summary)


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The summary of ``cfg``'s run when its folder holds it finished (with this config), else None."""
    folder = RunFolder(config.run_path(cfg))
    if not folder.summary_path.exists() or folder.status() != "finished":
        return None
    folder.check_config(lambda stored: config.semantic_diff(stored, cfg))
    return folder.read_summary()


class RunSession:
    """The folder of a run this process holds the lock of: resumed from its last checkpoint,
    config written, a ``running`` summary; then one record per epoch and a closing status."""

    def __init__(
        self, run: Run, folder: RunFolder, lock: Any, reporter: Reporter, previous: dict | None
    ):
        self.run, self.folder, self.lock, self.reporter = run, folder, lock, reporter
        resumed_from = _resume(run, folder)
        folder.write_config(config.to_dict(run.cfg))
        self.base = _summary_base(run, folder, resumed_from, previous)
        # logger=tensorboard|mlflow|wandb: a view of the folder's metrics; it never raises (a
        # failure is one line on stderr)
        self.tracker = trackers.start(
            run.cfg, folder.path, resumed_from=resumed_from, records=folder.read_metrics()
        )
        self.summary: dict | None = None  # the closing summary, once closed
        self.write_summary("running")
        reporter.on_start(run, "resumed" if resumed_from else "started")

    def check_lock(self) -> None:
        """Raise :class:`RunLockLost` when this process no longer holds the folder's lock (its
        lease ran out while it was paused or cut off, and another process took the run over):
        from then on the folder is the other process's, and nothing more is written to it."""
        if self.lock is not None and self.lock.lost:
            raise RunLockLost(self.folder.path, self.lock.lost)

    def write_summary(self, status: str, **extra: Any) -> dict:
        if self.lock is not None and self.lock.lost:  # the folder is another process's now
            return {**self.base, "status": status, "epochs_done": self.run.epoch, **extra}
        records = self.folder.read_metrics()
        s = {
            **self.base,
            "status": status,
            "epochs_done": self.run.epoch,
            "wall_s": round(self.run.wall_s, 3),
            "final": records[-1] if records else None,
            **extra,
        }
        self.folder.write_summary(s)
        if status != "running":
            self.tracker.finish(status)
            self.summary = s
        return s

    def begin(self, figures: dict[str, float] | None = None) -> None:
        """The epoch-0 diagnostics, before any update (when due and not yet logged); ``figures``
        when they were taken already (a stack takes its runs' together, with ``time/diag_s``)."""
        cfg, run = self.run.cfg, self.run
        if run.epoch == 0 and due(cfg.diag, 0, cfg.epochs)[0]:
            t0 = time.perf_counter()
            if figures is None:
                figures = {
                    **training_run.diagnose(run, full=due(cfg.diag, 0, cfg.epochs)[1]),
                    "time/diag_s": time.perf_counter() - t0,
                }
            record0 = {"epoch": 0, **figures}
            self.folder.append_metrics(record0)
            self.tracker.log(record0, step=0)

    def end_epoch(
        self,
        trained: dict[str, float],
        t_train: float,
        *,
        test: tuple[float, float] | None = None,
        figures: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict | None:
        """Close the epoch just trained (``run.epoch`` not yet advanced): its record
        (:func:`_epoch_record`; ``test``, ``figures`` when taken already) appended and logged,
        then its checkpoints. Returns the closing summary when the run diverged, else None."""
        run = self.run
        self.check_lock()
        t0 = time.perf_counter() - t_train - (figures or {}).get("time/diag_s", 0.0)
        run.epoch += 1
        record = _epoch_record(run, trained, t_train, test=test, figures=figures, extra=extra)
        record["time/epoch_s"] = time.perf_counter() - t0
        run.wall_s += record["time/epoch_s"]
        self.folder.append_metrics(record)
        self.tracker.log(record, step=run.epoch)
        self.reporter.on_epoch(run, record)
        if not math.isfinite(record["train/loss"]):
            return self.write_summary(
                "diverged",
                error=f"training loss became {record['train/loss']} in epoch {run.epoch}",
            )
        _save_checkpoints(run, self.folder)
        return None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """From here on, a crash or an interrupt is recorded in the summary, then re-raised."""
        try:
            yield
        except KeyboardInterrupt:
            self.write_summary("interrupted")
            raise
        except Exception as exc:
            self.write_summary("failed", error=f"{type(exc).__name__}: {exc}")
            raise


# ---------------------------------------------------------------------------------------------
# The session's parts: resume, the summary's fixed fields, an epoch's record, the checkpoints
# ---------------------------------------------------------------------------------------------
def _resume(run: Run, folder: RunFolder) -> int | None:
    """Restore ``run`` from the folder's last checkpoint and keep the metrics up to it (lines
    written after it are recomputed identically); the epoch resumed from, or None for a fresh
    start (no checkpoint, or a record it is past was lost: only training again logs it)."""
    if not folder.last_checkpoint.exists():
        folder.rewrite_metrics([])
        return None
    state, meta = load_checkpoint(folder.last_checkpoint, device=run.device)
    kept = [r for r in folder.read_metrics() if r["epoch"] <= int(meta["epoch"])]
    missing = _missing_epochs(run.cfg, kept, int(meta["epoch"]))
    if missing:
        say(
            f"{folder.path}: metrics.jsonl lacks epoch(s) {', '.join(map(str, missing))} that its "
            f"checkpoint (epoch {meta['epoch']}) is past (a torn or lost line): training it again "
            "from epoch 0, so that every epoch is logged"
        )
        folder.rewrite_metrics([])
        return None
    training_run.restore(run, state, meta)
    folder.rewrite_metrics(kept)
    return run.epoch


def _missing_epochs(cfg: TrainConfig, records: list[dict], epoch: int) -> list[int]:
    """The epochs up to ``epoch`` that a run's records should hold and do not (epoch 0 when its
    probe was due)."""
    have = {r.get("epoch") for r in records}
    first = 0 if due(cfg.diag, 0, cfg.epochs)[0] else 1
    return [e for e in range(first, epoch + 1) if e not in have]


def _summary_base(
    run: Run, folder: RunFolder, resumed_from: int | None, previous: dict | None
) -> dict[str, Any]:
    """The fields every summary of this session holds: what the run is, where it ran (provenance),
    the epoch it resumed from, and when it first started."""
    cfg = run.cfg
    return {
        "run": folder.path.name,
        "setting": cfg.setting,
        "rule": cfg.rule,
        "arch": cfg.arch,
        "dataset": cfg.data.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "device": str(run.device),
        "provenance": provenance(run.device),
        "resumed_from": resumed_from,
        "started": (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _epoch_record(
    run: Run,
    trained: dict[str, float],
    t_train: float,
    *,
    test: tuple[float, float] | None,
    figures: dict[str, float] | None,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The record of the epoch just trained (``run.epoch`` advanced already): the training
    figures, the test loss and accuracy (evaluated unless ``test`` gives them), the learning rate,
    the diagnostics when due and the loss is finite (taken unless ``figures`` are those taken
    already, with their ``time/diag_s``), then ``extra``."""
    cfg = run.cfg
    record: dict[str, Any] = {"epoch": run.epoch, **trained}
    record["test/loss"], record["test/acc"] = test or training_run.evaluate(
        run.model, run.data.x_test, run.data.y_test, cfg.eval_batch_size
    )
    record["lr"] = cfg.optim.lr * training_run.lr_factor(cfg, run.step, run.total_steps)
    record["time/train_s"] = t_train
    wanted, full = due(cfg.diag, run.epoch, cfg.epochs)
    if wanted and math.isfinite(record["train/loss"]):
        t0 = time.perf_counter()
        if figures is None:
            figures = {
                **training_run.diagnose(run, full=full),
                "time/diag_s": time.perf_counter() - t0,
            }
        record.update(figures)
    record.update(extra or {})
    return record


def _save_checkpoints(run: Run, folder: RunFolder) -> None:
    """The checkpoint a killed run resumes from (every state: model, rule, optimizer, RNGs), and
    the model and rule after this epoch when ``save_epochs`` keeps it."""
    save_checkpoint(folder.last_checkpoint, training_run.run_state(run), training_run.run_meta(run))
    if run.epoch in run.cfg.save_epochs:
        save_checkpoint(
            folder.epoch_checkpoint(run.epoch),
            {"model": run.model.state_dict(), "rule": run.rule.state_dict()},
            training_run.run_meta(run),
        )
