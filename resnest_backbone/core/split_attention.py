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

deform_groups > 0 makes the grouped conv deformable (core/deform.py): same weight, same layout; forward then
takes the block's offset-conv output.
"""
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .deform import DeformConv2d
from .dropblock import dropblock_or_identity


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
        # Global context = spatial mean of the sum of the splits, reduced in the official code's order
        # (sum the splits, then adaptive_avg_pool2d). Do not reorder (e.g. pool first, or .mean()): the
        # rounding differences grow through deep nets (ResNeSt-101 with random BN statistics: 0.07 at
        # res5 instead of bit-exact), and tests/test_fidelity.py requires 1e-5 to the official features.
        if torch.jit.is_scripting():
            gap = split_context(x, self.radix)
        else:
            gap = split_pool(x, self.radix)  # the same arithmetic; a lighter backward
        gap = self.fc1(gap)
        if torch.jit.is_scripting():
            gap = self._attention_norm_scripted(gap)
        else:
            gap = attention_norm(self.bn1, gap)
        attention = self.fc2(self.relu(gap))
        if self.radix > 1:
            # Weighted sum of the splits over views of the conv output (no split / stack / copy).
            return split_sum(x, self.radix, rsoftmax(attention, self.radix, self.cardinality))
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


def rsoftmax(attention: torch.Tensor, radix: int, cardinality: int) -> torch.Tensor:
    """rSoftMax: the split weights (B, radix, C, 1, 1), radix-major, from fc2's output (B, radix*C, 1, 1)
    whose rows are cardinality-major (k, r, c): a softmax over radix within each cardinal group. The fused
    path permutes fc2's rows to radix-major once and passes cardinality=1 (the transpose is then a view).

    The softmax is computed in float32 whatever the input's dtype (bf16 / fp16 under torch.autocast or in a
    half-precision model, where autocast itself would leave it in half precision), and its result is
    returned in the input's dtype. For float32 input both casts are no-ops: bit-identical to before."""
    batch = attention.size(0)
    attention = attention.view(batch, cardinality, radix, -1).transpose(1, 2)
    weights = F.softmax(attention.float(), dim=1).to(attention.dtype)
    return weights.reshape(batch, radix, -1, 1, 1)


def split_sum(x: torch.Tensor, radix: int, attention: Optional[torch.Tensor] = None,
              fma: bool = False) -> torch.Tensor:
    """The radix reduction: sum_r x[:, r*C:(r+1)*C] (* attention[:, r]) for a radix-major (B, radix*C, H, W)
    `x` and, if given, split weights `attention` (B, radix, C, 1, 1), over views of `x` (no split / stack /
    copy). channels_last inputs give channels_last outputs: the reduction runs over the (B, H*W, radix, C)
    memory order (the (B, radix, C, H, W) view would be a strided reduction with an NCHW result, 2-4x slower
    forward + backward).

    Default (the training form, SplitAttentionConv2d): bit-identical to the official `sum(torch.split(x, C, 1))`
    and `sum([att * split for ...])`: each product is rounded on its own and the splits are added in radix
    order (no fused multiply-add, which rounds differently and which deep nets amplify past the 1e-5 fidelity
    bound of tests/test_fidelity.py). Two forms of the same arithmetic for the weighted sum:
      - with autograd: one broadcast multiply over a (B, radix, C, H, W) view and a sum over radix. Its
        backward is one multiply per input, where per-split products (`x[:, r] * a[:, r]`) would make
        autograd fill a zero (B, radix*C, H, W) gradient per split and add them up: 2x slower backward;
      - without (eval, no_grad): radix-2 products of the two split views and one add: no
        (B, radix*C, H, W) temporary.
    fma=True (the fused inference path, core/fuse.py), radix 2: one multiply and one in-place fused
    multiply-add (addcmul_) into a preallocated output in `x`'s layout: each split is read once and no
    (B, radix*C, H, W) product is materialised; it may round differently, by about 1e-7 relative.
    """
    batch, height, width = x.size(0), x.size(2), x.size(3)
    channels = x.size(1) // radix
    channels_last = _channels_last(x)
    if attention is not None and fma and radix == 2:
        splits = x.view(batch, 2, channels, height, width)
        if torch.jit.is_tracing() or x.requires_grad:  # export / autograd: functional ops only
            return torch.addcmul(splits[:, 0] * attention[:, 0], splits[:, 1], attention[:, 1])
        out = split_output(x, radix)
        torch.mul(splits[:, 0], attention[:, 0], out=out)
        return out.addcmul_(splits[:, 1], attention[:, 1])
    if channels_last and torch.compiler.is_compiling():
        # torch.compile: the reduction over the radix view, then the layout asked for. Inductor fuses either
        # form, and the (B, H*W, radix, C) view below stops its stride ordering with dynamic shapes
        # ("cannot determine truth value of Relational", torch 2.14).
        splits = x.view(batch, radix, channels, height, width)
        out = splits.sum(1) if attention is None else (splits * attention).sum(1)
        return out.contiguous(memory_format=torch.channels_last)
    if channels_last:
        hwrc = x.permute(0, 2, 3, 1).reshape(batch, height * width, radix, channels)  # a view
        if attention is not None:
            hwrc = hwrc * attention.view(batch, 1, radix, channels)
        return hwrc.sum(2).view(batch, height, width, channels).permute(0, 3, 1, 2)
    splits = x.view(batch, radix, channels, height, width)
    if attention is None:
        return splits.sum(1)
    else:
        if radix == 2 and not (x.requires_grad or attention.requires_grad):
            return splits[:, 0] * attention[:, 0] + splits[:, 1] * attention[:, 1]
        return (splits * attention).sum(1)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def split_output(x: torch.Tensor, radix: int) -> torch.Tensor:
    """An empty (B, C, H, W) tensor for the weighted sum of the radix splits of `x` (B, radix*C, H, W), in
    x's layout (channels_last or contiguous). An explicit output, because a product of the split views gets
    odd strides at batch 1 (the batch stride of a channels_last view is C), which pooling / conv layers
    then read as NCHW and copy."""
    channels_last = _channels_last(x)
    return torch.empty([x.size(0), x.size(1) // radix, x.size(2), x.size(3)], dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# A leaf for torch.fx: symbolic tracing (int8 FX quantization) records split_sum as one call instead of
# branching on the traced tensor's memory format.
torch.fx.wrap("split_sum")


def split_context(x: torch.Tensor, radix: int) -> torch.Tensor:
    """The global context with plain ops: adaptive_avg_pool2d of the split sum (of x itself for radix 1)."""
    return F.adaptive_avg_pool2d(split_sum(x, radix) if radix > 1 else x, 1)


class _SplitPool(torch.autograd.Function):
    """adaptive_avg_pool2d(split_sum(x, radix), 1) whose backward returns the gradient as what it is: the
    same value over every split and pixel, a broadcast (stride-0) view of a (B, radix*C, 1, 1) tensor. Autograd's
    own backward materialises it at full size twice (the pool's backward, then a copy to undo the radix
    view) before adding it to the weighted sum's gradient; a broadcast view is added in place instead. The
    values are the same (tests/test_split_attention.py compares the gradients; 1.7% of a ResNeSt-50 training
    step at 2x512x768 here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, radix: int) -> torch.Tensor:
        ctx.shape, ctx.radix = x.shape, radix
        return split_context(x, radix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        batch, channels, height, width = ctx.shape
        grad = (grad / (height * width)).reshape(batch, 1, channels // ctx.radix)
        grad = grad.expand(batch, ctx.radix, channels // ctx.radix).reshape(batch, channels, 1, 1)
        return grad.expand(batch, channels, height, width), None  # linear in grad: double backward works


@torch.jit.unused
def split_pool(x: torch.Tensor, radix: int) -> torch.Tensor:
    """Global context of the split-attention block: the spatial mean of the sum of the radix splits (B, C, 1, 1),
    reduced in the official code's order (sum the splits, then adaptive_avg_pool2d). Under autograd, with a
    lighter backward (_SplitPool); under jit tracing, the plain ops."""
    if x.requires_grad and not torch.jit.is_tracing():
        return _SplitPool.apply(x, radix)
    return split_context(x, radix)


torch.fx.wrap("split_pool")


def weighted_split_sum(x: torch.Tensor, attention: torch.Tensor, radix: int) -> torch.Tensor:
    """The splits of `x` weighted by `attention` and summed, in the training form: split_sum."""
    return split_sum(x, radix, attention)


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
