"""Write CIFAR-10-shaped timing data in the official binary layout: random pixels, labels 0–9.

    python bench/write_cifar_shaped.py DATA_DIR

Writes ``DATA_DIR/cifar10/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin`` (10,000 records
each: 1 label byte, 3,072 pixel bytes), which ``creditaudit`` reads as ``dataset=cifar10`` with
``data_dir=DATA_DIR``. For benchmarks and timing sweeps on a machine without the dataset: what a
run computes on it means nothing, what it costs is the real dataset's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from creditaudit.data.cifar import FOLDER, TEST_FILE, TRAIN_FILES


def main(data_dir: str) -> None:
    folder = Path(data_dir) / "cifar10" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in (*TRAIN_FILES, TEST_FILE):
        records = rng.integers(0, 256, size=(10_000, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=10_000)
        (folder / name).write_bytes(records.tobytes())
    print(f"wrote CIFAR-10-shaped random data to {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
