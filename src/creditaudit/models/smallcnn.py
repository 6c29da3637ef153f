"""``smallcnn``: the cross-architecture control — 3 conv layers with BatchNorm, 1 FC, a head, and by
default no terminal norm (so the mechanism of Mode 1(b), the terminal-LN collapse of ‖g_L‖, cannot
act: D2 fires here only when ‖g_L‖ falls for another reason, such as a network that fits its data;
``out_ln=true`` puts a LayerNorm on the FC features before the head).

    h_0 = pool(ReLU(BN(conv1 x)))          (B, c1, H/2, W/2)     embedding (conv stem)
    h_1 = pool(ReLU(BN(conv2 h_0)))        (B, c2, H/4, W/4)     block 1
    h_2 = pool(ReLU(BN(conv3 h_1)))        (B, c3, H/8, W/8)     block 2
    h_3 = ReLU(FC(flatten h_2))            (B, d)                block 3
    o   = H(h_3)

Blocks are non-residual stages whose states change shape; a credit a_l has the shape of h_l.
``L`` is 3, or 0 for the shallow variant, where the flattened stem output feeds the head directly.

Memory format: the convolution weights are stored channels-last (NHWC), so the conv states h_0..h_2
are channels-last tensors. The values and shapes are those of the NCHW model (every rule and
diagnostic reads states through their logical shape: ``flatten``/``reshape`` give the same order);
only the layout differs, and with it the CPU backend's kernels: on one CPU thread a training step
of the cpu profile's SmallCNN (batch 128, 1×28×28, channels 32/64/128) takes 51 ms instead of 87 ms
and an evaluation of 1,000 images 0.38 s instead of 0.64 s (max-pooling and BatchNorm are
vectorised over channels in NHWC). Results agree with the NCHW layout to float rounding.

``smallcnn1d`` is the same design read on 1-D signals (MNIST-1D's 40 samples): Conv1d stages of
kernel 3 with BatchNorm and max-pooling by 2, the same channels, FC, head and (absent) terminal norm;
an input (T,) is one channel, an image is read as its raster sequence (``models.base.signal_shape``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from creditaudit.errors import ConfigError
from creditaudit.models.base import (
    AsSignal,
    Block,
    CreditNet,
    ModelConfig,
    arch_shape,
    architecture,
    image_shape,
    signal_shape,
)

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
}


def conv_stage(c_in: int, c_out: int, dims: int = 2) -> nn.Sequential:
    conv, norm, pool = _LAYERS[dims]
    return nn.Sequential(
        conv(c_in, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(),
        pool(2),
    )


_SMALL = {"d": 16, "L": 3, "channels": (4, 6, 8)}


@architecture(
    "smallcnn",
    "3 conv+BatchNorm stages, 1 FC, head; no terminal norm unless out_ln=true (Mode 1(b)'s collapse needs one)",
    d=256,
    L=3,
    out_ln=False,
    residual=False,
    reads=("channels",),
    small=_SMALL,
)
def smallcnn(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    c, h, w = image_shape("smallcnn", input_shape)
    net = _build("smallcnn", cfg, c, (h, w), None, num_classes)
    return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub omits memory_format


@architecture(
    "smallcnn1d",
    "smallcnn on 1-D signals: 3 Conv1d+BatchNorm stages, 1 FC, head; no terminal norm unless out_ln=true",
    d=256,
    L=3,
    out_ln=False,
    residual=False,
    reads=("channels",),
    small=_SMALL,
)
def smallcnn1d(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    c, t = signal_shape("smallcnn1d", input_shape)
    return _build("smallcnn1d", cfg, c, (t,), AsSignal(c, t), num_classes)


def _build(
    arch: str,
    cfg: ModelConfig,
    c: int,
    size: tuple[int, ...],
    reader: nn.Module | None,
    num_classes: int,
) -> CreditNet:
    """The design on inputs of ``c`` channels and spatial ``size`` (one or two axes); ``reader``, if
    any, brings the dataset's inputs into the (B, c, *size) layout first."""
    if cfg.L not in (None, 0, 3):
        raise ConfigError(
            f"{arch} has exactly 3 blocks (or L=0 for the shallow variant); got L={cfg.L}"
        )
    if len(cfg.channels) != 3:
        raise ConfigError(f"{arch} needs 3 channel counts, got channels={cfg.channels}")
    if min(size) < 8:
        raise ConfigError(
            f"{arch} pools three times and needs inputs of at least 8 along each axis, got {'x'.join(map(str, size))}"
        )
    dims = len(size)
    c1, c2, c3 = cfg.channels
    shape = arch_shape(arch, cfg)
    if shape.residual:
        raise ConfigError(
            f"{arch}: residual=true is not available, its stages change the state's shape "
            "(use resmlp or vit_mini for a skip path)"
        )
    d = shape.d
    embed = (
        conv_stage(c, c1, dims)
        if reader is None
        else nn.Sequential(reader, conv_stage(c, c1, dims))
    )
    if cfg.L == 0:
        # Shallow variant: the stem feeds the head directly.
        head_in = c1 * math.prod(n // 2 for n in size)
        norm = nn.Sequential(nn.Flatten(), nn.LayerNorm(head_in)) if shape.out_ln else nn.Flatten()
        return CreditNet(embed, [], norm, nn.Linear(head_in, num_classes))
    fc_in = c3 * math.prod(n // 8 for n in size)
    blocks = [
        Block(conv_stage(c1, c2, dims), residual=False),
        Block(conv_stage(c2, c3, dims), residual=False),
        Block(nn.Sequential(nn.Flatten(), nn.Linear(fc_in, d), nn.ReLU()), residual=False),
    ]
    return CreditNet(
        embed, blocks, nn.LayerNorm(d) if shape.out_ln else nn.Identity(), nn.Linear(d, num_classes)
    )
