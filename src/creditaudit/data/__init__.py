"""Datasets as on-device tensors: registry, loading pipeline, fetching, mini-batching.

Layout (one concern per module):

- ``base``      DataConfig, TensorDataset, DatasetMissingError, the DATASETS/SOURCES registries
- ``pipeline``  load_dataset: subsets, random labels, normalisation, augmentation choice
- ``loader``    DeviceLoader and the batched crop_flip augmentation
- ``fetch``     downloads with checksum verification; check_dataset / fetch_dataset
- ``idx``       mnist, fashion_mnist (IDX files)
- ``cifar``     cifar10 (official binary batches)
- ``digits``    scikit-learn's bundled 8x8 digits
- ``mnist1d``   MNIST-1D, generated offline and cached
- ``student``   the synthetic teacher-student task

Importing this package registers every dataset. Data modules import only torch, numpy and
(lazily) scikit-learn / mnist1d — never models, rules or the trainer.
"""

from __future__ import annotations

from creditaudit.data import cifar, digits, idx, mnist1d, student  # noqa: F401  (register datasets)
from creditaudit.data.base import (
    DATASETS,
    SOURCES,
    DataConfig,
    DatasetMissingError,
    TensorDataset,
    default_data_dir,
)
from creditaudit.data.fetch import check_dataset, fetch_dataset
from creditaudit.data.loader import DeviceLoader
from creditaudit.data.pipeline import load_dataset

__all__ = [
    "DATASETS",
    "SOURCES",
    "DataConfig",
    "DatasetMissingError",
    "DeviceLoader",
    "TensorDataset",
    "check_dataset",
    "default_data_dir",
    "fetch_dataset",
    "load_dataset",
]
