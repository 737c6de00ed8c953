"""Split-attention convolution (ResNeSt, Zhang et al. 2020, section 3).

Channel layout (the official checkpoints' layout, so their weights load unchanged):
  the grouped conv has radix * cardinality groups and its output is radix-major:
  channel index = (r * cardinality + k) * group_channels + c   for split r, cardinal group k.
  fc1 / fc2 are grouped by cardinality, so fc2's output is cardinality-major: (k, r, c).
rSoftMax views fc2's output as (batch, cardinality, radix, rest) and takes the softmax over radix, then
transposes to radix-major to weight the splits. This is exactly the paper's per-cardinal-group equations
(tests/test_split_attention.py checks it against a literal cardinality-major implementation). The early
public code normalised over the wrong axis and mixed channels across cardinal groups.

radix >= 2: softmax over the radix splits; radix == 1: a sigmoid gate (SE-like); radix == 0 is not this
module (the bottleneck uses a plain grouped conv).
"""
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .dropblock import DropBlock2D


def attention_channels(in_channels: int, radix: int, reduction_factor: int = 4) -> int:
    """Width of the attention MLP's hidden layer, as in the official code."""
    return max(in_channels * radix // reduction_factor, 32)


class SplitAttentionConv2d(nn.Module):
    """Grouped conv producing `radix` splits per cardinal group, fused by split attention.

    Submodule names follow the official checkpoints: conv, bn0, fc1, bn1, fc2.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, cardinality: int = 1, radix: int = 2,
                 reduction_factor: int = 4, norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 dropblock_prob: float = 0.0, bias: bool = False):
        super().__init__()
        if radix < 1:
            raise ValueError(f"SplitAttentionConv2d needs radix >= 1, got radix={radix} "
                             "(radix 0 means a plain conv: the bottleneck builds that instead)")
        if cardinality < 1:
            raise ValueError(f"cardinality={cardinality} must be >= 1")
        if in_channels % (cardinality * radix) or channels % cardinality:
            raise ValueError(
                f"split attention: in_channels={in_channels} must be divisible by cardinality*radix="
                f"{cardinality * radix} and channels={channels} by cardinality={cardinality}")
        inter_channels = attention_channels(in_channels, radix, reduction_factor)
        if inter_channels % cardinality:
            raise ValueError(f"split attention: attention width {inter_channels} is not divisible by "
                             f"cardinality={cardinality}")
        self.radix = radix
        self.cardinality = cardinality
        self.channels = channels
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                              groups=cardinality * radix, bias=bias)
        self.bn0 = norm_layer(channels * radix) if norm_layer is not None else nn.Identity()
        self.dropblock = DropBlock2D(dropblock_prob, 3) if dropblock_prob > 0 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=cardinality)
        self.bn1 = norm_layer(inter_channels) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=cardinality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.dropblock(self.bn0(self.conv(x))))
        batch = x.size(0)
        # Global context = spatial mean of the sum of the splits. Pooling first and then summing the
        # radix pooled vectors is the same number, without a full-size (C, H, W) temporary.
        gap = x.mean((2, 3), keepdim=True)
        if self.radix > 1:
            gap = gap.view(batch, self.radix, self.channels, 1, 1).sum(1)
        gap = self.fc1(gap)
        if torch.jit.is_scripting():
            gap = self._attention_norm_scripted(gap)
        else:
            gap = attention_norm(self.bn1, gap)
        attention = self.fc2(self.relu(gap))
        if self.radix > 1:
            # rSoftMax: fc2 output is (cardinality, radix, c); softmax over radix, back to radix-major.
            attention = attention.view(batch, self.cardinality, self.radix, -1).transpose(1, 2)
            attention = F.softmax(attention, dim=1).reshape(batch, self.radix, self.channels, 1, 1)
            # One view of the conv output as (batch, radix, channels, H, W) (no split / stack / copy; also
            # valid for channels_last tensors) and one weighted sum over radix.
            splits = x.view(batch, self.radix, self.channels, x.size(2), x.size(3))
            return (splits * attention).sum(dim=1)
        return x * torch.sigmoid(attention)

    def _attention_norm_scripted(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript form of attention_norm (which takes a module argument, so cannot be scripted).
        # hasattr / `is not None` on submodule attributes are resolved at compile time, so Identity, GN
        # and BN without running statistics compile to the plain call. The process-group check is not
        # scriptable: a scripted SyncBN at batch 1 per process also uses the running statistics.
        if hasattr(self.bn1, "running_mean") and hasattr(self.bn1, "num_batches_tracked"):
            if self.bn1.running_mean is not None and self.training and x.size(0) == 1:
                return F.batch_norm(x, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight,
                                    self.bn1.bias, False, 0.0, self.bn1.eps)
        return self.bn1(x)


def attention_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply the norm after the global pool, where each channel has batch-size values.

    BatchNorm in training mode cannot estimate statistics from one value per channel (batch 1: the
    official code crashes with "Expected more than 1 value per channel"). There we normalise with the
    running statistics for this step instead of failing, and leave them unchanged.
    """
    if (norm.training and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm.running_mean is not None and x.shape[0] == 1 and not _synced_across_processes(norm)):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0,
                            norm.eps)
    return norm(x)


def _synced_across_processes(norm: nn.Module) -> bool:
    # SyncBN in a multi-process run sees the whole global batch, so batch 1 per process is fine there.
    return (isinstance(norm, nn.SyncBatchNorm) and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)
