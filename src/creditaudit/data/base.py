"""Shared vocabulary of the data layer: config, dataset container, errors, registries, seeds.

Owns
- :class:`DataConfig`: the typed, documented data section of a run config (field help strings
  live in ``metadata={"help": ...}``; the CLI prints them).
- :class:`TensorDataset`: a whole dataset as four tensors (meant to sit on the device, docs/science.md §8).
- :class:`DatasetMissingError`: the one error for "files absent, truncated, corrupt or unfetchable";
  its message always names the fix.
- ``DATASETS`` (name -> raw loader) and ``SOURCES`` (name -> where files live / how to fetch them).
  Every dataset module registers into both; ``load_dataset`` and ``check_dataset``/``fetch_dataset``
  dispatch through them, so adding a dataset never touches the pipeline.
- Small helpers every dataset module needs: the data directory, stable seed derivation, atomic
  writes and the "how to re-fetch" hint.

A raw loader has the signature ``(cfg, data_dir, seed) -> TensorDataset`` and returns float32
inputs in their natural scale (pixels in [0, 1]) with the dataset's default augmentation; subsets,
random labels and normalisation are applied afterwards by :func:`creditaudit.data.pipeline.load_dataset`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from creditaudit.errors import ConfigError, UserError
from creditaudit.registry import Registry
from creditaudit.typedconfig import Config

AUGMENTATIONS = ("none", "crop_flip")

# Subsets are drawn with this seed, never the run's: every run seed of a study trains and
# evaluates on the very same examples, so seeds differ only in what the run seed controls.
DATA_SEED = 0


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig(Config):
    """Which dataset a run trains on, and how it is subset, relabelled and augmented."""

    dataset: str = field(
        default="fashion_mnist",
        metadata={
            "help": "dataset name: fashion_mnist | mnist | cifar10 | digits | mnist1d | student"
        },
    )
    data_dir: str = field(
        default="",
        metadata={
            "semantic": False,
            "help": "root folder of the dataset files; '' = $CREDITAUDIT_DATA_DIR or ~/.cache/creditaudit/data",
        },
    )
    train_subset: int = field(
        default=0,
        metadata={
            "help": "0 = all training examples; else a fixed class-stratified subset of this size "
            "(the same for every run seed)"
        },
    )
    test_subset: int = field(
        default=0,
        metadata={
            "help": "0 = the whole test split; else a fixed class-stratified subset of this size "
            "(the same for every run seed)"
        },
    )
    random_labels: bool = field(
        default=False,
        metadata={
            "help": "replace the TRAINING labels by i.i.d. uniform labels drawn from the run seed "
            "(test labels untouched)"
        },
    )
    augment: str = field(
        default="auto",
        metadata={
            "help": "training augmentation: auto (crop_flip for cifar10, none otherwise) | none | "
            "crop_flip (random crop with padding 4 + horizontal flip)"
        },
    )
    mnist1d_signals: int = field(
        default=5000,
        metadata={
            "help": "mnist1d: signals generated, 80% for training and 20% for testing (5000 = the "
            "package's default; others are cached apart)"
        },
    )
    student_alpha: float = field(
        default=0.5,
        metadata={
            "help": "student task: teacher activation phi(z) = (1-alpha) z + alpha tanh z, alpha in [0, 1]"
        },
    )
    student_dim: int = field(
        default=64, metadata={"help": "student task: input dimension (x ~ N(0, I))"}
    )
    student_width: int = field(
        default=128, metadata={"help": "student task: teacher hidden width (two hidden layers)"}
    )
    student_classes: int = field(
        default=10, metadata={"help": "student task: number of classes (teacher outputs)"}
    )
    student_train: int = field(
        default=20000, metadata={"help": "student task: number of training examples"}
    )
    student_test: int = field(
        default=5000, metadata={"help": "student task: number of test examples"}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field; called by ``load_dataset``."""
        if self.augment not in ("auto", *AUGMENTATIONS):
            raise ConfigError(
                f"data.augment={self.augment!r}: expected one of auto, {', '.join(AUGMENTATIONS)}"
            )
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"data.{name}={getattr(self, name)}: must be >= 0 (0 = use the whole split)"
                )
        if not 0.0 <= self.student_alpha <= 1.0:
            raise ConfigError(f"data.student_alpha={self.student_alpha}: must lie in [0, 1]")
        for name in ("student_dim", "student_width", "student_train", "student_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)}: must be >= 1")
        if self.student_classes < 2:
            raise ConfigError(f"data.student_classes={self.student_classes}: must be >= 2")


# --------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------


@dataclass
class TensorDataset:
    """A whole dataset as tensors: train and test inputs/labels plus what a model needs to know."""

    name: str
    x_train: torch.Tensor  # (N, *input_shape) float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, *input_shape) float32
    y_test: torch.Tensor  # (M,) int64
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) for images, (D,) for vectors
    augment: str  # resolved training augmentation: "none" | "crop_flip"

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise TypeError(
                    f"{self.name} {split}: expected float32 inputs and int64 labels, got {x.dtype}, {y.dtype}"
                )
            if tuple(x.shape[1:]) != self.input_shape or x.shape[0] != y.shape[0] or y.ndim != 1:
                raise ValueError(
                    f"{self.name} {split}: inputs {tuple(x.shape)} and labels {tuple(y.shape)} do not match "
                    f"input_shape {self.input_shape}"
                )
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"{self.name}: augment={self.augment!r}, expected one of {AUGMENTATIONS}"
            )

    def to(self, device: torch.device | str) -> TensorDataset:
        """A new dataset with every tensor on ``device`` (no copy for tensors already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


# --------------------------------------------------------------------------------------------
# Errors and registries
# --------------------------------------------------------------------------------------------


class DatasetMissingError(UserError):
    """Dataset files are absent, truncated, corrupt or cannot be fetched. ``str()`` names the fix."""


class DataSource(Protocol):
    """Where a dataset's files live, and how to make them present."""

    def locate(self, data_dir: str) -> str | None:
        """The path the dataset is read from, or None when it is not available."""
        ...

    def fetch(self, data_dir: str, *, quiet: bool = False) -> str:
        """Make the dataset present (download and verify when needed); return ``locate``'s path."""
        ...


RawLoader = Callable[[DataConfig, str, int], TensorDataset]

DATASETS: Registry[RawLoader] = Registry("dataset")
SOURCES: Registry[DataSource] = Registry("dataset source")


# --------------------------------------------------------------------------------------------
# Helpers shared by the dataset modules
# --------------------------------------------------------------------------------------------


def default_data_dir() -> str:
    """``$CREDITAUDIT_DATA_DIR`` if set, else ``~/.cache/creditaudit/data``."""
    env = os.environ.get("CREDITAUDIT_DATA_DIR", "")
    return (
        str(Path(env).expanduser()) if env else str(Path("~/.cache/creditaudit/data").expanduser())
    )


def resolve_data_dir(data_dir: str) -> str:
    """``data_dir`` with ``~`` expanded, or the default when empty."""
    return str(Path(data_dir).expanduser()) if data_dir else default_data_dir()


def fetch_hint(name: str, data_dir: str = "") -> str:
    """The command that (re-)fetches ``name`` (into ``data_dir`` when it is not the default)."""
    where = f" --data-dir {data_dir}" if data_dir and data_dir != default_data_dir() else ""
    return f"`creditaudit data fetch {name}{where}` (Python: creditaudit.data.fetch_dataset)"


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (e.g. ``(seed, "shuffle", epoch)``).

    Hash-based, so it is the same in every process and Python version (unlike ``hash``), and
    streams for different purposes of the same run seed are decorrelated.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def file_digest(path: str | Path, algo: str) -> str:
    """Hex digest (``"md5"`` or ``"sha256"``) of a file, read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    Readers (other workers of a sweep) never see a half-written file; on failure the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
