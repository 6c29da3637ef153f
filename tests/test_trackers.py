"""logger=tensorboard, logger=mlflow and logger=wandb: every epoch's metrics and the resolved config
reach the tracker, read back with the tracker's own reader (TensorBoard's EventAccumulator, MLflow's
MlflowClient, W&B's transaction-log inspector on an offline run's files) and compared with the run
folder, which stays the record."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from creditaudit.cli import main as cli_main
from creditaudit.config import ConfigError, TrainConfig, apply_overrides, run_path
from creditaudit.jobs import run_many
from creditaudit.reports.collect import collect
from creditaudit.runs.folder import RunFolder
from creditaudit.training.trainer import train
from tests.conftest import tiny_config

LOGGERS = ["tensorboard", "mlflow", "wandb"]


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch):
    """No tracking server or experiment of the developer's; MLFLOW_ALLOW_FILE_STORE as it was."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.pop(
        "MLFLOW_ALLOW_FILE_STORE", None
    )  # set by the tracker; monkeypatch restores a developer's own


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    """W&B offline, its settings, cache and credentials in the test's folder (no login, no network);
    its service process, settings and exit hooks gone with the test."""
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, sub in [
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # (absent: not the developer's ~/.netrc)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # wandb.init wraps both for good
    monkeypatch.setattr(sys, "exit", sys.exit)
    yield
    if "wandb" in sys.modules:
        sys.modules[
            "wandb"
        ].teardown()  # ends its wandb-core process; the next test sets it up anew


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
        metrics = {
            tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
        }
        content = acc.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]
        ).session_start_info
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
        metrics = {
            key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            for key in run.data.metrics
        }
        out[run.info.run_name] = (metrics, run.data.params, run.info.status)
    return out


def read_wandb(results: Path) -> dict[str, tuple[dict, dict, str]]:
    """Every offline run's .wandb transaction log, in time order, through ``wandb leet inspect
    --json``; the logs of one run id (a resumed run writes a new one) merged as ``wandb sync`` would."""
    pytest.importorskip("wandb")
    runs: dict[str, dict] = {}
    for log in sorted(
        (results / "_wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    ):  # (run-<time>-<id>)
        inspected = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        records = [json.loads(line) for line in inspected.stdout.splitlines()]
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        seen = run["run_id"] in runs
        assert run.get("resume", False) == seen  # a later log of an id continues it
        got = runs.setdefault(
            run["run_id"], {"name": run["display_name"], "metrics": {}, "config": {}, "summary": {}}
        )
        assert (
            got["name"] == run["display_name"]
            and run["run_group"] == run["display_name"].split("/")[0]
        )
        got["config"].update(run["config"]["update"])
        for r in records:
            if r["type"] == "config":
                got["config"].update(r["config"].get("update", {}))
            elif r["type"] == "history":
                for key, value in r["history"]["item"].items():
                    if not key.startswith("_"):
                        got["metrics"].setdefault(key, {})[r["history"]["step"]["num"]] = value
            elif r["type"] == "summary":
                got["summary"].update(r["summary"].get("update", {}))
            elif r["type"] == "exit":
                got["exit_code"] = r["exit"].get("exit_code", 0)
    out = {}
    for run in runs.values():
        assert run["name"] not in out, f"two W&B runs named {run['name']}"
        status = run["summary"]["creditaudit.status"]
        assert (run["exit_code"] == 0) == (status == "finished")
        assert Path(run["summary"]["creditaudit.run_dir"]) == results / run["name"]
        out[run["name"]] = (
            run["metrics"],
            {k: v for k, v in run["config"].items() if k != "_wandb"},
            status,
        )
    return out


READ = {"tensorboard": read_tensorboard, "mlflow": read_mlflow, "wandb": read_wandb}
FINISHED = {"tensorboard": "STATUS_SUCCESS", "mlflow": "FINISHED", "wandb": "finished"}


def records_of(cfg: TrainConfig) -> list[dict]:
    return RunFolder(run_path(cfg)).read_metrics()


def assert_streams_the_folder(
    tracked: tuple[dict, dict, str], cfg: TrainConfig, logger: str
) -> None:
    metrics, hparams, status = tracked
    records = records_of(cfg)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for key in ("test/acc", "train/loss"):
        expected = {r["epoch"]: r[key] for r in records if key in r}
        assert set(expected) == {1, 2}
        assert metrics[key] == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32
    every_numeric = {
        k
        for r in records
        for k, v in r.items()
        if k != "epoch" and isinstance(v, (int, float)) and v == v
    }
    assert set(metrics) == every_numeric and {"credit/deep_cos", "diag/d1"} <= every_numeric
    assert metrics["credit/deep_cos"] == pytest.approx(
        {r["epoch"]: r["credit/deep_cos"] for r in records}, rel=1e-6
    )
    text = {k: str(v) for k, v in hparams.items()}
    assert (
        text["rule"] == "dfa" and float(text["model.d"]) == 32 and text["data.dataset"] == "digits"
    )
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
        assert (
            os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
        )  # set by the tracker for the local store
        assert not (results / "mlruns").exists() and not Path("mlruns").exists()
    if logger == "wandb":
        assert (
            len(list((results / "_wandb" / "wandb").glob("offline-run-*"))) == 2
        )  # the first attempt, its resume
        assert not Path("wandb").exists()
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
    cfgs = [
        tiny_config(
            tmp_path, "rule=bp", "epochs=1", f"seed={s}", "setting=sweep_t", f"logger={logger}"
        )
        for s in (1, 2)
    ]
    outcomes = run_many(cfgs, workers=1)
    assert sorted(o.status for o in outcomes) == ["finished", "finished"]
    tracked = READ[logger](Path(cfgs[0].results))
    assert sorted(tracked) == [
        "sweep_t/bp__resmlp__s1",
        "sweep_t/bp__resmlp__s2",
    ]  # named like the run folders
    for cfg in cfgs:
        metrics, hparams, _ = tracked[f"sweep_t/{run_path(cfg).name}"]
        assert float(hparams["seed"]) == cfg.seed
        assert metrics["test/acc"] == pytest.approx(
            {r["epoch"]: r["test/acc"] for r in records_of(cfg) if "test/acc" in r}, rel=1e-6
        )
    # The tracker's folder (_tensorboard, _mlruns, _wandb) is not taken for a setting by the results reader.
    collected = collect(cfgs[0].results)
    assert (
        sorted(r.path.name for r in collected.runs) == ["bp__resmlp__s1", "bp__resmlp__s2"]
        and not collected.problems
    )


def test_logger_dir_places_the_tracker(tmp_path):
    logdir = tmp_path / "tb"
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", "logger=tensorboard", f"logger_dir={logdir}")
    train(cfg)
    assert list(logdir.glob("adhoc/bp__resmlp__s42/events.out.tfevents.*"))
    assert not (Path(cfg.results) / "_tensorboard").exists()


# ---------------------------------------------------------------------------------------------
# Refusals, failures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")]
)
def test_a_missing_extra_is_one_line_naming_the_pip_install(tmp_path, monkeypatch, logger, module):
    real_import = builtins.__import__

    def no_extra(name, *args, **kwargs):
        if name.split(".")[0] == module or name == "torch.utils.tensorboard":
            raise ModuleNotFoundError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    results = tmp_path / "results"
    with (
        monkeypatch.context() as patch
    ):  # (undone before the fixtures' teardown, which imports wandb)
        patch.setattr(builtins, "__import__", no_extra)
        with pytest.raises(ConfigError) as err:
            apply_overrides(TrainConfig(), ["dataset=digits", f"logger={logger}"])
        # The CLI says it in one line, before any run starts.
        out = CliRunner().invoke(
            cli_main, ["train", "dataset=digits", f"logger={logger}", f"results={results}"]
        )
    message = str(err.value)
    assert "\n" not in message and f"pip install 'creditaudit[{logger}]'" in message
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
    out = CliRunner().invoke(
        cli_main, ["train", "dataset=digits", "logger=mlflow", f"results={tmp_path / 'results'}"]
    )
    assert "pip install 'creditaudit[mlflow]'" in out.output


@pytest.mark.parametrize(
    "item, message",
    [
        ("logger=comet", "logger must be one of none | tensorboard | mlflow | wandb"),
        ("logger_dir=somewhere", "logger_dir=somewhere has no effect with logger=none"),
    ],
)
def test_logger_values_are_checked(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("logger", LOGGERS)
@pytest.mark.parametrize("where", ["start", "log", "finish"])
def test_a_failing_tracker_does_not_lose_the_run(tmp_path, monkeypatch, capsys, logger, where):
    from creditaudit import trackers

    cls = {
        "tensorboard": trackers.TensorBoardTracker,
        "mlflow": trackers.MLflowTracker,
        "wandb": trackers.WandbTracker,
    }[logger]

    def broken(self, *args, **kwargs):
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(cls, where, broken)
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", f"logger={logger}")
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["epochs_done"] == 1
    assert [r["epoch"] for r in records_of(cfg)] == [0, 1]  # the run recorded everything
    lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("creditaudit:")
    ]
    assert lines == [
        f"creditaudit: logger={logger} failed at {'epoch 0' if where == 'log' else where} "
        "(OSError: disk full second line); going on without it (the run folder has every metric)"
    ]


def test_wandb_online_without_credentials_is_one_line_not_a_prompt(tmp_path, monkeypatch, capfd):
    """No `wandb login` and no WANDB_API_KEY: the tracker says so in its one line (W&B would ask
    for a key at a terminal, holding the run) and the run goes on; W&B itself prints nothing."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", "logger=wandb")
    assert train(cfg)["status"] == "finished"
    said = [line for line in capfd.readouterr().err.splitlines() if "wandb" in line.lower()]
    assert said == [
        (
            "creditaudit: logger=wandb failed at start (RuntimeError: no W&B credentials: run `wandb login` "
            "(or set WANDB_API_KEY), or set WANDB_MODE=offline and `wandb sync` the tracker dir later); "
            "going on without it (the run folder has every metric)"
        )
    ]


def test_wandb_prints_nothing(tmp_path, capfd):
    """Offline, W&B's console capture off and its messages silent: the terminal stays creditaudit's."""
    pytest.importorskip("wandb")
    cfg = tiny_config(tmp_path, "rule=bp", "epochs=1", "logger=wandb")
    assert train(cfg)["status"] == "finished"
    out = capfd.readouterr()
    assert "wandb" not in (out.out + out.err).lower()
    assert list(read_wandb(Path(cfg.results))) == ["adhoc/bp__resmlp__s42"]


def test_wandb_runs_of_a_stack_log_side_by_side(tmp_path):
    """The runs of a stack train in one process at once: each has its own W&B run (reinit="create_new")."""
    cfgs = [
        tiny_config(tmp_path, "rule=dfa", f"seed={s}", "setting=stack_t", "logger=wandb")
        for s in (1, 2)
    ]
    outcomes = run_many(cfgs, workers=1, stack=2)
    assert sorted(o.status for o in outcomes) == ["finished", "finished"]
    tracked = read_wandb(Path(cfgs[0].results))
    assert sorted(tracked) == ["stack_t/dfa__resmlp__s1", "stack_t/dfa__resmlp__s2"]
    for cfg in cfgs:
        assert_streams_the_folder(tracked[f"stack_t/{run_path(cfg).name}"], cfg, "wandb")
