"""scikit-learn's bundled 8x8 digits (UCI optical digits test set): offline, 1797 images.

There is no official split, so one is fixed here: stratified, 360 test images (20%), drawn with
``random_state=0`` — the same 1437/360 split on every machine and for every run seed. Pixels are
integers 0..16 in the source and are scaled to [0, 1].
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from creditaudit.data.base import DATASETS, SOURCES, DataConfig, DatasetMissingError, TensorDataset

TEST_SIZE = 360
SPLIT_SEED = 0


@DATASETS.register(
    "digits", "scikit-learn's bundled 8x8 digits, 1437/360 fixed stratified split, offline"
)
def load_digits(cfg: DataConfig, data_dir: str, seed: int) -> TensorDataset:
    from sklearn.datasets import load_digits as sk_load_digits  # import cost only when used
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)  # (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return TensorDataset(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr)).unsqueeze(1),  # (1437, 1, 8, 8)
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te)).unsqueeze(1),  # (360, 1, 8, 8)
        y_test=torch.from_numpy(y_te),
        num_classes=10,
        input_shape=(1, 8, 8),
        augment="none",
    )


class DigitsSource:
    """Bundled with scikit-learn: always present, nothing to fetch."""

    def locate(self, data_dir: str) -> str | None:
        try:
            path = resources.files("sklearn.datasets") / "data" / "digits.csv.gz"
        except ModuleNotFoundError:
            return None
        return str(path) if path.is_file() else "bundled with scikit-learn"

    def fetch(self, data_dir: str, *, quiet: bool = False) -> str:
        found = self.locate(data_dir)
        if found is None:
            raise DatasetMissingError(
                "dataset 'digits' needs scikit-learn: pip install scikit-learn"
            )
        return found


SOURCES.add("digits", DigitsSource(), "bundled with scikit-learn (sklearn.datasets.load_digits)")
