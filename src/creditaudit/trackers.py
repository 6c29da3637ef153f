"""Experiment trackers: stream a run's metrics and config to TensorBoard, MLflow or Weights & Biases (``logger=``).

The run folder stays the record (config.json, metrics.jsonl, summary.json); a tracker is a view
on it that researchers already have open. ``logger=tensorboard`` needs ``pip install
'creditaudit[tensorboard]'``, ``logger=mlflow`` needs ``pip install 'creditaudit[mlflow]'``
(mlflow-skinny), ``logger=wandb`` needs ``pip install 'creditaudit[wandb]'``; :func:`check_logger`
refuses a missing extra when the config is validated, before any run starts.

One tracker run per training run, named like its folder: ``<setting>/<rule>__<arch>__s<seed>``.
Its hyper-parameters are the resolved config flattened to dotted keys (``model.d``,
``rule_opts.beta``; lists as JSON text); its metrics are every numeric key of each epoch's record
(NaN and None skipped) at step = epoch, epoch 0 included. A resumed run continues the same
tracker run. A tracker that fails prints one line to stderr and is switched off: it never costs
the run.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from creditaudit.errors import ConfigError
from creditaudit.results import flatten

if TYPE_CHECKING:  # optional extras, imported where they are used
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter
    from wandb import Run as WandbRun

LOGGERS = ("none", "tensorboard", "mlflow", "wandb")
EXTRA = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
}  # logger -> creditaudit extra
MLFLOW_EXPERIMENT = "creditaudit"  # unless $MLFLOW_EXPERIMENT_NAME names another
WANDB_PROJECT = "creditaudit"  # unless $WANDB_PROJECT names another
PARAM_MAX = 500  # characters of an MLflow param value (MLflow allows 6000; a config value is short)


class Tracker(Protocol):
    """Where a run's metrics go besides its folder."""

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        """Open the tracker run ``run_name`` (resumed_from: the epoch of the checkpoint a resumed run
        continues from). True when an existing tracker run of that name was continued."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's record (step = epoch)."""

    def finish(self, status: str) -> None:
        """Close the tracker run with the run's final status (finished, diverged, failed, interrupted)."""


class NoTracker:
    """``logger=none``: nothing leaves the run folder."""

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        return True

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _import_backend(logger: str) -> None:
    """Import what ``logger`` needs; raises ImportError when its extra is not installed."""
    if logger == "tensorboard":
        import tensorboard.plugins.hparams.plugin_data_pb2  # noqa: F401
        import torch.utils.tensorboard  # noqa: F401  (raises without the tensorboard package)
    elif logger == "mlflow":
        import mlflow.tracking  # noqa: F401
    elif logger == "wandb":
        import wandb  # noqa: F401


def check_logger(logger: str, logger_dir: str = "") -> None:
    """Refuse an unknown logger, a logger_dir without a logger, or a logger whose extra is missing (one line)."""
    if logger not in LOGGERS:
        raise ConfigError(f"logger must be one of {' | '.join(LOGGERS)} (got {logger!r})")
    if logger == "none":
        if logger_dir:
            raise ConfigError(
                f"logger_dir={logger_dir} has no effect with logger=none: drop it or set "
                "logger=tensorboard, mlflow or wandb"
            )
        return
    try:
        _import_backend(logger)
    except ImportError as exc:
        raise ConfigError(
            f"logger={logger} needs the {logger} package ({exc}): "
            f"pip install 'creditaudit[{EXTRA[logger]}]'"
        ) from None


# ---------------------------------------------------------------------------------------------
# What is logged
# ---------------------------------------------------------------------------------------------
def run_name(setting: str, folder_name: str) -> str:
    """The tracker run of a training run: ``<setting>/<rule>__<arch>__s<seed>``, like its folder."""
    return f"{setting}/{folder_name}"


def numeric_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric key of an epoch's record but ``epoch`` itself; NaN and None skipped."""
    out = {}
    for key, value in record.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(value):
            continue
        out[key] = float(value)
    return out


C = TypeVar("C")


def _started(client: C | None, tracker: object) -> C:
    """A tracker's client (its writer, MLflow client or run id, W&B run): set by ``start``."""
    if client is None:
        raise RuntimeError(f"{type(tracker).__name__}: call start() first")
    return client


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------
class TensorBoardTracker:
    """One TensorBoard run per training run: the folder ``<log dir>/<setting>/<rule>__<arch>__s<seed>``
    (TensorBoard names runs by that relative path). Scalars with ``add_scalar`` at step = epoch; the
    config as the HParams plugin's session (the HParams dashboard compares runs) and as a text
    summary ``config``. A resumed run appends a new event file that purges the steps it recomputes.
    TensorBoard keeps the first session end a run wrote, so it is written only when the run ends
    for good (finished: success; diverged: failure); a failed or interrupted run, which may be
    resumed, shows none."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = Path(log_dir)
        self.writer: SummaryWriter | None = None

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        path = self.log_dir / run_name
        continued = resumed_from is not None and any(path.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard's readers drop the events at steps >= it from earlier files (a
        # fresh start replaces a deleted run's curves; a resumed one recomputes after its checkpoint).
        writer = self.writer = SummaryWriter(
            log_dir=str(path), purge_step=resumed_from + 1 if resumed_from else 0
        )
        writer.file_writer.add_summary(_session_start(hparams), 0)  # type: ignore[attr-defined]  # torch infers None
        writer.add_text("config", "```\n" + json.dumps(dict(hparams), indent=1) + "\n```", 0)
        writer.flush()
        return continued

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        writer = _started(self.writer, self)
        for key, value in numeric_metrics(metrics).items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def finish(self, status: str) -> None:
        if self.writer is None:
            return
        if status in TB_STATUS:
            self.writer.file_writer.add_summary(_session_end(status), 0)  # type: ignore[attr-defined]  # torch infers None
        self.writer.close()
        self.writer = None


def _hparams_summary(tag: str, **field):
    """A summary the HParams plugin reads: ``field`` is session_start_info= or session_end_info=."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = HParamsPluginData(version=PLUGIN_DATA_VERSION, **field)
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _session_start(hparams: Mapping[str, Any]):
    """The HParams plugin's session-start summary (bools, numbers and text kept as such)."""
    from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

    ssi = SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        if isinstance(value, bool):
            ssi.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            ssi.hparams[key].number_value = value
        else:
            ssi.hparams[key].string_value = str(value)
    return _hparams_summary(SESSION_START_INFO_TAG, session_start_info=ssi)


TB_STATUS = {
    "finished": "STATUS_SUCCESS",
    "diverged": "STATUS_FAILURE",
}  # the ends a run is not resumed from


def _session_end(status: str):
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

    sei = SessionEndInfo(status=Status.Value(TB_STATUS[status]), end_time_secs=time.time())
    return _hparams_summary(SESSION_END_INFO_TAG, session_end_info=sei)


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------
MLFLOW_STATUS = {
    "finished": "FINISHED",
    "diverged": "FAILED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}


def is_local_uri(uri: str) -> bool:
    """A plain path or a ``file:`` URI (MLflow's local file store)."""
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    return (
        scheme is None or scheme.group(1).lower() == "file" or len(scheme.group(1)) == 1
    )  # C:\\ on Windows


def _mlflow_key(key: str) -> str:
    """MLflow accepts letters, digits, _ - . / space and : in a key; anything else becomes _."""
    return re.sub(r"[^\w./\- :]", "_", key)[:250]


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_MAX else text[: PARAM_MAX - 15] + "...(truncated)"


class MLflowTracker:
    """One MLflow run per training run, named ``<setting>/<rule>__<arch>__s<seed>``, in the experiment
    ``creditaudit`` (or ``$MLFLOW_EXPERIMENT_NAME``) of the tracking URI. Params: the flattened
    config (values longer than 500 characters truncated; config.json in the run folder has them
    whole); metrics at step = epoch; tags ``creditaudit.status`` and ``creditaudit.run_dir``. A resumed
    training run continues the MLflow run of its name when one exists.

    mlflow-skinny suffices. MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE=true``:
    for a local path or ``file:`` URI (the default ``<results>/_mlruns``) the tracker sets that
    variable in this process (unless it is already set); a server URI is left alone.
    """

    def __init__(self, tracking_uri: str, run_dir: str | os.PathLike | None = None):
        self.uri = tracking_uri
        self.run_dir = run_dir
        self.client: MlflowClient | None = None
        self.run_id: str | None = None

    def _client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        if is_local_uri(self.uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if "://" not in self.uri and not self.uri.startswith("file:"):
                self.uri = Path(self.uri).expanduser().resolve().as_uri()
        return MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, client: MlflowClient) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # another worker of the sweep created it meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        from mlflow.entities import Param, RunTag

        client = self.client = self._client()
        experiment = self._experiment_id(client)
        existing = None
        if resumed_from is not None:
            quoted = run_name.replace("'", "\\'")
            found = client.search_runs(
                [experiment],
                filter_string=f"attributes.run_name = '{quoted}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            existing = found[0] if found else None
        if existing is not None:
            run_id = self.run_id = existing.info.run_id
            client.update_run(run_id, status="RUNNING")
            logged = (
                existing.data.params
            )  # params are immutable: a changed non-semantic field keeps its first value
        else:
            run_id = self.run_id = client.create_run(experiment, run_name=run_name).info.run_id
            logged = {}
        params = [
            Param(_mlflow_key(k), _param_value(v))
            for k, v in hparams.items()
            if _mlflow_key(k) not in logged
        ]
        tags = [RunTag("creditaudit.status", "running")]
        if self.run_dir is not None:
            tags.append(RunTag("creditaudit.run_dir", str(self.run_dir)))
        for i in range(0, max(len(params), 1), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i : i + 100], tags=tags if i == 0 else [])
        return existing is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = _started(self.client, self), _started(self.run_id, self)
        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), v, now, step) for k, v in numeric_metrics(metrics).items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        client = _started(self.client, self)
        client.set_tag(self.run_id, "creditaudit.status", status)
        client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))
        self.run_id = None


# ---------------------------------------------------------------------------------------------
# Weights & Biases
# ---------------------------------------------------------------------------------------------
def _wandb_id_prefix(run_name: str) -> str:
    """The start of a training run's W&B run ids: its name, / and the other characters W&B refuses
    in an id (``:;,#?/'``) as -."""
    return re.sub(r"[^\w.-]", "-", run_name)[:100]


class WandbTracker:
    """One W&B run per training run, named ``<setting>/<rule>__<arch>__s<seed>`` and grouped by
    setting, in the project ``creditaudit`` (or ``$WANDB_PROJECT``; the entity is W&B's default or
    ``$WANDB_ENTITY``). Config: the flattened config; metrics at step = epoch; summary keys
    ``creditaudit.status`` and ``creditaudit.run_dir``; exit code 0 when the run finished, else 1
    (W&B says failed; creditaudit.status says which end).

    W&B keeps its local files (``wandb/[offline-]run-<time>-<id>/run-<id>.wandb``) under the tracker
    dir, default ``<results>/_wandb``. A run's id is its name with / as -, then 8 random hex digits:
    a fresh start takes a new one, and a resumed training run continues (``resume="allow"``) the
    newest id of its name found there. ``WANDB_MODE=offline`` (or ``wandb offline``) writes the
    local files only, for ``wandb sync`` later. Online without credentials (no ``wandb login``, no
    ``$WANDB_API_KEY``) the tracker fails at start instead of prompting in the middle of a sweep.
    W&B's console capture is off and its messages silent (the terminal stays creditaudit's), and each
    tracker has its own W&B run (``reinit="create_new"``), so the runs of a stack log side by side.
    """

    def __init__(self, root: str | os.PathLike, run_dir: str | os.PathLike | None = None):
        self.root = Path(root).expanduser()
        self.run_dir = run_dir
        self.run: WandbRun | None = None

    def _newest_id(self, prefix: str) -> str | None:
        """The id of the newest local W&B run of this name (``latest-run`` and other ids skipped)."""
        pattern = re.compile(
            rf"(?:offline-)?run-(\d{{8}}_\d{{6}})-({re.escape(prefix)}-[0-9a-f]{{8}})"
        )
        found = [
            (m.group(1), m.group(2))
            for d in self.root.glob("*wandb/*run-*")
            if (m := pattern.fullmatch(d.name))
        ]
        return max(found)[1] if found else None

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        import wandb

        mode = wandb.setup().settings.mode  # $WANDB_MODE, else `wandb offline|online`, else online
        if mode not in ("offline", "dryrun", "disabled") and not wandb.login(prompt=False):
            raise RuntimeError(
                "no W&B credentials: run `wandb login` (or set WANDB_API_KEY), "
                "or set WANDB_MODE=offline and `wandb sync` the tracker dir later"
            )
        self.root.mkdir(
            parents=True, exist_ok=True
        )  # (missing, it costs a warning that silent does not silence)
        prefix = _wandb_id_prefix(run_name)
        existing = self._newest_id(prefix) if resumed_from is not None else None
        run = self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            dir=self.root,
            id=existing or f"{prefix}-{secrets.token_hex(4)}",
            resume="allow" if existing else None,
            name=run_name,
            group=run_name.rsplit("/", 1)[0],
            config=dict(hparams),
            settings=wandb.Settings(console="off", silent=True),
            reinit="create_new",
        )
        run.summary["creditaudit.status"] = "running"
        if self.run_dir is not None:
            run.summary["creditaudit.run_dir"] = str(self.run_dir)
        return existing is not None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        _started(self.run, self).log(numeric_metrics(metrics), step=step)

    def finish(self, status: str) -> None:
        if self.run is None:
            return
        self.run.summary["creditaudit.status"] = status
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.run = None


# ---------------------------------------------------------------------------------------------
# The trainer's entry point
# ---------------------------------------------------------------------------------------------
class Guarded:
    """A tracker whose failures never reach the run: the first exception prints one plain line to
    stderr and switches the tracker off for the rest of the run."""

    def __init__(self, tracker: Tracker, name: str):
        self.tracker, self.name, self.off = tracker, name, False

    def _call(self, what: str, fn, *args, **kwargs):
        if self.off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.off = True
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            print(
                f"creditaudit: logger={self.name} failed at {what} ({reason}); "
                "going on without it (the run folder has every metric)",
                file=sys.stderr,
                flush=True,
            )
            return None

    def start(
        self, run_name: str, hparams: Mapping[str, Any], *, resumed_from: int | None = None
    ) -> bool:
        return bool(
            self._call("start", self.tracker.start, run_name, hparams, resumed_from=resumed_from)
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._call(f"epoch {step}", self.tracker.log, metrics, step)

    def finish(self, status: str) -> None:
        self._call("finish", self.tracker.finish, status)


def make_tracker(
    logger: str,
    logger_dir: str,
    results: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
) -> Tracker:
    """The tracker ``logger=`` names, its default place resolved (not started, not guarded)."""
    if logger == "tensorboard":
        return TensorBoardTracker(logger_dir or Path(results) / "_tensorboard")
    if logger == "mlflow":
        uri = logger_dir or os.environ.get("MLFLOW_TRACKING_URI") or str(Path(results) / "_mlruns")
        return MLflowTracker(uri, run_dir)
    if logger == "wandb":
        return WandbTracker(logger_dir or Path(results) / "_wandb", run_dir)
    return NoTracker()


def start(
    cfg,
    run_dir: str | os.PathLike,
    *,
    resumed_from: int | None,
    records: Iterable[Mapping[str, Any]] = (),
) -> Tracker:
    """The run's tracker, started (a resumed run continues its tracker run, replaying ``records``,
    the metrics already in the folder, when the tracker had none of it); never raises."""
    from creditaudit.typedconfig import to_dict  # (config imports this module: no import back)

    if cfg.logger == "none":
        return NoTracker()
    tracker = Guarded(make_tracker(cfg.logger, cfg.logger_dir, cfg.results, run_dir), cfg.logger)
    continued = tracker.start(
        run_name(cfg.setting, Path(run_dir).name),
        flatten(to_dict(cfg), "", params=True),
        resumed_from=resumed_from,
    )
    if not continued:
        for record in records:
            tracker.log(record, step=int(record["epoch"]))
    return tracker
