"""Runs trained in a stack (``training/stack.py``) give the metrics they give alone.

Walks the registries: every rule × every architecture either stacks — and then one stacked step
moves every run's parameters as its own step does, and every epoch's every figure of every run
equals the run trained alone — or is refused with a reason.

Tolerances: float32 rounding only. A stacked step computes the same functions with batched matrix
products and convolutions, which sum in another order: after one step the parameters agree to
rounding (checked to 1e-3 of each tensor's scale). Training then carries the difference along like any
perturbation of that size: after two or three epochs the figures agree to 1e-5–1e-3 relative (the
most on EP over SmallCNN's BatchNorm, measured), checked to 2e-3. Figures that are differences of
nearly equal numbers amplify it further: the finite-difference diagnostics (ρ, nudging), the
gradient stability of (c) (cosines of batch means of per-sample gradients; 0.7% apart after two
epochs of EP over smallcnn1d) and EP's relaxation residual (``rule/relax_ratio``, the norm of a
gradient near its zero), checked to 5% or
1e-4 (measured: 5.3e-5 apart on a ρ of 6e-4, DRTP over smallcnn1d). Accuracies agree to two examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from creditaudit.config import resolve_rule_options, run_path
from creditaudit.models import ARCHS
from creditaudit.rules import RULES
from creditaudit.runs.checkpoint import load_checkpoint
from creditaudit.runs.folder import RunFolder
from creditaudit.training.stack import Stack, stack_key, train_stack, why_not_stacked
from creditaudit.training.trainer import train
from tests.conftest import run_metrics, small_overrides, tiny_config

STACKABLE = [n for n in RULES.names() if RULES.get(n).stack_refusal is None]
REFUSED = [n for n in RULES.names() if RULES.get(n).stack_refusal is not None]
# differences of nearly equal numbers: finite differences, a residual near zero, cosines of batch means
# of per-sample gradients that mostly cancel
AMPLIFIED = ("credit/rho", "credit/nudge", "rule/relax_ratio", "diag/grad_stab")


def _cfg(root, rule: str, arch: str, seed: int, *extra: str):
    return tiny_config(
        root,
        f"rule={rule}",
        f"arch={arch}",
        *small_overrides(arch, shallow=rule.endswith("_shallow")),
        f"seed={seed}",
        "batch_size=64",
        *extra,
    )


def assert_same_metrics(alone, stacked) -> None:
    """Every epoch, every figure of two runs' metrics.jsonl, within float rounding (module docstring)."""
    a, b = run_metrics(alone), run_metrics(stacked)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    examples = 2.0 / 360  # two examples of the digits test split
    for ra, rb in zip(a, b, strict=True):
        assert set(rb) - set(ra) <= {"stack/runs"} and set(ra) <= set(rb), set(ra) ^ set(rb)
        for k, va in ra.items():
            vb = rb[k]
            if not isinstance(va, float) or not math.isfinite(va):
                assert va == vb, (k, va, vb)
            elif k.endswith("/acc"):
                assert abs(va - vb) <= examples + 1e-12, (ra["epoch"], k, va, vb)
            elif k.startswith(AMPLIFIED):
                assert vb == pytest.approx(va, rel=0.05, abs=1e-4), (ra["epoch"], k, va, vb)
            else:
                assert vb == pytest.approx(va, rel=2e-3, abs=1e-6), (ra["epoch"], k, va, vb)


@pytest.mark.parametrize("rule", STACKABLE)
def test_one_stacked_step_is_each_runs_own_step(tmp_path, rule, arch):
    """Gradients (AdamW's first moments), buffers (BatchNorm statistics) and parameters after one
    step of a stack of two runs (different seeds and λ) equal those of each run's own step:
    nothing leaks (a leak moves a tensor by its own scale). A gradient is a sum over the batch of
    terms that cancel, and EP's credits are differences of relaxed states divided by β, so rounding
    scales with the terms, not with the result: checked to 1e-3 of the tensor's largest entry
    (measured: up to 6e-5). Adam's first step is lr·sign(g): an element whose gradient is below rounding may move the
    other way, hence the parameters' absolute tolerance of 2·lr."""
    from creditaudit.data.loader import stacked_epoch
    from creditaudit.training.run import build_run, train_step

    cfgs = [
        resolve_rule_options(_cfg(tmp_path, rule, arch, s, lam))
        for s, lam in ((1, "lam=0.001"), (2, "lam=0.1"))
    ]
    alone, stacked = [build_run(c) for c in cfgs], [build_run(c) for c in cfgs]
    stack = Stack(stacked)
    x, y = next(iter(stacked_epoch([r.loader for r in stacked], 0)))
    stack.train_step(x, y)
    stack.unstack()
    lr = cfgs[0].optim.lr
    for r, run in enumerate(alone):
        train_step(run, x[r], y[r])
        where = f"{rule}/{arch} run {r}"
        for (name, t), u in zip(
            run.model.named_parameters(), stacked[r].model.parameters(), strict=True
        ):
            torch.testing.assert_close(u, t, rtol=0, atol=2.1 * lr, msg=f"{where}: {name}")
        for (name, t), u in zip(run.model.named_buffers(), stacked[r].model.buffers(), strict=True):
            torch.testing.assert_close(u, t, rtol=1e-5, atol=1e-7, msg=f"{where}: {name}")
        mine = stacked[r].optimizer.state_dict()["state"]
        for i, state in run.optimizer.state_dict()["state"].items():
            for k, v in state.items():
                scale = float(v.abs().max()) if v.numel() > 1 else float(v)
                torch.testing.assert_close(
                    mine[i][k], v, rtol=0, atol=1e-3 * scale + 1e-30, msg=f"{where}: state {i} {k}"
                )


@pytest.mark.slow
@pytest.mark.parametrize("rule", STACKABLE)
def test_a_run_trained_in_a_stack_gives_its_metrics_alone(tmp_path, rule, arch):
    seeds, lams = (1, 2), ("lam=0.001", "lam=0.01")
    alone = [
        _cfg(tmp_path / "alone", rule, arch, s, lam) for s, lam in zip(seeds, lams, strict=True)
    ]
    for c in alone:
        assert train(c)["status"] == "finished"
    stacked = [
        _cfg(tmp_path / "stack", rule, arch, s, lam) for s, lam in zip(seeds, lams, strict=True)
    ]
    assert len({stack_key(c) for c in stacked}) == 1
    assert [r.status for r in train_stack(stacked)] == ["finished", "finished"]
    for a, b in zip(alone, stacked, strict=True):
        assert_same_metrics(a, b)
        assert RunFolder(run_path(b)).read_summary()["status"] == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("rule", [f"{r}_{v}" for r in STACKABLE for v in ("frozen", "shallow")])
def test_the_variants_of_a_stackable_rule_stack_too(tmp_path, rule):
    alone = [_cfg(tmp_path / "alone", rule, "resmlp", s) for s in (3, 4)]
    for c in alone:
        train(c)
    stacked = [_cfg(tmp_path / "stack", rule, "resmlp", s) for s in (3, 4)]
    assert [r.status for r in train_stack(stacked)] == ["finished", "finished"]
    for a, b in zip(alone, stacked, strict=True):
        assert_same_metrics(a, b)


@pytest.mark.parametrize("rule", REFUSED)
def test_a_rule_that_cannot_stack_says_why_and_is_refused(tmp_path, rule):
    cfg = _cfg(tmp_path, rule, "resmlp", 1)
    reason = why_not_stacked(cfg)
    assert reason and reason.startswith(f"{rule}: ") and "\n" not in reason
    with pytest.raises(ValueError, match=rule):
        train_stack([cfg, _cfg(tmp_path, rule, "resmlp", 2)])


def test_only_runs_of_one_kind_share_a_key(tmp_path):
    base = _cfg(tmp_path, "dfa", "resmlp", 1)
    same = [
        _cfg(tmp_path, "dfa", "resmlp", 2),
        _cfg(tmp_path, "dfa", "resmlp", 3, "setting=other", "random_labels=true"),
    ]
    other = [
        _cfg(tmp_path, "fa", "resmlp", 1),
        _cfg(tmp_path, "dfa", "resmlp", 1, "d=64"),
        _cfg(tmp_path, "dfa", "resmlp", 1, "lr=0.01"),
        _cfg(tmp_path, "dfa", "resmlp", 1, "epochs=3"),
        _cfg(tmp_path, "dfa", "resmlp", 1, "lam=0.01"),
        _cfg(tmp_path, "dfa", "resmlp", 1, "dfa.scale=2"),
    ]
    assert all(stack_key(c) == stack_key(base) for c in same)
    assert all(stack_key(c) != stack_key(base) for c in other)
    with pytest.raises(ValueError, match="one kind"):
        train_stack([base, other[0]])


@pytest.mark.slow
def test_resuming_crosses_between_a_stack_and_a_run_alone(tmp_path):
    """A stack interrupted after one epoch resumes alone, and a run interrupted alone resumes in a
    stack: both continue the numbers of the uninterrupted run (checkpoints are per run)."""
    full = [_cfg(tmp_path / "full", "ep", "smallcnn", s, "epochs=3") for s in (5, 6)]
    for c in full:
        train(c)
    cut = [_cfg(tmp_path / "cut", "ep", "smallcnn", s, "epochs=3") for s in (5, 6)]
    assert [r.status for r in train_stack(cut, stop_after=1)] == ["interrupted"] * 2
    assert train(cut[0])["status"] == "finished"  # the stack's checkpoint, resumed alone
    assert train(cut[1], stop_after=2)["status"] == "interrupted"
    results = train_stack(
        cut
    )  # cut[0] finished: skipped; cut[1] resumed at epoch 2 in a stack of one
    assert [r.status for r in results] == ["finished", "finished"]
    for a, b in zip(full, cut, strict=True):
        assert_same_metrics(a, b)
        _, meta_a = load_checkpoint(RunFolder(run_path(a)).last_checkpoint)
        _, meta_b = load_checkpoint(RunFolder(run_path(b)).last_checkpoint)
        assert (meta_b["epoch"], meta_b["step"]) == (meta_a["epoch"], meta_a["step"]) == (3, 3 * 23)


@pytest.mark.slow
def test_a_run_that_diverges_stops_and_its_neighbours_go_on(tmp_path):
    """One run's parameters turn NaN (planted in its checkpoint after epoch 1): it is recorded as
    diverged in epoch 2, and the NaN reaches no other run of the stack."""
    from creditaudit.runs.checkpoint import save_checkpoint

    alone = _cfg(tmp_path / "alone", "dfa", "resmlp", 7, "epochs=3")
    train(alone)
    stacked = [_cfg(tmp_path / "stack", "dfa", "resmlp", s, "epochs=3") for s in (7, 8)]
    train_stack(stacked, stop_after=1)
    ckpt = RunFolder(run_path(stacked[1])).last_checkpoint
    state, meta = load_checkpoint(ckpt)
    state["model"]["head.weight"][0, 0] = float("nan")
    save_checkpoint(ckpt, state, meta)
    results = train_stack(stacked)
    assert [r.status for r in results] == ["finished", "diverged"]
    assert results[1].summary["epochs_done"] == 2 and "epoch 2" in results[1].error
    assert_same_metrics(alone, stacked[0])


class NoHostSync(TorchDispatchMode):
    """Records every op that reads a value back to the host or has a data-dependent shape."""

    def __enter__(self):
        self.seen: list[str] = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().split("::")[-1].split(".")[0] in (
            "_local_scalar_dense",
            "nonzero",
            "masked_select",
            "unique",
            "_unique2",
        ):
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_a_stacked_step_never_waits_for_the_device(tmp_path):
    """No host synchronisation inside a step (what a CUDA graph needs): no op that reads a value
    back to the host (``.item()``, ``bool()``, data-dependent shapes) runs in the forward and
    backward pass of a stacked step, for any stackable rule and architecture. (The optimizer step
    is AdamW, capturable on CUDA; on the CPU it reads its step count, by design.)"""
    from creditaudit.data.loader import stacked_epoch
    from creditaudit.training.run import build_run

    for rule in STACKABLE:
        for arch in ARCHS.names():
            runs = [
                build_run(resolve_rule_options(_cfg(tmp_path, rule, arch, s, "lam=0.01")))
                for s in (1, 2)
            ]
            stack = Stack(runs)
            x, y = next(iter(stacked_epoch([r.loader for r in runs], 0)))
            with NoHostSync() as mode:
                stack.backward(x, y)
            assert mode.seen == [], (rule, arch, mode.seen)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize(
    "rule,arch", [("dfa", "resmlp"), ("ep", "resmlp"), ("fa", "vit_mini"), ("bp", "smallcnn")]
)
def test_a_graphed_stack_computes_what_the_eager_stack_computes(tmp_path, rule, arch):
    """CUDA graphs replay the eager step: the same figures to float rounding, every epoch (the
    last, partial batch of an epoch has a graph of its own), and a graphed stack's checkpoint
    resumes alone."""
    cfgs = {
        mode: [
            _cfg(tmp_path / mode, rule, arch, s, "epochs=4", "device=cuda", "batch_size=32")
            for s in (1, 2)
        ]
        for mode in ("eager", "graphed")
    }
    assert [r.status for r in train_stack(cfgs["eager"])] == ["finished"] * 2
    assert [r.status for r in train_stack(cfgs["graphed"], graph=True, stop_after=3)] == [
        "interrupted"
    ] * 2
    assert train(cfgs["graphed"][0])["status"] == "finished"  # resumed alone
    assert [r.status for r in train_stack(cfgs["graphed"][1:], graph=True)] == ["finished"]
    for a, b in zip(cfgs["eager"], cfgs["graphed"], strict=True):
        assert_same_metrics(a, b)


# ---------------------------------------------------------------------------------------------
# The probes of a stack, taken together
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", STACKABLE)
def test_a_stacks_probe_gives_each_runs_own_figures(tmp_path, rule, arch):
    """The full probe (every figure, trajectories included) of two runs taken together under vmap
    equals each run's probe alone, to float rounding (module docstring), and its shared part
    never reads a value back to the host."""
    from creditaudit.data.loader import stacked_epoch
    from creditaudit.diagnostics.probe import probe
    from creditaudit.training.run import build_run
    from creditaudit.training.stack import finish_probe

    extra = ("lam=0.01", "diag.trajectory=true", "diag.rho_n=120", "diag.stab_batch_size=40")
    cfgs = [resolve_rule_options(_cfg(tmp_path, rule, arch, s, *extra)) for s in (1, 2)]
    runs = [build_run(c) for c in cfgs]
    stack = Stack(runs)
    x, y = next(iter(stacked_epoch([r.loader for r in runs], 0)))
    stack.train_step(x, y)  # away from the initialisation
    stack.unstack()
    with NoHostSync() as mode:
        shared = stack.probe([0, 1], cfgs[0].diag, full=True)
    assert mode.seen == [], mode.seen
    for run, (figures, rho) in zip(runs, shared, strict=True):
        together = finish_probe(run, figures, rho, run.cfg.diag, full=True)
        alone = probe(run.model, run.rule, run.data, run.cfg.diag, full=True, seed=run.cfg.seed)
        assert (
            set(together) == set(alone)
            and any(k.startswith("traj/") for k in alone)
            and "credit/rho_deep" in alone
        )
        for k, va in alone.items():
            vb = together[k]
            if not math.isfinite(va):
                assert not math.isfinite(vb), (k, va, vb)
            elif k.startswith(AMPLIFIED):
                assert vb == pytest.approx(va, rel=0.05, abs=1e-4), (k, va, vb)
            else:
                assert vb == pytest.approx(va, rel=2e-3, abs=1e-6), (k, va, vb)


def test_a_stack_takes_its_runs_probes_together_one_group_per_diagnostics_config(
    tmp_path, monkeypatch
):
    """No run of a stack is probed alone: runs whose diagnostics differ (here: trajectories for
    one) are probed in a group each, and each run logs the keys it logs alone."""
    import creditaudit.training.run

    alone = [
        _cfg(tmp_path / "alone", "dfa", "resmlp", 1),
        _cfg(tmp_path / "alone", "dfa", "resmlp", 2, "diag.trajectory=true"),
    ]
    for c in alone:
        train(c)

    def refuse(*args, **kwargs):
        raise AssertionError("a run of a stack was probed alone")

    monkeypatch.setattr(creditaudit.training.run, "diagnose", refuse)
    stacked = [
        _cfg(tmp_path / "stack", "dfa", "resmlp", 1),
        _cfg(tmp_path / "stack", "dfa", "resmlp", 2, "diag.trajectory=true"),
    ]
    assert len({stack_key(c) for c in stacked}) == 1
    assert [r.status for r in train_stack(stacked)] == ["finished", "finished"]
    for a, b in zip(alone, stacked, strict=True):
        assert_same_metrics(a, b)
    assert all(r["time/diag_s"] > 0 for r in RunFolder(run_path(stacked[1])).read_metrics())


def test_a_run_whose_own_probe_fails_fails_alone(tmp_path, monkeypatch):
    """ρ_l is each run's own work: when it fails for one run, that run is recorded failed, and
    the other runs of the stack finish."""
    import creditaudit.training.stack

    real = creditaudit.training.stack.finish

    def failing(figures, rho, model, model64, y, cfg, *, seed):
        if seed == 2 and rho:
            raise RuntimeError("planted")
        return real(figures, rho, model, model64, y, cfg, seed=seed)

    monkeypatch.setattr(creditaudit.training.stack, "finish", failing)
    stacked = [_cfg(tmp_path, "dfa", "resmlp", s) for s in (1, 2)]
    results = train_stack(stacked)
    assert [r.status for r in results] == ["finished", "failed"]
    assert "planted" in RunFolder(run_path(stacked[1])).read_summary()["error"]
