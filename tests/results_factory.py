"""Results folders with known content, written the way the trainer writes them (config.json,
metrics.jsonl, summary.json through RunFolder), for report tests and the notebook test.

Each run's figures follow from (rule, setting, seed) by a fixed formula, so a test can compute
every expected mean and std independently of the report code.
"""

from __future__ import annotations

from pathlib import Path

from creditaudit.config import TrainConfig, apply_overrides, to_dict
from creditaudit.runs.folder import RunFolder, run_dir

SEEDS = (42, 123, 456)


def figures(rule: str, setting: str, seed: int) -> dict[str, float]:
    """The final figures of one synthetic run."""
    i = SEEDS.index(seed) if seed in SEEDS else 0
    base = {
        "bp": 0.60,
        "fa": 0.50,
        "dfa": 0.40,
        "ep": 0.58,
        "sb": 0.45,
        "cb": 0.42,
        "bp_frozen": 0.35,
        "dfa_frozen": 0.33,
    }.get(rule, 0.30)
    acc = base + 0.01 * i + (0.05 if setting == "penalty_rescue" else 0.0)
    collapsed = rule in ("dfa", "sb", "cb") and setting != "penalty_rescue"
    return {
        "test/acc": round(acc, 6),
        "credit/deep_cos": {
            "bp": 1.0,
            "fa": 0.33,
            "dfa": 0.01,
            "ep": 0.99,
            "sb": 0.3,
            "cb": 0.7,
        }.get(rule, 0.0)
        + 0.01 * i,
        "credit/nudge": -{
            "bp": 2e-3,
            "fa": 1e-3,
            "dfa": 5e-5,
            "ep": 2e-3,
            "sb": 1.9e-3,
            "cb": 4e-4,
        }.get(rule, 1e-6)
        * (1 + 0.1 * i),
        "diag/hL_norm": (5e8 if collapsed else 30.0) * (1 + 0.1 * i),
        "diag/gL_norm": (1e-10 if collapsed else 1e-2) * (1 + 0.1 * i),
        "diag/d1": 80.0 if collapsed else 3.0,
        "credit/rho_deep": 0.5,
        "diag/grad_stab": 0.8,
        "diag/train_loss_fixed_drop": {"sb": 0.45, "cb": 0.12, "dfa": 0.09}.get(rule, 0.3)
        + 0.01 * i,
    }


def make_run(
    root: Path,
    setting: str,
    rule: str,
    seed: int,
    *,
    epochs: int = 3,
    overrides: tuple[str, ...] = (),
    arch: str = "resmlp",
    arch_label: str = "",
    status: str = "finished",
    wall_s: float = 360.0,
    device: str = "cpu",
    trajectory: bool = False,
) -> TrainConfig:
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"rule={rule}",
            f"seed={seed}",
            f"epochs={epochs}",
            f"setting={setting}",
            f"arch={arch}",
            f"results={root}",
            f"arch_label={arch_label}",
            *overrides,
        ],
    )
    folder = RunFolder(run_dir(root, setting, rule, arch_label or arch, seed))
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_config(to_dict(cfg))
    fig = figures(rule, setting, seed)
    done = epochs if status == "finished" else max(epochs - 1, 0)
    records = []
    for e in range(done + 1):
        t = e / epochs
        rec = {
            "epoch": e,
            "diag/train_loss_fixed": 2.3 - fig["diag/train_loss_fixed_drop"] * t,
            "diag/d1": 1.0 + (fig["diag/d1"] - 1.0) * t,
            "credit/deep_cos": fig["credit/deep_cos"],
            "credit/nudge": fig["credit/nudge"],
            "diag/hL_norm": fig["diag/hL_norm"] ** max(t, 0.1),
            "diag/gL_norm": fig["diag/gL_norm"] if e == epochs else 1e-2,
        }
        if e:
            rec.update({"test/acc": fig["test/acc"] * (0.8 + 0.2 * t), "train/loss": 1.0})
        if e == epochs:
            rec.update(
                {
                    "diag/hL_norm": fig["diag/hL_norm"],
                    "credit/rho_deep": fig["credit/rho_deep"],
                    "diag/grad_stab": fig["diag/grad_stab"],
                    "test/acc": fig["test/acc"],
                }
            )
        if trajectory:  # what diag.trajectory=true logs: quantiles of per-sample norms, layers 0..L
            for name, scale in (("h", rec["diag/hL_norm"]), ("g", rec["diag/gL_norm"]), ("a", 1.0)):
                for l in range(5):
                    q = {"p10": 0.5 * scale, "p50": scale, "p90": 2.0 * scale, "mean": 1.1 * scale}
                    rec.update({f"traj/{name}_l{l}_{k}": v for k, v in q.items()})
        records.append(rec)
    folder.rewrite_metrics(records)
    folder.write_summary(
        {
            "run": folder.path.name,
            "setting": setting,
            "rule": rule,
            "arch": arch,
            "seed": seed,
            "epochs": epochs,
            "status": status,
            "epochs_done": done,
            "wall_s": wall_s,
            "device": device,
            "final": records[-1],
        }
    )
    return cfg


def study(root: Path) -> Path:
    """A small study: main audit (6 rules + bp_frozen, 3 seeds), penalty rescue (dfa, sb, cb; 3
    seeds), a depth sweep (dfa at L 2 and 6, one seed each), smallcnn cross-arch (dfa, 2 seeds), one
    failed run, one unfinished run, and one corrupt folder."""
    for seed in SEEDS:
        for rule in ("bp", "fa", "dfa", "ep", "sb", "cb", "bp_frozen"):
            make_run(root, "main_audit", rule, seed)
        for rule in ("dfa", "sb", "cb"):
            make_run(root, "penalty_rescue", rule, seed, overrides=("lam=1e-2",), wall_s=120.0)
    for L in (2, 6):
        make_run(
            root,
            "depth_sweep",
            "dfa",
            42,
            overrides=("d=512", f"L={L}"),
            arch_label=f"resmlp-d512-L{L}",
            wall_s=720.0,
        )
    for seed in SEEDS[:2]:
        make_run(root, "cross_arch", "dfa", seed, arch="smallcnn", device="cuda:0", wall_s=1800.0)
    make_run(
        root, "cross_arch", "bp", 42, arch="smallcnn", status="failed", wall_s=60.0, device="cuda:0"
    )
    make_run(
        root,
        "no_residual",
        "dfa",
        42,
        status="running",
        wall_s=100.0,
        overrides=("residual=false",),
        arch_label="resmlp-noskip",
    )
    bad = root / "no_residual" / "dfa__resmlp-noskip__s123"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{ not json")
    (bad / "summary.json").write_text("{}")
    return root
