"""DeviceLoader and crop_flip: coverage, determinism in (seed, epoch) only, and a real crop/flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from creditaudit.data import DeviceLoader
from creditaudit.data.loader import CROP_PAD, crop_flip, draw_crop_flip

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n: int, device: str = "cpu") -> torch.Tensor:
    """(n, 3, 8, 8) images whose every pixel value is distinct, so crops are identifiable."""
    return torch.arange(n * 3 * 8 * 8, dtype=torch.float32, device=device).reshape(n, 3, 8, 8) + 1


def collect(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xb.clone(), yb.clone()) for xb, yb in loader.epoch(epoch)]


@pytest.mark.parametrize("drop_last,expected_len", [(False, 4), (True, 3)])
def test_len_and_every_sample_once(drop_last, expected_len):
    x = torch.arange(10, dtype=torch.float32)[:, None] * torch.ones(
        1, 5
    )  # (10, 5), row i filled with i
    y = torch.arange(10)
    loader = DeviceLoader(x, y, batch_size=3, seed=7, drop_last=drop_last)
    assert len(loader) == expected_len
    batches = collect(loader, epoch=0)
    assert len(batches) == expected_len
    assert [len(yb) for _, yb in batches] == ([3, 3, 3, 1] if not drop_last else [3, 3, 3])
    seen = torch.cat([yb for _, yb in batches])
    assert len(set(seen.tolist())) == len(seen)  # nothing twice
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(10))  # everything once
    for xb, yb in batches:  # inputs stay paired with their labels
        assert torch.equal(xb[:, 0].long(), yb)


def test_no_shuffle_is_source_order():
    x, y = torch.randn(7, 2), torch.arange(7)
    loader = DeviceLoader(x, y, batch_size=4, seed=0, shuffle=False)
    assert torch.cat([yb for _, yb in loader.epoch(3)]).tolist() == list(range(7))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_in_seed_and_epoch_only(device):
    x, y = images(50, device), torch.arange(50, device=device)
    make = lambda seed: DeviceLoader(x, y, batch_size=16, seed=seed, augment="crop_flip")  # noqa: E731

    resumed = collect(make(1), epoch=3)  # a fresh loader, as after a restart at epoch 3
    uninterrupted_loader = make(1)
    for e in range(3):
        collect(uninterrupted_loader, e)
    uninterrupted = collect(uninterrupted_loader, epoch=3)
    for (xa, ya), (xb, yb) in zip(resumed, uninterrupted, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # same order AND same augmentation

    order = lambda batches: torch.cat([yb for _, yb in batches])  # noqa: E731
    assert not torch.equal(order(resumed), order(collect(make(1), epoch=4)))  # another epoch
    assert not torch.equal(order(resumed), order(collect(make(2), epoch=3)))  # another seed


def test_crop_flip_matches_manual_reference():
    x = images(4)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4]])
    flips = torch.tensor([False, True, True, False])
    out = crop_flip(x, offsets, flips)
    assert out.shape == x.shape
    padded = F.pad(x, (CROP_PAD,) * 4)  # (4, 3, 16, 16)
    for b in range(4):
        r, c = offsets[b].tolist()
        ref = padded[b, :, r : r + 8, c : c + 8]
        if flips[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b], ref)
    assert torch.equal(out[3], x[3])  # centre crop, no flip: the identity
    assert (out[0, :, :4, :4] == 0).all() and torch.equal(
        out[0, :, 4:, 4:], x[0, :, :4, :4]
    )  # top-left shift


def test_loader_augmentation_is_a_real_crop_flip():
    """Each augmented sample is one of the 9x9x2 crops/flips of the sample at the same position."""
    x, y = images(40), torch.arange(40)
    plain = collect(DeviceLoader(x, y, batch_size=16, seed=3), epoch=5)
    augmented = collect(DeviceLoader(x, y, batch_size=16, seed=3, augment="crop_flip"), epoch=5)
    padded = F.pad(x, (CROP_PAD,) * 4)
    changed = 0
    for (xp, yp), (xa, ya) in zip(plain, augmented, strict=True):
        assert torch.equal(yp, ya)  # augmentation does not change the order
        for i in range(len(ya)):
            src = padded[ya[i]]
            candidates = [
                crop.flip(-1) if flip else crop
                for r in range(2 * CROP_PAD + 1)
                for c in range(2 * CROP_PAD + 1)
                for crop in [src[:, r : r + 8, c : c + 8]]
                for flip in (False, True)
            ]
            assert any(torch.equal(xa[i], cand) for cand in candidates)
            changed += not torch.equal(xa[i], xp[i])
    assert changed > 30  # 1 in 162 parameter draws is the identity


def test_crop_flip_parameters_cover_the_range():
    g = torch.Generator().manual_seed(0)
    offsets, flips = draw_crop_flip(4000, g)
    assert offsets.min() == 0 and offsets.max() == 2 * CROP_PAD
    assert torch.bincount(offsets.flatten(), minlength=9).min() > 700  # ~889 expected per value
    assert 0.45 < flips.float().mean().item() < 0.55


def test_invalid_arguments():
    with pytest.raises(ValueError, match="needs images"):
        DeviceLoader(torch.randn(5, 40), torch.arange(5), 2, seed=0, augment="crop_flip")
    with pytest.raises(ValueError, match="samples"):
        DeviceLoader(torch.randn(5, 3), torch.arange(4), 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(torch.randn(5, 3), torch.arange(5), 0, seed=0)
    with pytest.raises(ValueError, match="augment"):
        DeviceLoader(torch.randn(5, 3), torch.arange(5), 2, seed=0, augment="mixup")
