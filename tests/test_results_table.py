"""A results folder as one table: creditaudit.results.load (pandas) and the Parquet/CSV export,
read back with DuckDB and pandas and checked against the run folders."""

from __future__ import annotations

import json
import math

import pytest

pd = pytest.importorskip("pandas")

import creditaudit.results  # noqa: E402
from creditaudit.training.trainer import train  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.results_factory import make_run  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    for rule in ("bp", "dfa"):
        cfg = tiny_config(
            root, f"rule={rule}", "epochs=2", f"results={root / 'results'}", "setting=main_audit"
        )
        assert train(cfg)["status"] == "finished"
    make_run(root / "results", "penalty_rescue", "cb", 42, overrides=("lam=1e-2",))
    bad = root / "results" / "main_audit" / "fa__resmlp__s42"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{ nope")
    (bad / "summary.json").write_text("{}")
    return root / "results"


def _folder_rows(results):
    rows = {}
    for metrics in results.glob("*/*/metrics.jsonl"):
        run = metrics.parent
        if (run / "config.json").read_text().startswith("{ nope"):
            continue
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            rows[(run.parent.name, run.name, rec["epoch"])] = rec
    return rows


def test_load_gives_one_row_per_run_and_epoch_with_config_and_metrics(folder):
    df = creditaudit.results.load(folder)
    expected = _folder_rows(folder)
    assert (
        len(df) == len(expected) == 3 + 3 + 4
    )  # two real 2-epoch runs (epochs 0..2) and a planted 3-epoch one
    for _, row in df.iterrows():
        rec = expected[(row["setting"], row["run"], row["epoch"])]
        for key, value in rec.items():
            got = row[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got)
            else:
                assert got == value, (row["run"], key)
    bp = df[(df.rule == "bp") & (df.epoch == 2)].iloc[0]
    assert (
        bp["config.data.dataset"] == "digits"
        and bp["config.model.d"] == 32
        and bp["status"] == "finished"
    )
    assert df[df.rule == "cb"]["config.lam"].unique().tolist() == [0.01]
    assert any(
        "fa__resmlp__s42" in p for p in df.attrs["problems"]
    )  # the corrupt folder is reported, not fatal


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_reads_back_with_duckdb_and_pandas(folder, tmp_path, fmt):
    duckdb = pytest.importorskip("duckdb")
    out, n, problems = creditaudit.results.export(folder, tmp_path / f"runs.{fmt}", fmt)
    assert n == len(creditaudit.results.load(folder)) and problems
    back = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert len(back) == n and {"test/acc", "config.model.d", "diag/gL_norm"} <= set(back.columns)
    reader = "read_parquet" if fmt == "parquet" else "read_csv_auto"
    con = duckdb.connect()
    acc = con.execute(
        f"select avg(\"test/acc\") from {reader}(?) where rule = 'bp' and epoch = 2", [str(out)]
    ).fetchone()[0]
    truth = [
        json.loads(line)
        for line in (folder / "main_audit" / "bp__resmlp__s42" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ][-1]
    assert acc == pytest.approx(truth["test/acc"])
    rows = con.execute(f"select count(*) from {reader}(?)", [str(out)]).fetchone()[0]
    assert rows == n


def test_a_missing_extra_names_the_install():
    import builtins

    real = builtins.__import__

    def no_pandas(name, *a, **k):
        if name == "pandas":
            raise ImportError("no pandas")
        return real(name, *a, **k)

    builtins.__import__ = no_pandas
    try:
        with pytest.raises(Exception, match=r"pip install 'creditaudit\[data\]'"):
            creditaudit.results.load("nowhere")
    finally:
        builtins.__import__ = real


def test_the_export_command(folder, tmp_path):
    from click.testing import CliRunner

    from creditaudit.cli import main

    out = tmp_path / "all.csv"
    res = CliRunner().invoke(main, ["export", str(folder), "--format", "csv", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{len(creditaudit.results.load(folder))} rows (csv)" in res.output and out.exists()
    missing = CliRunner().invoke(main, ["export", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no results folder" in missing.output
