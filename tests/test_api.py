"""The Python API (``creditaudit.api``, re-exported as ``creditaudit.train`` …): the CLI's verbs with
its defaults and the same results on disk; user errors raise ``UserError``, never ``SystemExit``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import creditaudit
from creditaudit import api
from creditaudit.cli import main
from creditaudit.errors import ConfigError, MissingPathError, UserError
from tests.conftest import run_metrics

TINY = {
    "dataset": "digits",
    "train_subset": 0,
    "d": 32,
    "L": 2,
    "epochs": 2,
    "batch_size": 64,
    "threads": 1,
}


def _strip(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_train_writes_what_the_cli_writes(tmp_path):
    by_api = api.train("rule=dfa", results=str(tmp_path / "api"), **TINY)
    args = [f"{k}={v}" for k, v in TINY.items()]
    res = CliRunner().invoke(main, ["train", "rule=dfa", f"results={tmp_path / 'cli'}", *args])
    assert res.exit_code == 0, res.output
    assert by_api.status == "finished" and by_api.finished and by_api.run == "dfa__resmlp__s42"
    assert (
        by_api.path == tmp_path / "api" / "adhoc" / "dfa__resmlp__s42" and by_api.epochs_done == 2
    )
    cli_cfg = api.make_config("rule=dfa", f"results={tmp_path / 'cli'}", *args)
    assert _strip(by_api.metrics()) == run_metrics(cli_cfg)
    assert by_api.final["test/acc"] == by_api.metrics()[-1]["test/acc"]
    again = api.train(
        api.make_config("rule=dfa", results=str(tmp_path / "api"), **TINY)
    )  # a TrainConfig; finished: skipped
    assert again.status in ("skipped", "finished") and again.path == by_api.path


def test_overrides_and_keyword_fields_compose():
    from creditaudit.config import resolve_rule_options

    cfg = resolve_rule_options(
        api.make_config(
            "rule=ep",
            "diag.every=3",
            epochs=4,
            ep__beta=0.2,
            random_labels=True,
            channels=(4, 6, 8),
            arch="smallcnn",
        )
    )
    assert (
        cfg.rule,
        cfg.epochs,
        cfg.diag.every,
        cfg.rule_opts["beta"],
        cfg.data.random_labels,
        cfg.model.channels,
    ) == ("ep", 4, 3, 0.2, True, (4, 6, 8))
    with pytest.raises(ConfigError, match="expected key=value"):
        api.make_config("epochs")
    with pytest.raises(ConfigError, match="TrainConfig or key=value"):
        api.train(3)


def test_audit_returns_a_table_with_verdicts_and_writes_the_reports(tmp_path):
    result = api.audit(rules=["bp", "dfa"], seeds=(1, 2), workers=1, results=str(tmp_path), **TINY)
    assert sorted(result.trained.statuses) == ["finished"] * 6 and not result.trained.failed
    rows = {r["rule"]: r for r in result.table()}
    assert set(rows) == {"bp", "dfa"} and rows["bp"]["n"] == 2 and rows["bp"]["test_acc_n"] == 2
    assert all(r["verdict"].startswith(("PASS", "FAIL")) and r["claim"] for r in rows.values())
    assert {"depth_pp", "deep_cos", "D3_fired"} <= set(rows["dfa"])
    assert result.reports[0]["markdown"].is_file() and result.reports[0]["html"].is_file()
    again = api.audit(tmp_path)  # re-audit the folder, training nothing
    assert again.trained is None and again.table() == result.table()
    frame = pytest.importorskip("pandas") and result.to_frame()
    assert list(frame["rule"]) == ["bp", "dfa"]


def test_an_audit_whose_runs_all_fail_holds_no_audit_and_says_why(tmp_path):
    result = api.audit(
        rules=["bp"],
        seeds=(1,),
        workers=1,
        results=str(tmp_path),
        dataset="digits",
        epochs=1,
        threads=1,
    )
    assert result.audits == [] and result.trained.failed
    assert "train_subset=20000 exceeds the 1437 train examples" in result.trained.failed[0].error


def test_reports_from_a_folder_and_the_plan(tmp_path):
    api.train("rule=bp", results=str(tmp_path), setting="main_audit", **TINY)
    t = api.tables(tmp_path, names=["table1"])
    assert t.path == tmp_path / "_reports" / "tables.md" and t["table1"].rows
    made = api.inventory(tmp_path)
    assert (
        made.path.name == "TRAINING_INVENTORY.md"
        and made.runs == made.finished == 1
        and made.problems == []
    )
    cfgs = api.plan("main_audit", profile="smoke", with_baselines=True, results=str(tmp_path))
    assert len(cfgs) == 18 + 3 and cfgs[0].rule == "bp_frozen"
    cli = CliRunner().invoke(
        main,
        [
            "sweep",
            "main_audit",
            "--profile",
            "smoke",
            "--with-baselines",
            "--dry-run",
            f"results={tmp_path}",
        ],
    )
    assert "21 runs" in cli.output


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda tmp: api.audit(tmp / "nothing"), MissingPathError),
        (lambda tmp: api.tables(tmp / "nothing"), MissingPathError),
        (lambda tmp: api.tables(tmp, names=["nosuch"]), ConfigError),
        (lambda tmp: api.train("rule=nosuch"), UserError),
        (lambda tmp: api.plan(), ConfigError),
        (lambda tmp: api.audit(rules=["bp"], seeds=()), ConfigError),
        (lambda tmp: api.sweep("main_audit", backend="slurm"), ConfigError),
    ],
)
def test_user_errors_raise_user_error_not_system_exit(tmp_path, call, error):
    with pytest.raises(error):
        call(tmp_path)


def test_the_package_exports_the_verbs():
    for name in ("train", "audit", "sweep", "tables", "inventory", "load", "make_config", "plan"):
        assert getattr(creditaudit, name) is getattr(api, name), name
