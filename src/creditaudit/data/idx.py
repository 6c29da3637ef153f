"""MNIST and Fashion-MNIST: the IDX file format, where the files are looked for, how they are fetched.

IDX (LeCun's format): a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the row-major payload in big-endian ``dtype``. Files are read whole,
``.gz`` or raw, and validated: the magic, the dtype code, and that the payload is exactly
prod(dims) * itemsize bytes — a truncated download is named with expected vs. found sizes.

Search order for ``<name>``: ``<data_dir>/<name>/`` first (so an explicit data_dir always wins),
then system locations (Debian's ``dataset-fashion-mnist`` package installs
``/usr/share/datasets/fashion-mnist/``). Fetching downloads the four ``.gz`` files from the
official mirrors and checks them against their published digests (sha256 for Fashion-MNIST, as
in the Debian package; md5 for MNIST, as published by LeCun).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

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

# dtype code -> numpy dtype (big-endian where it matters)
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# role -> file stem; the ".gz" or the raw file is accepted
ROLES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _corrupt(path: Path, what: str, dataset: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"{path} is truncated or corrupt: {what}. Delete it and re-fetch: {fetch_hint(dataset)}"
    )


def read_idx(path: str | Path, *, dataset: str = "mnist") -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into an array of its declared dtype and shape.

    Raises :class:`DatasetMissingError` naming ``path`` on a bad gzip stream, bad magic, unknown
    dtype code, or a payload whose size does not match the header; ``dataset`` picks the re-fetch hint.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise _corrupt(path, f"gzip stream unreadable ({err})", dataset) from err

    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        magic = data[:4].hex() or "(empty file)"
        raise _corrupt(path, f"bad magic number {magic}, expected 0000<dtype><ndim>", dataset)
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise _corrupt(path, f"unknown IDX dtype code 0x{code:02x}", dataset)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(path, f"header needs {header} bytes, file has {len(data)}", dataset)
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        shape = "x".join(map(str, dims))
        raise _corrupt(
            path,
            f"header says {shape} {dtype.name} = {expected} payload bytes, found {found}",
            dataset,
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


# --------------------------------------------------------------------------------------------
# Sources: where the four files live, and how to fetch them
# --------------------------------------------------------------------------------------------


@dataclass
class IdxSource:
    """The four IDX files of one MNIST-family dataset (mutable so tests can swap digests/dirs)."""

    name: str
    base_url: str
    digests: dict[str, str]  # file name (".gz") -> hex digest
    algo: str
    system_dirs: tuple[str, ...] = ()
    extra_hint: str = ""
    image_hw: tuple[int, int] = (28, 28)
    num_classes: int = 10
    remote: list[RemoteFile] = field(init=False)

    def __post_init__(self) -> None:
        self.remote = [
            RemoteFile(n, self.base_url + n, d, self.algo) for n, d in self.digests.items()
        ]

    def file_in(self, folder: Path, role: str) -> Path | None:
        """The raw or ``.gz`` file for ``role`` in ``folder`` (raw preferred: already decompressed)."""
        for candidate in (folder / ROLES[role], folder / (ROLES[role] + ".gz")):
            if candidate.is_file():
                return candidate
        return None

    def search_dirs(self, data_dir: str) -> list[Path]:
        return [Path(data_dir) / self.name, *map(Path, self.system_dirs)]

    def locate(self, data_dir: str) -> str | None:
        for folder in self.search_dirs(data_dir):
            if all(self.file_in(folder, role) for role in ROLES):
                return str(folder)
        return None

    def missing_message(self, data_dir: str) -> str:
        looked = ", ".join(f"{d}/" for d in self.search_dirs(data_dir))
        target = Path(data_dir) / self.name
        return (
            f"dataset {self.name!r} not found (looked in {looked}). Fix: run {fetch_hint(self.name, data_dir)}\n"
            + manual_instructions(target, self.remote, self.extra_hint)
        )

    def fetch(self, data_dir: str, *, quiet: bool = False) -> str:
        found = self.locate(data_dir)
        if found:
            return found
        target = Path(data_dir) / self.name
        # a file already there decompressed counts as present: only fetch roles with neither form
        needed = [f for f in self.remote if not (target / f.name.removesuffix(".gz")).is_file()]
        fetch_files(target, needed, dataset=self.name, quiet=quiet, extra_hint=self.extra_hint)
        return str(target)


FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    digests={
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    algo="sha256",
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    extra_hint="On Debian/Ubuntu instead: apt-get install dataset-fashion-mnist "
    "(installs /usr/share/datasets/fashion-mnist/).",
)

MNIST = IdxSource(
    name="mnist",
    base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    digests={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    algo="md5",
    system_dirs=("/usr/share/datasets/mnist",),
)


def load_idx_dataset(source: IdxSource, data_dir: str) -> TensorDataset:
    """Read and validate the four files of ``source``: images (N, 1, H, W) in [0, 1], labels int64."""
    found = source.locate(data_dir)
    if found is None:
        raise DatasetMissingError(source.missing_message(data_dir))
    folder = Path(found)
    splits = {}
    for split in ("train", "test"):
        img_path = source.file_in(folder, f"{split}_images")
        lab_path = source.file_in(folder, f"{split}_labels")
        assert img_path is not None and lab_path is not None  # locate() checked all four
        images = read_idx(img_path, dataset=source.name)  # (N, H, W) uint8
        labels = read_idx(lab_path, dataset=source.name)  # (N,) uint8
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != source.image_hw:
            raise _corrupt(
                img_path,
                f"expected uint8 images of shape (N, {source.image_hw[0]}, {source.image_hw[1]}), "
                f"found {images.dtype} {images.shape}",
                source.name,
            )
        if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise _corrupt(
                lab_path,
                f"expected {len(images)} uint8 labels to match {img_path.name}, "
                f"found {labels.dtype} {labels.shape}",
                source.name,
            )
        if len(labels) and labels.max() >= source.num_classes:
            raise _corrupt(
                lab_path,
                f"label {int(labels.max())} out of range 0..{source.num_classes - 1}",
                source.name,
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)  # (N, 1, H, W) float32
        y = torch.from_numpy(labels.astype(np.int64))  # (N,)
        splits[split] = (x, y)
    return TensorDataset(
        name=source.name,
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=source.num_classes,
        input_shape=(1, *source.image_hw),
        augment="none",
    )


@DATASETS.register("fashion_mnist", "Fashion-MNIST (Zalando), 28x28 grey, 60000/10000, IDX files")
def load_fashion_mnist(cfg: DataConfig, data_dir: str, seed: int) -> TensorDataset:
    return load_idx_dataset(FASHION_MNIST, data_dir)


@DATASETS.register("mnist", "MNIST handwritten digits, 28x28 grey, 60000/10000, IDX files")
def load_mnist(cfg: DataConfig, data_dir: str, seed: int) -> TensorDataset:
    return load_idx_dataset(MNIST, data_dir)


SOURCES.add(
    "fashion_mnist",
    FASHION_MNIST,
    "IDX: <data_dir>/fashion_mnist/ or /usr/share/datasets/fashion-mnist/",
)
SOURCES.add("mnist", MNIST, "IDX files: <data_dir>/mnist/ or /usr/share/datasets/mnist/")
