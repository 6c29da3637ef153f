"""Acceptance figures of the foundation, on the real default dataset (skipped where it is absent)."""

from __future__ import annotations

import pytest

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.data import check_dataset
from creditaudit.training.trainer import train

needs_fashion_mnist = pytest.mark.skipif(
    check_dataset("fashion_mnist") is None,
    reason="Fashion-MNIST is not installed (make setup fetches it)",
)


@pytest.mark.slow
@needs_fashion_mnist
def test_bp_resmlp_reaches_85_percent_on_fashion_mnist_in_2_epochs(tmp_path):
    cfg = apply_overrides(
        TrainConfig(),
        [
            "rule=bp",
            "arch=resmlp",
            "dataset=fashion_mnist",
            "d=256",
            "L=4",
            "epochs=2",
            "progress=false",
            f"results={tmp_path}",
        ],
    )
    summary = train(cfg)
    assert summary["status"] == "finished"
    assert summary["final"]["test/acc"] >= 0.85, summary["final"]
