"""Deformable split attention (DCN v1 / DCNv2), on `torchvision.ops.deform_conv2d` (CPU and CUDA).

As the official detectron2 wrapper (ResNeSt `d2/resnest.py`, DeformBottleneckBlock + SplAtConv2d_dcn): the
grouped 3x3 conv inside split attention (`conv2.conv`, groups = cardinality * radix, radix-major output,
same weight shape and name as the plain conv) becomes a deformable conv, and a block-level offset conv
`conv2_offset` (3x3, same stride / dilation as conv2, `groups=deform_num_groups`, with bias, zero-initialised)
predicts from conv2's input:
  DCN v1: the offsets, 18 * deform_num_groups channels;
  DCNv2:  27 * deform_num_groups channels, split as the official code does: `o1, o2, m = chunk(3)`,
          offsets = cat(o1, o2), mask = sigmoid(m).
So the official DCN checkpoints' `conv2_offset.{weight,bias}` load by name, with their meaning.
The offset layout is torchvision's (and detectron2's / mmcv's): per offset group, per kernel tap, (dy, dx).

Zero offsets sample exactly the plain conv's taps, so a DCN v1 block with a zero-initialised `conv2_offset`
computes the plain block (up to summation order: deform_conv2d is an im2col + matmul). For DCNv2 the
zero-initialised mask is sigmoid(0) = 0.5 (official and detectron2 behaviour): the conv output starts halved,
which the following BatchNorm absorbs in training but not in eval.
"""
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torchvision.ops import deform_conv2d


def offset_channels(modulated: bool, kernel_size: int = 3) -> int:
    """Channels the offset conv predicts per deformable group: 2 per tap (+ 1 mask value per tap for DCNv2)."""
    return (3 if modulated else 2) * kernel_size * kernel_size


def split_offset_mask(offset_mask: torch.Tensor, modulated: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(offset, mask) from the offset conv's output, as the official code splits it (DCNv2:
    o1, o2, m = chunk(3); offset = cat(o1, o2); mask = sigmoid(m)); DCN v1: (offset_mask, None)."""
    if not modulated:
        return offset_mask, None
    o1, o2, mask = torch.chunk(offset_mask, 3, dim=1)
    return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)


class DeformConv2d(nn.Module):
    """A (modulated) deformable conv: `weight` (and `bias`) shaped and named as nn.Conv2d's, so a plain
    conv's weights load into it unchanged. forward(x, offset_mask) takes the raw offset-conv output.

    Weight groups come from the weight's shape and offset groups from the offset's channels (torchvision)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = False,
                 deform_groups: int = 1, modulated: bool = False):
        super().__init__()
        if in_channels % groups or out_channels % groups or in_channels % deform_groups:
            raise ValueError(f"DeformConv2d: in_channels={in_channels} / out_channels={out_channels} must be "
                             f"divisible by groups={groups}, and in_channels by deform_groups={deform_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.modulated = modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default

    def forward(self, x: torch.Tensor, offset_mask: torch.Tensor) -> torch.Tensor:
        offset, mask = split_offset_mask(offset_mask, self.modulated)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, modulated={self.modulated}, bias={self.bias is not None}")


def offset_conv(in_channels: int, stride: int, dilation: int, deform_groups: int, modulated: bool) -> nn.Conv2d:
    """The block's `conv2_offset`: 3x3 over conv2's input, conv2's stride and dilation, grouped by
    deform_groups, with bias, weight and bias zero (zero offsets; DCNv2 mask sigmoid(0) = 0.5)."""
    conv = nn.Conv2d(in_channels, offset_channels(modulated) * deform_groups, 3, stride, padding=dilation,
                     dilation=dilation, groups=deform_groups, bias=True)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


OFFSET_MODULE = "conv2_offset"  # its name in a block: state-dict keys layerN.j.conv2_offset.{weight,bias}


def is_offset_key(key: str) -> bool:
    """A state-dict key of a deformable block's offset branch (official name `conv2_offset`)."""
    return f"{OFFSET_MODULE}." in key


def has_deformable(model: nn.Module) -> bool:
    """Whether `model` contains a deformable conv."""
    return any(isinstance(m, DeformConv2d) for m in model.modules())


__all__ = ["DeformConv2d", "OFFSET_MODULE", "has_deformable", "is_offset_key", "offset_channels", "offset_conv",
           "split_offset_mask"]
