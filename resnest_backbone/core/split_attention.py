"""Split-attention convolution (ResNeSt, Zhang et al. 2020, section 3).

Channel layout (the official checkpoints' layout, so their weights load unchanged):
  the grouped conv has radix * cardinality groups and its output is radix-major:
  channel index = (r * cardinality + k) * group_channels + c   for split r, cardinal group k.
  fc1 / fc2 are grouped by cardinality, so fc2's output is cardinality-major: (k, r, c).
rSoftMax views fc2's output as (batch, cardinality, radix, rest) and takes the softmax over radix, then
transposes to radix-major to weight the splits. This is exactly the paper's per-cardinal-group equations
(tests/test_split_attention.py checks it against a literal cardinality-major implementation). The early
public code normalised over the wrong axis and mixed channels across cardinal groups.

Order of operations, the official code's, for bit-identical features (tests/test_fidelity.py): the global
context is the spatial mean (adaptive_avg_pool2d) of the sum of the splits, and the output adds the weighted
splits in radix order, each product rounded on its own (core/radix.py: split_pool, split_sum, on views of the
conv output in any layout). Reordering (pool first, .mean(), a fused multiply-add) changes the rounding, which
deep nets amplify (ResNeSt-101 with random BN statistics: 0.07 at res5).

radix >= 2: softmax over the radix splits; radix == 1: a sigmoid gate (SE-like); radix == 0 is not this
module (the bottleneck uses a plain grouped conv).

deform_groups > 0 makes the grouped conv deformable (core/deform.py): same weight, same layout; forward then
takes the block's offset-conv output.
"""
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .deform import DeformConv2d
from .dropblock import dropblock_or_identity
from .radix import split_pool, split_sum

torch.fx.wrap("split_pool")  # calls in torch.fx graphs (int8 tracing): they branch on the tensor's layout
torch.fx.wrap("split_sum")


def attention_channels(in_channels: int, radix: int, reduction_factor: int = 4) -> int:
    """Width of the attention MLP's hidden layer, as in the official code."""
    return max(in_channels * radix // reduction_factor, 32)


class SplitAttentionConv2d(nn.Module):
    """Grouped conv producing `radix` splits per cardinal group, fused by split attention.

    Submodule names follow the official checkpoints: conv, bn0, fc1, bn1, fc2.
    deform_groups > 0: `conv` is a (modulated, if deform_modulated) deformable conv with that many offset
    groups, and forward(x, offset) takes the offset conv's output.
    """
    deformable: torch.jit.Final[bool]

    def __init__(self, in_channels: int, channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, cardinality: int = 1, radix: int = 2,
                 reduction_factor: int = 4, norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 dropblock_prob: float = 0.0, bias: bool = False, deform_groups: int = 0,
                 deform_modulated: bool = False):
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
        self.deformable = deform_groups > 0
        if self.deformable:
            self.conv = DeformConv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                                     groups=cardinality * radix, bias=bias, deform_groups=deform_groups,
                                     modulated=deform_modulated)
        else:
            self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                                  groups=cardinality * radix, bias=bias)
        self.bn0 = norm_layer(channels * radix) if norm_layer is not None else nn.Identity()
        self.dropblock = dropblock_or_identity(dropblock_prob)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=cardinality)
        self.bn1 = _pooled_norm(norm_layer, inter_channels) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=cardinality)

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.deformable:  # a TorchScript constant: only one branch is compiled
            if offset is None:
                raise ValueError("a deformable split-attention conv needs the offset conv's output")
            x = self.conv(x, offset)
        else:
            x = self.conv(x)
        x = self.relu(self.dropblock(self.bn0(x)))
        gap = split_pool(x, self.radix)  # the spatial mean of the sum of the splits
        gap = self.relu(self.attention_norm(self.fc1(gap)))
        attention = self.fc2(gap)
        if self.radix == 1:
            return x * torch.sigmoid(attention)
        return split_sum(x, self.radix, rsoftmax(attention, self.radix, self.cardinality))

    def attention_norm(self, gap: torch.Tensor) -> torch.Tensor:
        """bn1 on the pooled context, where each channel has batch-size values. BatchNorm in training cannot
        estimate statistics from one value per channel (batch 1: the official code crashes with "Expected more
        than 1 value per channel"): there it normalises with its running statistics for this step and leaves
        them unchanged (not a SyncBN across processes, which sees the global batch; a scripted module does not
        check that)."""
        if hasattr(self.bn1, "running_mean") and hasattr(self.bn1, "num_batches_tracked"):  # TorchScript: static
            if self.bn1.training and gap.size(0) == 1 and self.bn1.running_mean is not None:
                synced = False
                if not torch.jit.is_scripting():
                    synced = _synced_across_processes(self.bn1)
                if not synced:
                    return F.batch_norm(gap, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight,
                                        self.bn1.bias, False, 0.0, self.bn1.eps)
        return self.bn1(gap)


def _synced_across_processes(norm: nn.Module) -> bool:
    return (isinstance(norm, nn.SyncBatchNorm) and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


def rsoftmax(attention: torch.Tensor, radix: int, cardinality: int) -> torch.Tensor:
    """rSoftMax: the split weights (B, radix, C, 1, 1), radix-major, from fc2's output (B, radix*C, 1, 1)
    whose rows are cardinality-major (k, r, c): a softmax over radix within each cardinal group. The fused
    path permutes fc2's rows to radix-major once and passes cardinality=1 (the transpose is then a view).
    Computed in float32 whatever the input's dtype (under bf16 / fp16 autocast, which would leave it in half
    precision), returned in the input's dtype."""
    batch = attention.size(0)
    attention = attention.view(batch, cardinality, radix, -1).transpose(1, 2)
    weights = F.softmax(attention.float(), dim=1).to(attention.dtype)
    return weights.reshape(batch, radix, -1, 1, 1)


def _pooled_norm(norm_layer: Callable[[int], nn.Module], channels: int) -> nn.Module:
    """The norm after the global pool. GroupNorm there sees one value per channel, so a group of one
    channel would be normalised to zero (and torch refuses it: "Expected more than 1 value per channel");
    use at most channels/2 groups. Parameters and their shapes are unchanged, so checkpoints still load."""
    norm = norm_layer(channels)
    if isinstance(norm, nn.GroupNorm) and norm.num_channels // norm.num_groups < 2:
        groups = max(g for g in range(1, channels // 2 + 1) if channels % g == 0 and channels // g >= 2)
        fixed = nn.GroupNorm(groups, channels, norm.eps, norm.affine)
        fixed.load_state_dict(norm.state_dict())
        norm = fixed
    return norm
