"""load_dataset's recipe (subsets, random labels, normalisation, augmentation) and the registry walk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from creditaudit.data import (
    DATASETS,
    SOURCES,
    DataConfig,
    TensorDataset,
    check_dataset,
    default_data_dir,
    fetch_dataset,
    load_dataset,
)
from creditaudit.data.pipeline import stratified_subset
from creditaudit.registry import UnknownNameError

OFFLINE = ["digits", "mnist1d", "student"]


# --------------------------------------------------------------------------------------------
# Registry walk (every dataset, without anyone remembering to add it)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_has_summary_and_source(name):
    assert name in SOURCES
    entry = next(e for e in DATASETS.entries() if e.name == name)
    assert entry.summary and "\n" not in entry.summary


def test_expected_names():
    assert set(DATASETS.names()) == {
        "fashion_mnist",
        "mnist",
        "cifar10",
        "digits",
        "mnist1d",
        "student",
    }


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_datasets_always_available(name, tmp_path):
    assert check_dataset(name, str(tmp_path))


def test_unknown_name_is_loud(tmp_path):
    for call in (
        lambda: load_dataset(DataConfig(dataset="cifar100"), 0),
        lambda: check_dataset("cifar100", str(tmp_path)),
        lambda: fetch_dataset("cifar100", str(tmp_path)),
    ):
        with pytest.raises(UnknownNameError, match="Did you mean 'cifar10'"):
            call()


def test_every_config_field_is_documented():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f"DataConfig.{f.name} has no help string"


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CREDITAUDIT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.delenv("CREDITAUDIT_DATA_DIR")
    assert default_data_dir().endswith(".cache/creditaudit/data")


# --------------------------------------------------------------------------------------------
# Subsets
# --------------------------------------------------------------------------------------------


def test_subsets_are_fixed_across_run_seeds_and_stratified():
    cfg = DataConfig(dataset="digits", train_subset=200, test_subset=50)
    a, b = load_dataset(cfg, seed=0), load_dataset(cfg, seed=1)
    assert a.x_train.shape == (200, 1, 8, 8) and a.x_test.shape == (50, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    full = load_dataset(DataConfig(dataset="digits"), seed=0)
    expected = torch.bincount(full.y_train, minlength=10).double() * 200 / len(full.y_train)
    counts = torch.bincount(a.y_train, minlength=10).double()
    assert ((counts - expected).abs() < 1).all()  # largest-remainder quotas


def test_stratified_subset_exact_size_and_unique():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(y, 11, 3, seed=5)
    assert len(idx) == 11 and len(set(idx.tolist())) == 11 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(y[idx], minlength=3).tolist() == [
        6,
        3,
        2,
    ]  # 5.5, 3.3, 2.2 -> largest remainder
    assert torch.equal(idx, stratified_subset(y, 11, 3, seed=5))


def test_subset_too_large_is_a_value_error():
    with pytest.raises(ValueError, match="exceeds the 1437 train examples"):
        load_dataset(DataConfig(dataset="digits", train_subset=5000), seed=0)


# --------------------------------------------------------------------------------------------
# Random labels
# --------------------------------------------------------------------------------------------


def test_random_labels_depend_on_seed_and_spare_the_test_split():
    true = load_dataset(DataConfig(dataset="digits"), seed=0)
    cfg = DataConfig(dataset="digits", random_labels=True)
    r0, r0_again, r1 = (
        load_dataset(cfg, seed=0),
        load_dataset(cfg, seed=0),
        load_dataset(cfg, seed=1),
    )
    assert torch.equal(r0.y_train, r0_again.y_train)  # deterministic
    assert not torch.equal(r0.y_train, r1.y_train)  # drawn from the run seed
    assert (r0.y_train == true.y_train).float().mean() < 0.2  # ~1/10 agree by chance
    assert torch.bincount(r0.y_train, minlength=10).min() > 100  # uniform over classes
    assert torch.equal(r0.y_test, true.y_test)  # test labels untouched
    assert torch.equal(r0.x_train, true.x_train) and torch.equal(r0.x_test, true.x_test)


def test_random_labels_on_a_subset():
    cfg = DataConfig(dataset="digits", train_subset=300, random_labels=True)
    a, b = load_dataset(cfg, seed=0), load_dataset(cfg, seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, b.y_train)


# --------------------------------------------------------------------------------------------
# Normalisation, augmentation choice, config validation, the container
# --------------------------------------------------------------------------------------------


def test_vector_normalisation_is_global_with_train_stats():
    cfg = DataConfig(dataset="student", student_train=500, student_test=200, student_dim=8)
    ds = load_dataset(cfg, seed=0)
    raw = DATASETS.get("student")(cfg, "", 0)
    mean, std = raw.x_train.mean(), raw.x_train.std(unbiased=False)
    torch.testing.assert_close(ds.x_train, (raw.x_train - mean) / std)
    torch.testing.assert_close(ds.x_test, (raw.x_test - mean) / std)


def test_augment_resolution():
    assert load_dataset(DataConfig(dataset="digits"), 0).augment == "none"
    assert load_dataset(DataConfig(dataset="digits", augment="crop_flip"), 0).augment == "crop_flip"
    with pytest.raises(ValueError, match="needs image inputs"):
        load_dataset(
            DataConfig(dataset="student", student_train=10, student_test=10, augment="crop_flip"), 0
        )
    with pytest.raises(ValueError, match=r"data.augment"):
        load_dataset(DataConfig(dataset="digits", augment="mixup"), 0)


@pytest.mark.parametrize(
    "field,value", [("train_subset", -1), ("student_alpha", 1.5), ("student_classes", 1)]
)
def test_an_out_of_range_data_field_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        load_dataset(DataConfig(dataset="student", **{field: value}), 0)


def test_tensor_dataset_to_and_checks():
    ds = load_dataset(DataConfig(dataset="digits", train_subset=20, test_subset=10), 0)
    moved = ds.to("cpu")
    assert (
        moved is not ds
        and moved.input_shape == ds.input_shape
        and torch.equal(moved.x_train, ds.x_train)
    )
    with pytest.raises(ValueError, match="do not match"):
        dataclasses.replace(ds, y_train=ds.y_train[:-1])
    with pytest.raises(TypeError, match="float32"):
        dataclasses.replace(ds, x_train=ds.x_train.double())
    assert isinstance(ds, TensorDataset)
