"""logger=tensorboard and logger=mlflow: every epoch's metrics and the resolved config reach the
tracker, read back with the tracker's own reader (TensorBoard's EventAccumulator, MLflow's
MlflowClient) and compared with the run folder, which stays the record."""
from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from creditaudit.cli import main as cli_main
from creditaudit.config import ConfigError, TrainConfig, apply_overrides, run_path
from creditaudit.reports.collect import collect
from creditaudit.runs.folder import RunFolder
from creditaudit.jobs import run_many
from creditaudit.training.trainer import train
from tests.conftest import tiny_config

LOGGERS = ["tensorboard", "mlflow"]


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch):
    """No tracking server or experiment of the developer's; MLFLOW_ALLOW_FILE_STORE as it was."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)  # set by the tracker; monkeypatch restores a developer's own


# ---------------------------------------------------------------------------------------------
# Reading a tracker back with its own reader: {run name: (metrics {tag: {step: value}}, hparams, status)}
# ---------------------------------------------------------------------------------------------
def read_tensorboard(results: Path) -> dict[str, tuple[dict, dict, str]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    root = results / "_tensorboard"
    out = {}
    for events in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        metrics = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
        content = acc.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        end = HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
        assert "config" in acc.Tags()["tensors"][0]  # the config as a text summary too
        out[events.relative_to(root).as_posix()] = (metrics, hparams, Status.Name(end.status))
    return out


def read_mlflow(results: Path) -> dict[str, tuple[dict, dict, str]]:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(results / "_mlruns").as_uri())
    experiment = client.get_experiment_by_name("creditaudit")
    out = {}
    for run in client.search_runs([experiment.experiment_id]):
        assert run.info.run_name not in out, f"two MLflow runs named {run.info.run_name}"
        metrics = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}
        out[run.info.run_name] = (metrics, run.data.params, run.info.status)
    return out


READ = {"tensorboard": read_tensorboard, "mlflow": read_mlflow}
FINISHED = {"tensorboard": "STATUS_SUCCESS", "mlflow": "FINISHED"}


def records_of(cfg: TrainConfig) -> list[dict]:
    return RunFolder(run_path(cfg)).read_metrics()


def assert_streams_the_folder(tracked: tuple[dict, dict, str], cfg: TrainConfig, logger: str) -> None:
    metrics, hparams, status = tracked
    records = records_of(cfg)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for key in ("test/acc", "train/loss"):
        expected = {r["epoch"]: r[key] for r in records if key in r}
        assert set(expected) == {1, 2}
        assert metrics[key] == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32
    every_numeric = {k for r in records for k, v in r.items() if k != "epoch" and isinstance(v, (int, float)) and v == v}
    assert set(metrics) == every_numeric and {"credit/deep_cos", "diag/d1"} <= every_numeric
    assert metrics["credit/deep_cos"] == pytest.approx({r["epoch"]: r["credit/deep_cos"] for r in records}, rel=1e-6)
    text = {k: str(v) for k, v in hparams.items()}
    assert text["rule"] == "dfa" and float(text["model.d"]) == 32 and text["data.dataset"] == "digits"
    assert text["logger"] == logger and text["save_epochs"] == "[]"
    assert "rule_opts.init" in text  # the resolved config: every option of the rule
    assert status == FINISHED[logger]


# ---------------------------------------------------------------------------------------------
# A run, resumed, then skipped
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logger", LOGGERS)
def test_every_epoch_and_the_config_reach_the_tracker_across_a_resume(tmp_path, logger):
    cfg = tiny_config(tmp_path, "rule=dfa", f"logger={logger}")
    assert train(cfg, stop_after=1)["status"] == "interrupted"
    assert train(cfg)["status"] == "finished"  # resumes from epoch 1: the same tracker run goes on
    results = Path(cfg.results)
    tracked = READ[logger](results)
    assert list(tracked) == ["adhoc/dfa__resmlp__s42"]
    assert_streams_the_folder(tracked["adhoc/dfa__resmlp__s42"], cfg, logger)
    if logger == "mlflow":
        assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # set by the tracker for the local store
        assert not (results / "mlruns").exists() and not Path("mlruns").exists()
    # A finished run is skipped and logs nothing.
    files = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert train(cfg)["status"] == "finished"
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} == files
    assert READ[logger](results) == tracked


@pytest.mark.parametrize("logger", LOGGERS)
def test_a_run_resumed_with_a_logger_replays_the_epochs_it_missed(tmp_path, logger):
    """Started with logger=none, resumed with a logger (a non-semantic field): the tracker gets
    every epoch, the ones before the resume from metrics.jsonl."""
    assert train(tiny_config(tmp_path, "rule=dfa"), stop_after=1)["status"] == "interrupted"
    cfg = tiny_config(tmp_path, "rule=dfa", f"logger={logger}")
    assert train(cfg)["status"] == "finished"
    tracked = READ[logger](Path(cfg.results))
    assert_streams_the_folder(tracked["adhoc/dfa__resmlp__s42"], cfg, logger)


@pytest.mark.parametrize("logger", LOGGERS)
def test_a_sweep_logs_one_tracker_run_per_training_run(tmp_path, logger):
    cfgs = [tiny_config(tmp_path, "rule=bp", "epochs=1", f"seed={s}", "setting=sweep_t", f"logger={logger}") for s in (1, 2)]
    outcomes = run_many(cfgs, workers=1)
    assert sorted(o.status for o in outcomes) == ["finished", "finished"]
    tracked = READ[logger](Path(cfgs[0].results))
    assert sorted(tracked) == ["sweep_t/bp__resmlp__s1", "sweep_t/bp__resmlp__s2"]  # named like the run folders
    for cfg in cfgs:
        metrics, hparams, _ = tracked[f"sweep_t/{run_path(cfg).name}"]
        assert float(hparams["seed"]) == cfg.seed
        assert metrics["test/acc"] == pytest.approx({r["epoch"]: r["test/acc"] for r in records_of(cfg) if "test/acc" in r}, rel=1e-6)
    # The tracker's folder (_tensorboard, _mlruns) is not taken for a setting by the results reader.
    collected = collect(cfgs[0].results)
    assert sorted(r.path.name for r in collected.runs) == ["bp__resmlp__s1", "bp__resmlp__s2"] and not collected.problems


def test_logger_dir_places_the_tracker(tmp_path):
    logdir = tmp_path / "tb"
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", "logger=tensorboard", f"logger_dir={logdir}")
    train(cfg)
    assert list(logdir.glob("adhoc/bp__resmlp__s42/events.out.tfevents.*"))
    assert not (Path(cfg.results) / "_tensorboard").exists()


# ---------------------------------------------------------------------------------------------
# Refusals, failures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_naming_the_pip_install(tmp_path, monkeypatch, logger, module):
    real_import = builtins.__import__

    def no_extra(name, *args, **kwargs):
        if name.split(".")[0] == module or name == "torch.utils.tensorboard":
            raise ModuleNotFoundError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extra)
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), ["dataset=digits", f"logger={logger}"])
    message = str(err.value)
    assert "\n" not in message and f"pip install 'creditaudit[{logger}]'" in message
    # The CLI says it in one line, before any run starts.
    results = tmp_path / "results"
    out = CliRunner().invoke(cli_main, ["train", "dataset=digits", f"logger={logger}", f"results={results}"])
    assert out.exit_code == 2 and "pip install 'creditaudit" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    assert not results.exists()


def test_the_cli_prints_the_extra_in_brackets(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.split(".")[0] == "mlflow":
            raise ModuleNotFoundError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    out = CliRunner().invoke(cli_main, ["train", "dataset=digits", "logger=mlflow", f"results={tmp_path / 'results'}"])
    assert "pip install 'creditaudit[mlflow]'" in out.output


@pytest.mark.parametrize("item, message", [
    ("logger=wandb", "logger must be one of none | tensorboard | mlflow"),
    ("logger_dir=somewhere", "logger_dir=somewhere has no effect with logger=none"),
])
def test_logger_values_are_checked(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("logger", LOGGERS)
@pytest.mark.parametrize("where", ["start", "log", "finish"])
def test_a_failing_tracker_does_not_lose_the_run(tmp_path, monkeypatch, capsys, logger, where):
    from creditaudit import trackers

    cls = {"tensorboard": trackers.TensorBoardTracker, "mlflow": trackers.MLflowTracker}[logger]

    def broken(self, *args, **kwargs):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(cls, where, broken)
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", f"logger={logger}")
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["epochs_done"] == 1
    assert [r["epoch"] for r in records_of(cfg)] == [0, 1]  # the run recorded everything
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("creditaudit:")]
    assert lines == [f"creditaudit: logger={logger} failed at {'epoch 0' if where == 'log' else where} "
                     "(OSError: disk full second line); going on without it (the run folder has every metric)"]
