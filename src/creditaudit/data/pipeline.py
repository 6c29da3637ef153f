"""``load_dataset``: raw dataset -> fixed subsets -> (random labels) -> normalisation -> augmentation choice.

The order is part of the definition:

1. the raw loader from ``DATASETS`` (float32 inputs in natural scale, the dataset's default augmentation);
2. subsets (``train_subset``/``test_subset``): class-stratified, drawn with the fixed ``DATA_SEED``
   (never the run seed), so every seed of a study sees the same examples; kept in source order;
3. ``random_labels``: training labels replaced by i.i.d. uniform labels from a generator derived
   from the run seed — the only use of ``seed`` here; test labels are never touched;
4. normalisation with statistics of the (subset) training split, applied to both splits:
   per channel for images (mean/std over N, H, W), one global mean/std for vectors (a vector is
   treated as a one-channel signal: per-position statistics would distort MNIST-1D's translated
   templates). Population std; a constant channel is left unscaled;
5. ``augment``: "auto" resolves to the dataset's default (crop_flip for cifar10, none otherwise);
   crop_flip needs image inputs.

Everything stays on the CPU; move it with ``TensorDataset.to(device)``.
"""

from __future__ import annotations

import dataclasses

import torch

from creditaudit.data.base import (
    DATA_SEED,
    DATASETS,
    DataConfig,
    TensorDataset,
    derive_seed,
    resolve_data_dir,
)
from creditaudit.errors import ConfigError


def stratified_subset(y: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-stratified subset of size ``n`` of labels ``y`` (N,).

    Class quotas follow the class frequencies (largest-remainder rounding, so they sum to ``n``);
    within a class the members are the first ones of a seeded random permutation.
    """
    total = y.numel()
    if not 0 < n <= total:
        raise ValueError(f"subset size {n} must lie in 1..{total}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=g)  # (N,)
    counts = torch.bincount(y, minlength=num_classes).double()  # (C,)
    exact = counts * n / total
    quota = exact.floor().long()
    remainder = n - int(quota.sum())
    if remainder:
        # ties broken by class index: stable sort of the fractional parts, largest first
        order = torch.sort(exact - quota, descending=True, stable=True).indices
        quota[order[:remainder]] += 1
    y_perm = y[perm]  # (N,) labels in permuted order
    chosen = [perm[y_perm == c][: int(quota[c])] for c in range(num_classes)]
    return torch.cat(chosen).sort().values


def normalisation_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std, broadcastable against x (N, *input_shape): per channel for images, global for vectors."""
    dims = (0, 2, 3) if x.ndim == 4 else tuple(range(x.ndim))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)  # (1, C, 1, 1) or (1, 1)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


def load_dataset(cfg: DataConfig, seed: int) -> TensorDataset:
    """The dataset a run trains on (on CPU). See the module docstring for the exact recipe.

    Raises ``UnknownNameError`` for an unknown name, :class:`DatasetMissingError` when files are
    missing or corrupt, ``ValueError`` for an invalid config (e.g. a subset larger than the split).
    """
    cfg.validate()
    raw_loader = DATASETS.get(cfg.dataset)
    ds = raw_loader(cfg, resolve_data_dir(cfg.data_dir), seed)

    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    for split, size, y in (("train", cfg.train_subset, y_tr), ("test", cfg.test_subset, y_te)):
        if size > y.numel():
            raise ConfigError(
                f"data.{split}_subset={size} exceeds the {y.numel()} {split} examples of {ds.name}"
            )
    if 0 < cfg.train_subset < y_tr.numel():
        keep = stratified_subset(
            y_tr, cfg.train_subset, ds.num_classes, derive_seed(DATA_SEED, ds.name, "train")
        )
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if 0 < cfg.test_subset < y_te.numel():
        keep = stratified_subset(
            y_te, cfg.test_subset, ds.num_classes, derive_seed(DATA_SEED, ds.name, "test")
        )
        x_te, y_te = x_te[keep], y_te[keep]

    if cfg.random_labels:
        g = torch.Generator().manual_seed(derive_seed(seed, "random_labels"))
        y_tr = torch.randint(0, ds.num_classes, y_tr.shape, generator=g)  # (N,) int64

    mean, std = normalisation_stats(x_tr)
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std

    augment = ds.augment if cfg.augment == "auto" else cfg.augment
    if augment == "crop_flip" and len(ds.input_shape) != 3:
        raise ConfigError(
            f"data.augment=crop_flip needs image inputs; {ds.name} has input shape {ds.input_shape}"
        )

    return dataclasses.replace(
        ds,
        x_train=x_tr.contiguous(),
        y_train=y_tr,
        x_test=x_te.contiguous(),
        y_test=y_te,
        augment=augment,
    )
