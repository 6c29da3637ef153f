"""A results folder as one table, for the tools researchers already use (pandas, DuckDB, Polars…).

    import creditaudit.results
    df = creditaudit.results.load("results/")          # one row per run × logged epoch
    df[df.rule == "dfa"].groupby("epoch")["credit/deep_cos"].mean()

Each row is one epoch of one run (epoch 0: before any update): the run's identity (``setting``,
``run``, ``rule``, ``arch`` — the folder's architecture label —, ``seed``, ``status``, ``path``),
its resolved config flattened to ``config.<dotted.path>`` columns (``config.model.d``,
``config.rule_opts.beta``; lists as JSON text), and every metric it logged under its own key
(``train/loss``, ``test/acc``, ``diag/gL_norm``, ``credit/cos_l3``, ``time/epoch_s``, …; a metric a
run did not log that epoch is missing). The run folders stay the source of truth: this reads them
through the same reader as the reports (unreadable folders are skipped; ``problems`` says why).

``creditaudit export RESULTS --format parquet|csv`` writes the same table to a file (atomically: a failed
write leaves the previous file whole).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from creditaudit.errors import ConfigError
from creditaudit.runs.io import atomic_replace

ID_COLUMNS = ("setting", "run", "rule", "arch", "seed", "status", "path", "epoch")
INSTALL_HINT = "pip install 'creditaudit[data]'"


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise ConfigError(f"creditaudit.results needs pandas: {INSTALL_HINT}") from None
    return pd


def flatten(
    config: Mapping[str, Any], prefix: str = "config.", *, params: bool = False
) -> dict[str, Any]:
    """``{"model": {"d": 256}}`` -> ``{"config.model.d": 256}``: nested sections become dotted keys
    after ``prefix``, lists JSON text. With ``params``, every value is one a tracker takes as a
    hyper-parameter (``creditaudit.trackers``): None becomes ``"None"``, a value that is not a bool,
    int, float or str its ``str()``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}.", params=params))
        elif isinstance(value, (list, tuple)):
            out[path] = json.dumps(list(value))
        elif params and value is None:
            out[path] = "None"
        elif params and not isinstance(value, (bool, int, float, str)):
            out[path] = str(value)
        else:
            out[path] = value
    return out


def records(
    results: str | Path, settings: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of :func:`load` as dicts, and the folders skipped with the reason."""
    from creditaudit.reports.collect import collect

    col = collect(results, settings)
    rows = []
    for r in col.runs:
        ident = {
            "setting": r.setting,
            "run": r.path.name,
            "rule": r.rule,
            "arch": r.arch,
            "seed": r.seed,
            "status": r.status,
            "path": str(r.path),
        }
        config = flatten(r.config)
        for rec in r.metrics:
            rows.append({**ident, **config, **rec})
    return rows, list(col.problems)


def load(results: str | Path = "results", settings: list[str] | None = None):
    """Every run × epoch of a results folder as a pandas DataFrame (see the module docstring)."""
    pd = _pandas()
    rows, problems = records(results, settings)
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(ID_COLUMNS))
    first = [c for c in ID_COLUMNS if c in df.columns]
    config = sorted(c for c in df.columns if c.startswith("config."))
    metrics = sorted(c for c in df.columns if c not in first and not c.startswith("config."))
    df = df[first + config + metrics]
    df.attrs["problems"] = problems  # folders that could not be read, with the reason
    return df


def _uniform(df):
    """Columns whose values mix types (an option that is a number for one rule and text for
    another) become text, so that Parquet can store them."""
    for c in df.columns:
        if df[c].dtype == object:
            kinds = {type(v) for v in df[c] if v is not None and v == v}
            if len(kinds) > 1:
                df[c] = df[c].map(lambda v: None if v is None or v != v else str(v))
    return df


def export(
    results: str | Path, out: str | Path, fmt: str = "parquet", settings: list[str] | None = None
) -> tuple[Path, int, list[str]]:
    """Write :func:`load`'s table to ``out`` (``parquet`` or ``csv``); returns (path, rows, problems)."""
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"--format {fmt!r}: expected parquet or csv")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"writing Parquet needs pyarrow: {INSTALL_HINT} (or use --format csv)"
            ) from None
    df = _uniform(load(results, settings))
    out = Path(out)
    with atomic_replace(
        out
    ) as tmp:  # a full disk leaves the previous export whole, and names ``out``
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return out, len(df), list(df.attrs.get("problems", []))
