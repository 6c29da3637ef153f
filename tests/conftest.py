"""Shared fixtures: small architectures for every registered name, and tiny training configs."""
from __future__ import annotations

import pytest
import torch

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.models import ARCHS, ModelConfig

# A small instance and a matching input shape for every architecture (tests walk ARCHS, so a new
# architecture without an entry here fails loudly rather than going untested).
SMALL_ARCHS: dict[str, tuple[ModelConfig, tuple[int, ...]]] = {
    "resmlp": (ModelConfig(d=16, L=3), (1, 8, 8)),
    "mlp": (ModelConfig(d=16, L=2, activation="tanh"), (20,)),
    "smallcnn": (ModelConfig(d=16, channels=(4, 6, 8)), (1, 8, 8)),
    "vit_mini": (ModelConfig(d=16, L=2, heads=2, patch=4), (1, 8, 8)),
}


@pytest.fixture(params=ARCHS.names())
def arch(request):
    name = request.param
    assert name in SMALL_ARCHS, f"add a small config for architecture {name!r} to tests/conftest.py"
    return name


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: on a busy 2-core machine two threads make the tiny matrix
    products of these tests tens of times slower, and one thread makes them bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, *overrides: str) -> TrainConfig:
    """A seconds-long run on the bundled digits data, one thread (bit-reproducible)."""
    shallow = any(o.startswith("rule=") and o.endswith("_shallow") for o in overrides)  # L=0: no depth to set
    base = [
        "dataset=digits", "arch=resmlp", "d=32", *([] if shallow else ["L=2"]), "epochs=2", "batch_size=64", "threads=1",
        "progress=false", f"results={tmp_path / 'results'}", f"data_dir={tmp_path / 'data'}",
    ]
    return apply_overrides(TrainConfig(), [*base, *overrides])


def run_metrics(cfg: TrainConfig) -> list[dict]:
    """A run's metrics.jsonl records without the wall-clock timings (everything else is a
    deterministic function of the config)."""
    from creditaudit.runs.folder import RunFolder, run_dir

    folder = RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in folder.read_metrics()]
