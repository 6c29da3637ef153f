"""Mini-batches straight from on-device tensors, and the batched ``crop_flip`` augmentation.

The airbench way: the whole split sits on the device; an epoch is one permutation and
a loop of index_selects, with augmentation done on the whole batch at once — no per-sample Python,
no worker processes.

Reproducibility contract: the batches of ``DeviceLoader.epoch(k)`` are a deterministic function of
``(seed, k)`` alone. The permutation comes from a CPU ``torch.Generator`` seeded with
``derive_seed(seed, "shuffle", k)`` (CPU so it is identical on every device, then moved to
``x.device``); the crop offsets and flips come from a generator on ``x.device`` seeded with
``derive_seed(seed, "augment", k)``, drawn for the whole epoch up front. A run resumed at epoch k
therefore sees exactly the batches an uninterrupted run sees.

``crop_flip``: pad by 4 on each side, take a random H x W crop (offsets uniform in 0..8 per axis),
then flip horizontally with probability 0.5. The padding is zeros *after* normalisation, i.e. the
per-channel training mean (torchvision pads raw black pixels before normalising; the difference is
immaterial for training and keeps the augmentation a pure function of the normalised tensor).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from creditaudit.data.base import AUGMENTATIONS, derive_seed

CROP_PAD = 4


def draw_crop_flip(
    n: int, generator: torch.Generator, *, pad: int = CROP_PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop/flip parameters for n samples, on the generator's device.

    Returns offsets (n, 2) as [row, col] uniform in 0..2*pad, and flips (n,) bool with p = 0.5.
    """
    device = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return offsets, flips


def crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, pad: int = CROP_PAD
) -> torch.Tensor:
    """Crop each image of x (B, C, H, W) at ``offsets`` (B, 2) from its zero-padded copy, then flip where ``flips``.

    Output pixel (i, j) of sample b is ``padded[b, :, r_b + i, c_b + j']`` with ``j' = W-1-j`` when
    flipped, else ``j`` — two gathers, no per-sample loop.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, 0, None] + ar_h  # (B, H)
    cols = offsets[:, 1, None] + torch.where(flips[:, None], ar_w.flip(0), ar_w)  # (B, W)
    padded = padded.gather(
        2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad)
    )  # (B, C, H, W+2p)
    return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


class DeviceLoader:
    """Mini-batches straight from on-device tensors; no per-sample Python."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: str = "none",
    ):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: expected one of {AUGMENTATIONS}")
        if augment == "crop_flip" and x.ndim != 4:
            raise ValueError(
                f"augment=crop_flip needs images (N, C, H, W), got inputs of shape {tuple(x.shape)}"
            )
        self.x, self.y = x, y  # (N, ...), (N,)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order (N,) on x.device: a seeded permutation, or 0..N-1 without shuffle."""
        if not self.shuffle:
            return torch.arange(self.num_samples, device=self.x.device)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
        return torch.randperm(self.num_samples, generator=g).to(self.x.device)

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The epoch's crop offsets (N, 2) and flips (N,), one per position in the epoch, or None
        without augmentation."""
        if self.augment != "crop_flip":
            return None
        g = torch.Generator(device=self.x.device).manual_seed(
            derive_seed(self.seed, "augment", epoch)
        )
        return draw_crop_flip(self.num_samples, g)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x_batch (B, ...), y_batch (B,)) for epoch ``epoch``; a function of (seed, epoch) only."""
        order = self.order(epoch)
        aug = self.augmentation(epoch)
        bs = self.batch_size
        for i in range(len(self)):
            idx = order[i * bs : (i + 1) * bs]
            xb, yb = self.x[idx], self.y[idx]
            if aug is not None:
                xb = crop_flip(xb, aug[0][i * bs : (i + 1) * bs], aug[1][i * bs : (i + 1) * bs])
            yield xb, yb


def stacked_epoch(
    loaders: list[DeviceLoader], epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of several runs' loaders for ``epoch``, stacked on a leading run axis:
    (R, B, ...) and (R, B), equal to ``torch.stack`` of each loader's own batch. Loaders over the
    same tensors (a stack's runs share their data) are served by one gather and one augmentation
    call for all R runs; the orders and augmentation draws stay each run's own."""
    first = loaders[0]
    if not all(
        l.x is first.x
        and l.batch_size == first.batch_size
        and l.augment == first.augment
        and l.drop_last == first.drop_last
        for l in loaders
    ):
        for batch in zip(*(l.epoch(epoch) for l in loaders), strict=True):
            yield torch.stack([xb for xb, _ in batch]), torch.stack([yb for _, yb in batch])
        return
    orders = torch.stack([l.order(epoch) for l in loaders])  # (R, N)
    y = (
        first.y if all(l.y is first.y for l in loaders) else torch.stack([l.y for l in loaders])
    )  # (N,) or (R, N)
    # one augment for all: every loader draws its augmentation, or none does
    augs = [a for a in (l.augmentation(epoch) for l in loaders) if a is not None]
    aug = (
        (torch.stack([a[0] for a in augs]), torch.stack([a[1] for a in augs])) if augs else None
    )  # offsets (R, N, 2) and flips (R, N), or None
    R, bs = len(loaders), first.batch_size
    for i in range(len(first)):
        idx = orders[:, i * bs : (i + 1) * bs]  # (R, B)
        xb = first.x[idx]  # (R, B, ...)
        yb = y[idx] if y.dim() == 1 else y.gather(1, idx)
        if aug is not None:
            offsets, flips = aug
            b = idx.shape[1]
            xb = crop_flip(
                xb.flatten(0, 1),
                offsets[:, i * bs : (i + 1) * bs].flatten(0, 1),
                flips[:, i * bs : (i + 1) * bs].flatten(0, 1),
            ).view(R, b, *xb.shape[2:])
        yield xb, yb
