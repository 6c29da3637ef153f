"""CIFAR-10 in its official binary format: reading, safe tarball extraction, fetching.

Format (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"): ``data_batch_{1..5}.bin``
and ``test_batch.bin``, each a sequence of 3073-byte records: 1 label byte (0..9), then 3072 pixel
bytes as three 32x32 row-major planes R, G, B. So a record reshapes straight to (3, 32, 32) —
channels first, no transpose. A file whose size is not a multiple of 3073 is truncated.

Accepted layouts under ``<data_dir>/cifar10/``: the extracted ``cifar-10-batches-bin/`` folder, or
the tarball ``cifar-10-binary.tar.gz``, which is extracted once, next to itself. Extraction checks
every member first (no absolute paths, no ``..``, no links or devices) and writes only the six
batch files, into a temporary folder renamed into place, so parallel workers never see a partial
folder. CIFAR-10's default training augmentation is ``crop_flip`` (docs/science.md §3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from creditaudit.data.base import (
    DATASETS,
    SOURCES,
    DataConfig,
    DatasetMissingError,
    TensorDataset,
    fetch_hint,
)
from creditaudit.data.fetch import RemoteFile, fetch_files, manual_instructions

RECORD_BYTES = 1 + 3 * 32 * 32  # label byte + R, G, B planes
FOLDER = "cifar-10-batches-bin"
TARBALL = RemoteFile(
    name="cifar-10-binary.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    digest="c32a1d4ab5d03f1ae242ce379f8ae69d",
    algo="md5",
)
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
BATCH_FILES = (*TRAIN_FILES, TEST_FILE)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file -> (images (n, 3, 32, 32) uint8, labels (n,) uint8)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0 or size % RECORD_BYTES:
        raise DatasetMissingError(
            f"{path} is truncated or corrupt: {size} bytes is not a positive multiple of {RECORD_BYTES} "
            f"(1 label byte + 3072 pixel bytes per record; a full batch is {10000 * RECORD_BYTES}). "
            f"Delete {path.parent} and re-fetch: {fetch_hint('cifar10')}"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD_BYTES)  # (n, 3073)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DatasetMissingError(
            f"{path} is corrupt: label {int(labels.max())} out of range 0..9. "
            f"Delete {path.parent} and re-fetch: {fetch_hint('cifar10')}"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32)  # planes R, G, B, each row-major
    return images, labels


def _check_member(member: tarfile.TarInfo, tarball: Path) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or member.name.startswith(("/", "\\")):
        raise DatasetMissingError(
            f"{tarball}: refusing to extract unsafe member {member.name!r} (absolute path or '..'). "
            f"Delete the tarball and re-fetch: {fetch_hint('cifar10')}"
        )
    if not (member.isfile() or member.isdir()):
        raise DatasetMissingError(
            f"{tarball}: refusing to extract member {member.name!r} (link or special file). "
            f"Delete the tarball and re-fetch: {fetch_hint('cifar10')}"
        )


def extract_tarball(tarball: str | Path) -> Path:
    """Safely extract the six batch files of ``tarball`` into ``<its folder>/cifar-10-batches-bin/``."""
    tarball = Path(tarball)
    dest = tarball.parent / FOLDER
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=tarball.parent))
    try:
        try:
            with tarfile.open(tarball, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, tarball)
                for member in members:
                    parts = PurePosixPath(
                        member.name
                    ).parts  # e.g. ("cifar-10-batches-bin", "data_batch_1.bin")
                    if (
                        member.isfile()
                        and len(parts) == 2
                        and parts[0] == FOLDER
                        and parts[1] in BATCH_FILES
                    ):
                        src = tar.extractfile(member)
                        assert src is not None  # regular file
                        with src, open(tmp / parts[1], "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise DatasetMissingError(
                f"{tarball} is truncated or corrupt ({err}). Delete it and re-fetch: {fetch_hint('cifar10')}"
            ) from err
        absent = [f for f in BATCH_FILES if not (tmp / f).is_file()]
        if absent:
            raise DatasetMissingError(
                f"{tarball} does not contain {FOLDER}/{{{', '.join(absent)}}}; is it the *binary* CIFAR-10 tarball? "
                f"Delete it and re-fetch: {fetch_hint('cifar10')}"
            )
        try:
            os.replace(tmp, dest)
        except OSError as err:
            complete = all((dest / f).is_file() for f in BATCH_FILES)
            if not complete:  # not a concurrent worker that won the race: a stale partial folder
                raise DatasetMissingError(
                    f"cannot extract {tarball}: {dest} exists but is incomplete ({err}). Delete {dest} and retry."
                ) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return dest


class CifarSource:
    """CIFAR-10 under ``<data_dir>/cifar10/``: the extracted folder or the official tarball."""

    name = "cifar10"

    def locate(self, data_dir: str) -> str | None:
        root = Path(data_dir) / self.name
        if all((root / FOLDER / f).is_file() for f in BATCH_FILES):
            return str(root / FOLDER)
        if (root / TARBALL.name).is_file():
            return str(root / TARBALL.name)
        return None

    def folder(self, data_dir: str) -> Path:
        """The extracted batch folder, extracting the tarball on first use."""
        found = self.locate(data_dir)
        if found is None:
            root = Path(data_dir) / self.name
            raise DatasetMissingError(
                f"dataset 'cifar10' not found (looked for {root / FOLDER}/ and {root / TARBALL.name}). "
                f"Fix: run {fetch_hint(self.name, data_dir)} (downloads 162 MB)\n"
                + manual_instructions(
                    root,
                    [TARBALL],
                    f"(or extract it there so that {root / FOLDER}/data_batch_1.bin exists)",
                )
            )
        path = Path(found)
        return extract_tarball(path) if path.name == TARBALL.name else path

    def fetch(self, data_dir: str, *, quiet: bool = False) -> str:
        if self.locate(data_dir) is None:
            fetch_files(Path(data_dir) / self.name, [TARBALL], dataset=self.name, quiet=quiet)
        return str(self.folder(data_dir))


CIFAR10 = CifarSource()


@DATASETS.register(
    "cifar10", "CIFAR-10, 32x32 RGB, 50000/10000, official binary batches; crop_flip by default"
)
def load_cifar10(cfg: DataConfig, data_dir: str, seed: int) -> TensorDataset:
    folder = CIFAR10.folder(data_dir)
    train = [read_cifar_batch(folder / f) for f in TRAIN_FILES]
    x_test, y_test = read_cifar_batch(folder / TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])  # (50000, 3, 32, 32) uint8
    y_train = np.concatenate([y for _, y in train])

    def to_float(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).float().div_(255.0)  # (n, 3, 32, 32) in [0, 1]

    return TensorDataset(
        name="cifar10",
        x_train=to_float(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=to_float(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=10,
        input_shape=(3, 32, 32),
        augment="crop_flip",
    )


SOURCES.add(
    "cifar10",
    CIFAR10,
    "binary batches: <data_dir>/cifar10/cifar-10-batches-bin/ or the .tar.gz there",
)
