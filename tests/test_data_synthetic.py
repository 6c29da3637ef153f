"""The offline datasets: digits (bundled), mnist1d (generated + cached), student (teacher-student)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from creditaudit.data import DataConfig, check_dataset, fetch_dataset, load_dataset
from creditaudit.data import mnist1d as mnist1d_module
from creditaudit.data import student as student_module

# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    a = load_dataset(DataConfig(dataset="digits"), seed=0)
    b = load_dataset(DataConfig(dataset="digits"), seed=123)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.augment == "none"
    assert torch.equal(a.x_train, b.x_train) and torch.equal(
        a.y_test, b.y_test
    )  # same split for every seed
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert check_dataset("digits")


# --------------------------------------------------------------------------------------------
# mnist1d
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d_first_build(tmp_path_factory):
    """Build MNIST-1D once into a fresh data_dir, recording the global RNG states around it."""
    data_dir = tmp_path_factory.mktemp("data")
    random.seed(1234)
    np.random.seed(5678)
    before = (random.getstate(), np.random.get_state())
    ds = load_dataset(DataConfig(dataset="mnist1d", data_dir=str(data_dir)), seed=0)
    after = (random.getstate(), np.random.get_state())
    return data_dir, ds, before, after


def test_mnist1d_shapes(mnist1d_first_build):
    _, ds, _, _ = mnist1d_first_build
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.input_shape == (40,) and ds.num_classes == 10 and ds.augment == "none"
    assert torch.bincount(ds.y_train, minlength=10).min() > 350
    assert (
        abs(ds.x_train.mean().item()) < 1e-5
        and abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-5
    )


def test_mnist1d_leaves_global_rng_untouched(mnist1d_first_build):
    _, _, (py_before, np_before), (py_after, np_after) = mnist1d_first_build
    assert py_before == py_after
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]


def test_mnist1d_cache_is_used_and_pickle_free(mnist1d_first_build, monkeypatch):
    data_dir, first, _, _ = mnist1d_first_build
    cache = data_dir / "mnist1d" / "mnist1d.npz"
    assert check_dataset("mnist1d", str(data_dir)) == str(cache)
    with np.load(cache, allow_pickle=False) as npz:  # would raise on any object array
        assert npz["x"].dtype == np.float32 and npz["y"].dtype == np.int64

    def no_rebuild():
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mnist1d_module, "build_mnist1d", no_rebuild)
    again = load_dataset(DataConfig(dataset="mnist1d", data_dir=str(data_dir)), seed=1)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert fetch_dataset("mnist1d", str(data_dir), quiet=True) == str(cache)


def test_mnist1d_rebuilds_a_corrupt_cache(mnist1d_first_build, tmp_path, monkeypatch):
    _, first, _, _ = mnist1d_first_build
    cache = tmp_path / "mnist1d" / "mnist1d.npz"
    cache.parent.mkdir()
    cache.write_bytes(b"not a zip file")
    built = {
        "x": first.x_train.numpy(),
        "y": first.y_train.numpy(),
        "x_test": first.x_test.numpy(),
        "y_test": first.y_test.numpy(),
        "args_json": np.array(mnist1d_module.generator_args()[1]),
        "mnist1d_version": np.array(mnist1d_module.package_version()),
    }
    monkeypatch.setattr(
        mnist1d_module, "build_mnist1d", lambda signals=5000: built
    )  # skip the 3 s regeneration
    with pytest.warns(UserWarning, match="unreadable"):
        load_dataset(DataConfig(dataset="mnist1d", data_dir=str(tmp_path)), seed=0)
    with np.load(cache, allow_pickle=False) as npz:
        assert npz["x"].shape == (4000, 40)


# --------------------------------------------------------------------------------------------
# student
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_student_classes_not_degenerate(alpha):
    ds = load_dataset(DataConfig(dataset="student", student_alpha=alpha), seed=0)
    assert ds.x_train.shape == (20000, 64) and ds.x_test.shape == (5000, 64)
    assert ds.input_shape == (64,) and ds.num_classes == 10
    share = torch.bincount(ds.y_train, minlength=10).double() / len(ds.y_train)
    print(
        f"alpha={alpha}: class shares {[round(s, 3) for s in share.tolist()]}"
    )  # shown with pytest -s
    assert share.min() >= 0.01


def test_student_task_is_fixed_by_config_not_seed():
    cfg = DataConfig(dataset="student", student_train=600, student_test=100)
    a, b = load_dataset(cfg, seed=0), load_dataset(cfg, seed=99)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    # more test examples never change the training set
    c = load_dataset(DataConfig(dataset="student", student_train=600, student_test=300), seed=0)
    assert torch.equal(a.x_train, c.x_train) and torch.equal(a.y_train, c.y_train)


def test_student_labels_are_teacher_argmax_and_depend_on_alpha():
    cfg = DataConfig(
        dataset="student",
        student_train=2000,
        student_test=10,
        student_dim=16,
        student_width=32,
        student_classes=5,
        student_alpha=1.0,
    )
    ds = load_dataset(cfg, seed=0)
    x = student_module.student_inputs(16, 2000, "train")  # raw inputs, before normalisation
    assert torch.equal(student_module.teacher_logits(x, cfg).argmax(1), ds.y_train)
    assert ds.input_shape == (16,) and ds.num_classes == 5
    linear = load_dataset(DataConfig(**{**vars(cfg), "student_alpha": 0.0}), seed=0)
    assert torch.equal(linear.x_train, ds.x_train)  # same inputs, same weights ...
    assert 0 < (linear.y_train != ds.y_train).float().mean() < 0.5  # ... only phi changed


def test_mnist1d_signals_sets_its_size_and_is_cached_apart(mnist1d_first_build):
    """data.mnist1d_signals=N generates N signals (80/20), cached next to the default dataset,
    which stays as it was."""
    data_dir, default, _, _ = mnist1d_first_build
    ds = load_dataset(
        DataConfig(dataset="mnist1d", data_dir=str(data_dir), mnist1d_signals=1000), seed=0
    )
    assert ds.x_train.shape == (800, 40) and ds.x_test.shape == (200, 40)
    assert (data_dir / "mnist1d" / "mnist1d-1000.npz").is_file()
    again = load_dataset(DataConfig(dataset="mnist1d", data_dir=str(data_dir)), seed=0)
    assert torch.equal(again.x_train, default.x_train)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("dataset=digits", "mnist1d_signals=1000"), "has no effect on dataset 'digits'"),
        (("dataset=mnist1d", "mnist1d_signals=50"), "must be >= 100"),
    ],
)
def test_mnist1d_signals_is_checked(overrides, message):
    from creditaudit.config import TrainConfig, apply_overrides, validate
    from creditaudit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(TrainConfig(), overrides))
