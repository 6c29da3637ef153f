"""Shared fixtures: small architectures for every registered name, and tiny training configs."""

from __future__ import annotations

import pytest
import torch

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.models import ARCHS, ModelConfig
from creditaudit.testing import run_metrics, small_overrides  # noqa: F401  (the tests' helpers are the kit's)

# A small instance of every registered architecture (its own registration declares it), on 1×8×8
# inputs: a new architecture is tested by every test that walks ARCHS without an entry here.
SMALL_INPUT = (1, 8, 8)
SMALL_ARCHS: dict[str, tuple[ModelConfig, tuple[int, ...]]] = {
    name: (ModelConfig(**ARCHS.get(name).small), SMALL_INPUT) for name in ARCHS.names()
}


@pytest.fixture(params=ARCHS.names())
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: on a busy 2-core machine two threads make the tiny matrix
    products of these tests tens of times slower, and one thread makes them bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _consoles_off_a_terminal(monkeypatch):
    """The CLI prints as it does into a log whatever runs the tests (``pytest -s`` in a terminal of
    any width included): tables 160 columns wide, other lines never wrapped."""
    from creditaudit import cli

    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "width", 160)
        monkeypatch.setattr(console, "soft_wrap", True)


def tiny_config(tmp_path, *overrides: str) -> TrainConfig:
    """A seconds-long run on the bundled digits data, one thread (bit-reproducible)."""
    shallow = any(
        o.startswith("rule=") and o.endswith("_shallow") for o in overrides
    )  # L=0: no depth to set
    base = [
        "dataset=digits",
        "arch=resmlp",
        "d=32",
        *([] if shallow else ["L=2"]),
        "epochs=2",
        "batch_size=64",
        "threads=1",
        "progress=false",
        f"results={tmp_path / 'results'}",
        f"data_dir={tmp_path / 'data'}",
    ]
    return apply_overrides(TrainConfig(), [*base, *overrides])
