"""File formats and fetching: IDX (mnist, fashion_mnist), CIFAR-10 binary batches and tarball.

Every test writes small files in the real on-disk formats under tmp_path and reads them through
the real ``load_dataset`` path with ``data_dir=tmp_path``. The network is never touched:
``fetch.download_url`` is replaced by a local copy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from creditaudit.data import (
    DATASETS,
    DataConfig,
    DatasetMissingError,
    check_dataset,
    cifar,
    fetch,
    fetch_dataset,
    idx,
    load_dataset,
)
from creditaudit.data.fetch import RemoteFile

# --------------------------------------------------------------------------------------------
# Writers for the real formats
# --------------------------------------------------------------------------------------------

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    header = (
        bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    )
    return header + arr.tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_idx_dataset(
    folder: Path, *, gz_images: bool = True, gz_labels: bool = False, seed: int = 0
) -> dict:
    """Four IDX files (30 train, 20 test examples); returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, stem, n in (("train", "train", 30), ("test", "t10k", 20)):
        images, labels = make_idx_split(rng, n)
        write_bytes(
            folder / f"{stem}-images-idx3-ubyte{'.gz' if gz_images else ''}", idx_bytes(images)
        )
        write_bytes(
            folder / f"{stem}-labels-idx1-ubyte{'.gz' if gz_labels else ''}", idx_bytes(labels)
        )
        arrays[split] = (images, labels)
    return arrays


def cifar_records(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """n records with random pixels; returns (images (n, 3, 32, 32), labels, file bytes)."""
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    # record = label byte, then the R plane, G plane, B plane (each row-major 32x32)
    records = np.concatenate([labels[:, None], images.reshape(n, 3072)], axis=1)
    return images, labels, records.tobytes()


def write_cifar_folder(folder: Path, seed: int = 0) -> dict:
    """cifar-10-batches-bin with 4 records per training batch and 6 test records."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for name in cifar.TRAIN_FILES:
        images, labels, data = cifar_records(rng, 4)
        (folder / name).write_bytes(data)
        train_x.append(images)
        train_y.append(labels)
    test_x, test_y, data = cifar_records(rng, 6)
    (folder / cifar.TEST_FILE).write_bytes(data)
    return {"train": (np.concatenate(train_x), np.concatenate(train_y)), "test": (test_x, test_y)}


def tar_folder(folder: Path, tarball: Path, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=cifar.FOLDER)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tarball


def normalised(raw: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Reference normalisation of uint8 images (N, C, H, W) with per-channel stats of ref."""
    ref = ref.astype(np.float64) / 255
    mean = ref.mean(axis=(0, 2, 3), keepdims=True)
    std = ref.std(axis=(0, 2, 3), keepdims=True)
    return (raw.astype(np.float64) / 255 - mean) / std


@pytest.fixture
def no_system_dirs(monkeypatch):
    """Hermetic IDX search: only data_dir, whatever is installed on this machine."""
    monkeypatch.setattr(idx.MNIST, "system_dirs", ())
    monkeypatch.setattr(idx.FASHION_MNIST, "system_dirs", ())


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz_images,gz_labels", [(True, False), (False, True)])
def test_idx_round_trip_through_load_dataset(tmp_path, name, gz_images, gz_labels):
    arrays = write_idx_dataset(tmp_path / name, gz_images=gz_images, gz_labels=gz_labels)
    # data_dir comes first: the Debian copy of fashion-mnist on this machine must not shadow it
    assert check_dataset(name, str(tmp_path)) == str(tmp_path / name)
    ds = load_dataset(DataConfig(dataset=name, data_dir=str(tmp_path)), seed=0)

    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.augment == "none"
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.y_train, torch.from_numpy(y_tr.astype(np.int64)))
    assert torch.equal(ds.y_test, torch.from_numpy(y_te.astype(np.int64)))
    ref_tr = normalised(x_tr[:, None], x_tr[:, None])
    ref_te = normalised(x_te[:, None], x_tr[:, None])  # test split uses the TRAIN statistics
    np.testing.assert_allclose(ds.x_train.numpy(), ref_tr, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), ref_te, atol=1e-5)
    assert (
        abs(ds.x_train.mean().item()) < 1e-5
        and abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-5
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_dtypes_and_shapes(tmp_path, dtype):
    arr = np.arange(30).astype(dtype).reshape(2, 3, 5)
    path = write_bytes(tmp_path / "x-idx3.gz", idx_bytes(arr))
    out = idx.read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_idx_truncated_file_names_file_and_sizes(tmp_path, no_system_dirs):
    write_idx_dataset(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "rb") as f:
        data = f.read()
    write_bytes(bad, data[:-100])  # a valid gzip stream holding a short payload
    with pytest.raises(DatasetMissingError) as err:
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert f"{30 * 28 * 28} payload bytes" in msg and f"found {30 * 28 * 28 - 100}" in msg
    assert "Delete it and re-fetch" in msg and "creditaudit data fetch mnist" in msg


def test_idx_truncated_gzip_stream(tmp_path, no_system_dirs):
    write_idx_dataset(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-50])  # cut the compressed stream itself
    with pytest.raises(DatasetMissingError, match=r"t10k-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_bad_magic(tmp_path, no_system_dirs):
    write_idx_dataset(tmp_path / "mnist", gz_labels=False)
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    data = bytearray(bad.read_bytes())
    data[0] = 0x1F
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetMissingError, match=r"train-labels-idx1-ubyte.*bad magic"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_mismatched_counts(tmp_path, no_system_dirs):
    write_idx_dataset(tmp_path / "mnist", gz_labels=False)
    write_bytes(tmp_path / "mnist" / "train-labels-idx1-ubyte", idx_bytes(np.zeros(29, np.uint8)))
    with pytest.raises(DatasetMissingError, match="expected 30 uint8 labels"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)


def test_idx_missing_names_every_file_and_the_fix(tmp_path, no_system_dirs):
    assert check_dataset("fashion_mnist", str(tmp_path)) is None
    with pytest.raises(DatasetMissingError) as err:
        load_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert str(tmp_path / "fashion_mnist") in msg
    for stem in idx.ROLES.values():
        assert f"{stem}.gz" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


# --------------------------------------------------------------------------------------------
# fetch (network replaced by local copies)
# --------------------------------------------------------------------------------------------


def fake_downloader(files: dict[str, Path], calls: list[str]):
    """A download_url stand-in that serves ``files`` by URL basename."""

    def download(url: str, dest: str, *, timeout: float = 0.0) -> None:
        calls.append(url)
        shutil.copyfile(files[url.rsplit("/", 1)[1]], dest)

    return download


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_bad_checksum_leaves_nothing(tmp_path, monkeypatch, no_system_dirs):
    src = tmp_path / "served"
    write_idx_dataset(src, gz_images=True, gz_labels=True)
    calls: list[str] = []
    monkeypatch.setattr(
        fetch, "download_url", fake_downloader({p.name: p for p in src.iterdir()}, calls)
    )
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetMissingError, match="checksum mismatch") as err:
        fetch_dataset("mnist", str(data_dir), quiet=True)  # the real published md5s cannot match
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    assert calls and list((data_dir / "mnist").iterdir()) == []  # no file, no partial left behind


def test_fetch_good_checksum_puts_files_in_place(tmp_path, monkeypatch, no_system_dirs):
    src = tmp_path / "served"
    arrays = write_idx_dataset(src, gz_images=True, gz_labels=True)
    remote = [RemoteFile(f.name, f.url, md5(src / f.name), "md5") for f in idx.MNIST.remote]
    monkeypatch.setattr(idx.MNIST, "remote", remote)
    calls: list[str] = []
    monkeypatch.setattr(
        fetch, "download_url", fake_downloader({p.name: p for p in src.iterdir()}, calls)
    )
    data_dir = tmp_path / "data"

    where = fetch_dataset("mnist", str(data_dir), quiet=True)
    assert where == str(data_dir / "mnist") == check_dataset("mnist", str(data_dir))
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == sorted(f.name for f in remote)
    assert len(calls) == 4
    fetch_dataset("mnist", str(data_dir), quiet=True)  # already present: no download
    assert len(calls) == 4
    ds = load_dataset(DataConfig(dataset="mnist", data_dir=str(data_dir)), seed=0)
    assert torch.equal(ds.y_train, torch.from_numpy(arrays["train"][1].astype(np.int64)))


def test_fetch_offline_says_which_files_go_where(tmp_path, monkeypatch, no_system_dirs):
    def offline(url: str, dest: str, *, timeout: float = 0.0) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fetch, "download_url", offline)
    with pytest.raises(DatasetMissingError) as err:
        fetch_dataset("fashion_mnist", str(tmp_path), quiet=True)
    msg = str(err.value)
    assert f"Place these files in {tmp_path / 'fashion_mnist'}/" in msg
    assert (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz"
        in msg
    )
    assert "apt-get install dataset-fashion-mnist" in msg
    assert list((tmp_path / "fashion_mnist").iterdir()) == []


# --------------------------------------------------------------------------------------------
# CIFAR-10 binary
# --------------------------------------------------------------------------------------------


def test_cifar_folder_layout_and_labels(tmp_path):
    arrays = write_cifar_folder(tmp_path / "cifar10" / cifar.FOLDER)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path))
    raw = DATASETS.get("cifar10")(cfg, str(tmp_path), 0)  # before normalisation: pixels / 255
    x_tr, y_tr = arrays["train"]
    assert raw.x_train.shape == (20, 3, 32, 32) and raw.x_test.shape == (6, 3, 32, 32)
    # channel 0 is the first plane of each record (R), and rows are contiguous 32-byte runs
    first_record = (tmp_path / "cifar10" / cifar.FOLDER / "data_batch_1.bin").read_bytes()[
        : cifar.RECORD_BYTES
    ]
    assert first_record[0] == y_tr[0]
    red = np.frombuffer(first_record[1:1025], dtype=np.uint8).reshape(32, 32)
    np.testing.assert_allclose(raw.x_train[0, 0].numpy(), red / 255, atol=1e-7)
    np.testing.assert_allclose(raw.x_train.numpy(), x_tr / 255, atol=1e-7)
    assert torch.equal(raw.y_train, torch.from_numpy(y_tr.astype(np.int64)))
    assert torch.equal(raw.y_test, torch.from_numpy(arrays["test"][1].astype(np.int64)))

    ds = load_dataset(cfg, seed=0)
    assert ds.augment == "crop_flip"  # cifar10's default under augment="auto"
    np.testing.assert_allclose(ds.x_test.numpy(), normalised(arrays["test"][0], x_tr), atol=1e-5)
    assert (
        load_dataset(
            DataConfig(dataset="cifar10", data_dir=str(tmp_path), augment="none"), 0
        ).augment
        == "none"
    )


def test_cifar_tarball_is_extracted_and_equal(tmp_path):
    arrays = write_cifar_folder(tmp_path / "src" / cifar.FOLDER)
    root = tmp_path / "data" / "cifar10"
    root.mkdir(parents=True)
    tar_folder(tmp_path / "src" / cifar.FOLDER, root / cifar.TARBALL.name)
    assert check_dataset("cifar10", str(tmp_path / "data")) == str(root / cifar.TARBALL.name)

    ds = load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "data")), seed=0)
    assert (root / cifar.FOLDER / "test_batch.bin").is_file()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    assert check_dataset("cifar10", str(tmp_path / "data")) == str(root / cifar.FOLDER)
    assert torch.equal(ds.y_train, torch.from_numpy(arrays["train"][1].astype(np.int64)))


@pytest.mark.parametrize(
    "member", ["../evil.bin", "/tmp/evil.bin", "cifar-10-batches-bin/../../evil.bin"]
)
def test_cifar_tarball_rejects_unsafe_members(tmp_path, member):
    write_cifar_folder(tmp_path / "src" / cifar.FOLDER)
    root = tmp_path / "data" / "cifar10"
    root.mkdir(parents=True)
    tar_folder(tmp_path / "src" / cifar.FOLDER, root / cifar.TARBALL.name, extra={member: b"x"})
    with pytest.raises(DatasetMissingError, match="unsafe member"):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "data")), seed=0)
    assert not (tmp_path / "data" / "evil.bin").exists() and not (root / cifar.FOLDER).exists()


def test_cifar_truncated_batch(tmp_path):
    folder = tmp_path / "cifar10" / cifar.FOLDER
    write_cifar_folder(folder)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(
        DatasetMissingError, match=r"data_batch_3\.bin.*not a positive multiple of 3073"
    ):
        load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), seed=0)


def test_cifar_fetch_verifies_and_extracts(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path / "src" / cifar.FOLDER)
    tarball = tar_folder(tmp_path / "src" / cifar.FOLDER, tmp_path / cifar.TARBALL.name)
    calls: list[str] = []
    monkeypatch.setattr(fetch, "download_url", fake_downloader({tarball.name: tarball}, calls))
    data_dir = tmp_path / "data"

    with pytest.raises(DatasetMissingError, match="checksum mismatch"):
        fetch_dataset("cifar10", str(data_dir), quiet=True)
    assert list((data_dir / "cifar10").iterdir()) == []

    monkeypatch.setattr(
        cifar, "TARBALL", RemoteFile(cifar.TARBALL.name, cifar.TARBALL.url, md5(tarball), "md5")
    )
    assert fetch_dataset("cifar10", str(data_dir), quiet=True) == str(
        data_dir / "cifar10" / cifar.FOLDER
    )
    assert len(calls) == 2
    assert load_dataset(
        DataConfig(dataset="cifar10", data_dir=str(data_dir)), seed=0
    ).x_train.shape == (20, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# The real Fashion-MNIST, where installed (Debian's dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------


def test_real_fashion_mnist(tmp_path, monkeypatch):
    where = check_dataset("fashion_mnist", str(tmp_path))
    if where is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

    def no_network(url: str, dest: str, *, timeout: float = 0.0) -> None:
        raise AssertionError("fetch_dataset must not download what a system location provides")

    monkeypatch.setattr(fetch, "download_url", no_network)
    assert fetch_dataset("fashion_mnist", str(tmp_path), quiet=True) == where
    ds = load_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path)), seed=0)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-4
