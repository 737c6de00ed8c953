"""Inference fast path ("deploy" form) of a ResNeSt trunk.

    trunk = build_resnest("resnest50").eval()        # or a detectron2 ResNeStBackbone, frozen or not
    fast = fuse_resnest(trunk)                       # a converted copy (inplace=True: convert this one)
    fast = deploy(trunk, channels_last=True)         # fuse + channels_last (+ compile=True: torch.compile)
    fast = deploy(trunk, dtype=torch.bfloat16)       # ... run under bf16 autocast (also whole detectors)

What changes (the outputs do not, up to float rounding; tests/test_fuse.py checks every variant):
  - every BatchNorm / SyncBatchNorm (running statistics) and FrozenBatchNorm (core or detectron2) is folded
    into the conv before it: stem convs, block conv1 / conv3, the split-attention conv (bn0), the attention
    MLP's fc1 (bn1), the shortcut conv. GroupNorm cannot be folded and is kept;
  - the split-attention rows of fc2 are permuted once to radix-major order, so rSoftMax is a softmax over a
    (batch, radix, channels) view: no regrouping, no copy;
  - the attention is computed with the core's radix reduction (split_attention.split_sum, fma=True: views
    and tensor ops over the radix dimension, no split / stack / list sum; radix 2 in eager inference: one
    torch.lerp, softmax_split_sum), and the residual add + ReLU run
    in place; DropBlock (a no-op in inference) is dropped;
  - channels_last is supported end to end (views only, no `.contiguous()`), which is what oneDNN / cuDNN
    convolutions prefer;
  - deformable blocks (core/deform.py) keep their offset conv; bn0 / bn2 fold into the deformable conv's
    weight and bias exactly as into a plain conv (it is linear in its weight);
  - on CPU in float32 without autograd (eager inference), each block runs as three of PyTorch's oneDNN
    fused-convolution calls (torch.ops.mkldnn._convolution_pointwise): conv1 + ReLU, the split conv +
    ReLU, and conv3 + residual add + ReLU, the sum written in place into the downsample's output or, for
    the blocks after the first of a stage, into the block's input (the previous block's output, which
    nothing else reads: a forward hook that keeps a block's output sees it overwritten); the stem's
    conv + ReLU pairs likewise. Under CPU bf16 autocast (deploy(dtype=torch.bfloat16)) the same calls run
    in bf16, on bf16 copies of those convs' weights made at the first call and kept on the modules
    (outside the state dict; remade when a weight changes). Tracing, scripting, ONNX export,
    torch.compile, other autocast dtypes and autograd see the plain ops (onednn_dtype). Equal to the plain
    ops up to float rounding (tests/test_fuse.py: 1e-5 relative in fp32). `fuse.use_onednn = False` turns
    it off.
The converted modules are inference only: folded statistics can no longer update (train() changes nothing).
The result stays a ResNeSt (same class, same `forward`, `output_shape()` for detectron2), and scripts,
traces and exports to ONNX like the original.
"""
import contextlib
import copy
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .deform import DeformConv2d
from .split_attention import SplitAttentionConv2d, rsoftmax, split_output, split_sum
from .trunk import STAGE_MODULES, Bottleneck, ResNeSt

__all__ = ["AUTOCAST_DTYPES", "FP32_HEADS", "FusedBottleneck", "FusedConvReLU", "FusedSplitAttention",
           "autocast_forward", "autocast_inference", "deploy", "fold_conv_norm", "fp32_heads", "fuse_model",
           "fuse_resnest", "fused_split_sum", "keep_fp32_heads", "norm_scale_shift", "onednn_dtype",
           "softmax_split_sum"]


# ---------------------------------------------------------------------------------------------- folding
def norm_scale_shift(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift), in float64, with `norm(x) == x * scale + shift` per channel at inference time,
    or None when the norm is not a per-channel affine map at inference (GroupNorm, BN without running
    statistics, anything unknown)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):  # BN, SyncBN, detectron2's BatchNorm2d, ...
        if norm.running_mean is None or norm.running_var is None:
            return None  # track_running_stats=False: batch statistics even in eval
        mean, var = norm.running_mean, norm.running_var
        weight = norm.weight if norm.affine else None
        bias = norm.bias if norm.affine else None
    elif _is_frozen_bn(norm):  # core.FrozenBatchNorm2d and detectron2.layers.FrozenBatchNorm2d
        mean, var, weight, bias = norm.running_mean, norm.running_var, norm.weight, norm.bias
    else:
        return None
    scale = (var.detach().double() + norm.eps).rsqrt()
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _is_frozen_bn(norm: nn.Module) -> bool:
    return (type(norm).__name__ == "FrozenBatchNorm2d"
            and all(isinstance(getattr(norm, n, None), torch.Tensor)
                    for n in ("weight", "bias", "running_mean", "running_var")))


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module]) -> Tuple[nn.Conv2d, nn.Module]:
    """Return (conv', norm') computing norm(conv(x)) at inference: norm folded into a copy of the conv
    (weights scaled per output channel, a bias added) and nn.Identity(); or the pair unchanged when the
    norm cannot be folded (GroupNorm, ...). The originals are not modified."""
    if norm is None or isinstance(norm, nn.Identity):
        return conv, nn.Identity()
    stats = norm_scale_shift(norm)
    if stats is None:
        return conv, norm
    scale, shift = stats
    fused = copy.deepcopy(conv)
    weight = conv.weight.detach()
    fused.weight = nn.Parameter((weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
                                .to(weight.dtype), requires_grad=False)
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    fused.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return fused, nn.Identity()


# ------------------------------------------------------- oneDNN fused convolutions (CPU, fp32 and bf16)
def _onednn_ops():
    """PyTorch's own oneDNN fused-convolution ops (torch.ops.mkldnn, CPU):
    conv + ReLU, and conv + add + ReLU written in place into the added tensor; None where this build of
    torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return (torch.ops.mkldnn._convolution_pointwise.default,
                torch.ops.mkldnn._convolution_pointwise.binary,
                torch.ops.mkldnn._convolution_pointwise_.binary)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_ops()
# The fast path's eager CPU calls use _ONEDNN where onednn_dtype allows and this is True (set it to False to
# compare, or to rule oneDNN's fused ops out when chasing a problem): the modules and weights stay the same.
use_onednn = True


def _bf16_supported() -> bool:
    try:
        return _ONEDNN is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BF16 = _bf16_supported()


@torch.jit.unused
def onednn_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a fused block computes this call in with oneDNN's fused ops, or None where the plain ops
    run. float32 for a plain float32 CPU tensor; bfloat16 under CPU bf16 autocast (deploy(dtype=
    torch.bfloat16)), where the CPU has bf16 instructions. None with autograd (an input that needs a
    gradient), other autocast dtypes, and whenever something traces, compiles or exports the model: those
    see the plain ops, so traces, ONNX files and torch.compile work as before."""
    if not (use_onednn and _ONEDNN is not None and type(x) is torch.Tensor and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export()):
        return None
    if torch.is_autocast_enabled("cpu"):
        if (_ONEDNN_BF16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and x.dtype in (torch.float32, torch.bfloat16)):
            return torch.bfloat16
        return None
    return torch.float32 if x.dtype == torch.float32 else None


def onednn_conv(conv: nn.Module) -> bool:
    """Whether `conv` can be one of those ops: a plain zero-padded float32 nn.Conv2d (or FusedConvReLU)
    with numeric padding and no trainable weights."""
    return (isinstance(conv, nn.Conv2d) and type(conv) in (nn.Conv2d, FusedConvReLU)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32 and not conv.weight.requires_grad
            and (conv.bias is None or not conv.bias.requires_grad))


def _weights(conv: nn.Conv2d, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The conv's weight and bias in `dtype`: themselves in float32; for bf16 a copy made once and kept on
    the module (not in its state dict), remade when the weights change (autocast would cast them again at
    every call: fused weights need no gradient, so autocast does not cache them)."""
    weight, bias = conv.weight, conv.bias
    if weight.dtype == dtype:
        return weight, bias
    key = (dtype, weight.data_ptr(), weight._version,
           None if bias is None else (bias.data_ptr(), bias._version))
    cached = conv.__dict__.get("_onednn_weights")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        conv.__dict__["_onednn_weights"] = cached
    return cached[1], cached[2]


def _conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) in one oneDNN call (ReLU as the convolution's post-op), in x's dtype."""
    weight, bias = _weights(conv, x.dtype)
    return _ONEDNN[0](x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "relu", [], "")


def _conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor, inplace: bool) -> torch.Tensor:
    """relu(conv(x) + other) in one oneDNN call, in x's dtype; inplace=True writes it into `other`."""
    weight, bias = _weights(conv, x.dtype)
    if inplace:
        return _ONEDNN[2](other, x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add",
                          None, "relu", [], None)
    return _ONEDNN[1](x, other, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add", None,
                      "relu", [], None)


class FusedConvReLU(nn.Conv2d):
    """relu(conv(x)) for a (folded) conv followed by a ReLU, e.g. in the stem: one oneDNN call where
    onednn_dtype allows, else the two plain ops. An nn.Conv2d, so the state-dict keys stay those of the conv."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConvReLU":
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        out.weight = conv.weight
        out.bias = conv.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = onednn_dtype(x)
            if dtype is not None and onednn_conv(self):
                return _conv_relu(self, x.to(dtype))
        return F.relu(self._conv_forward(x, self.weight, self.bias), inplace=True)


# ------------------------------------------------------------------------------------ fused modules
def fused_split_sum(x: torch.Tensor, attention: torch.Tensor, radix: int) -> torch.Tensor:
    """The splits of `x` weighted by `attention` and summed, in the fused form (radix 2: a fused
    multiply-add into a preallocated output): split_sum(..., fma=True). (The training-form module keeps the
    official code's order of operations, bit for bit; this one may round differently, by about 1e-7
    relative.)"""
    return split_sum(x, radix, attention, fma=True)


def softmax_split_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Radix 2 with rSoftMax's split weights (B, 2, C, 1, 1), which sum to 1 per channel: w0 * x0 + w1 * x1 =
    x0 + w1 * (x1 - x0), one torch.lerp into a preallocated output in `x`'s layout. Each split is read once
    and the output written once; fused_split_sum's multiply then fused multiply-add writes the output twice
    and reads it once more. It rounds differently again, by about 1e-7 relative (w0 is taken as 1 - w1).
    Autograd, tracing / export, scripting and mixed dtypes take fused_split_sum (valid for any weights), and
    so does torch.compile (which fuses either)."""
    if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or x.requires_grad
            or weights.requires_grad or weights.dtype != x.dtype):
        return split_sum(x, 2, weights, fma=True)
    splits = x.view(x.size(0), 2, x.size(1) // 2, x.size(2), x.size(3))
    return torch.lerp(splits[:, 0], splits[:, 1], weights[:, 1], out=split_output(x, 2))


class FusedSplitAttention(nn.Module):
    """Inference form of SplitAttentionConv2d: bn0 and bn1 folded, fc2 rows in radix-major order."""
    deformable: torch.jit.Final[bool]

    def __init__(self, sa: SplitAttentionConv2d):
        super().__init__()
        self.deformable = isinstance(sa.conv, DeformConv2d)
        self.radix = sa.radix
        self.cardinality = sa.cardinality
        self.channels = sa.channels
        self.conv, self.norm0 = fold_conv_norm(sa.conv, sa.bn0)
        self.fc1, self.norm1 = fold_conv_norm(sa.fc1, sa.bn1)
        if self.radix > 1 and self.cardinality > 1:
            self.fc2 = _radix_major_fc2(sa.fc2, self.cardinality, self.radix)
        else:  # one cardinal group, or radix 1 (sigmoid): the rows are already in the conv's order
            self.fc2 = copy.deepcopy(sa.fc2)

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.deformable:
            if offset is None:
                raise ValueError("a deformable split-attention conv needs the offset conv's output")
            x = F.relu(self.norm0(self.conv(x, offset)), inplace=True)
        else:
            x = self.conv_relu(x)
        attention = self.attention(x)
        if self.radix == 2:  # fc2's rows are radix-major here: rSoftMax of one group
            return softmax_split_sum(x, rsoftmax(attention, 2, 1))
        if self.radix > 1:
            return split_sum(x, self.radix, rsoftmax(attention, self.radix, 1), fma=True)
        if x.requires_grad:
            return x * torch.sigmoid(attention)
        return x.mul_(torch.sigmoid(attention))  # radix 1: a gate, in place on the conv output

    def conv_relu(self, x: torch.Tensor) -> torch.Tensor:
        """relu(norm0(conv(x))) of the plain (not deformable) split conv: one oneDNN call where it applies."""
        fused: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            fused = self.onednn_conv_relu(x)
        return F.relu(self.norm0(self.conv(x)), inplace=True) if fused is None else fused

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """fc2's output (radix-major rows) from the split conv's output x (after its ReLU): the attention MLP
        on the global context, the spatial mean of the sum of the splits."""
        gap = x.mean((2, 3), keepdim=True)
        if self.radix > 1:
            gap = split_sum(gap, self.radix)
        return self.fc2(F.relu(self.norm1(self.fc1(gap)), inplace=True))

    @torch.jit.unused
    def pools_before_sum(self, pool: nn.Module) -> bool:
        """Whether forward_pooled can take `pool` (the block's avd pool after this conv): radix 2, and an
        average pool, which is linear and the same for every channel, so it commutes with the weighted
        sum of the splits (their weights are constant over the image)."""
        return self.radix == 2 and not self.deformable and type(pool) is nn.AvgPool2d

    @torch.jit.unused
    def forward_pooled(self, x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
        """pool(forward(x)) for pools_before_sum(pool), in the other order: the attention from the split
        conv's output, then the pool on the (B, 2C, H, W) splits and the weighted sum at the pooled size
        (a stride-2 avd pool: a quarter of the pixels). The sum reads the splits once at the small size instead
        of at the large one and writes a quarter of its output; the pool reads the splits once at the large
        size instead of the sum's output, and writes twice as many channels at the small one. Equal to
        pool(forward(x)) within float rounding (about 1e-7 relative)."""
        x = self.conv_relu(x)
        return softmax_split_sum(pool(x), rsoftmax(self.attention(x), 2, 1))

    @torch.jit.unused
    def onednn_conv_relu(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """relu(conv(x)) as one oneDNN call, or None where this call takes the plain ops (onednn_dtype)."""
        dtype = onednn_dtype(x) if isinstance(self.norm0, nn.Identity) and onednn_conv(self.conv) else None
        return None if dtype is None else _conv_relu(self.conv, x.to(dtype))


def _radix_major_fc2(fc2: nn.Conv2d, cardinality: int, radix: int) -> nn.Conv2d:
    """fc2 is grouped by cardinality and its output is cardinality-major (k, r, c). Return the same map as
    one dense 1x1 conv (block-diagonal weight) whose output rows are radix-major (r, k, c), the layout of
    the split conv, so rSoftMax becomes a softmax over a plain (B, radix, channels) view. (Rows of a grouped
    conv cannot be permuted across groups; the dense form costs a few kMACs on a 1x1 input.)"""
    rows, per_group_in = fc2.out_channels, fc2.in_channels // cardinality
    rows_per_group = rows // cardinality
    weight = fc2.weight.detach()
    dense = torch.zeros(rows, fc2.in_channels, 1, 1, dtype=weight.dtype)
    for k in range(cardinality):
        dense[k * rows_per_group:(k + 1) * rows_per_group, k * per_group_in:(k + 1) * per_group_in] = \
            weight[k * rows_per_group:(k + 1) * rows_per_group]
    order = torch.arange(rows).view(cardinality, radix, -1).transpose(0, 1).reshape(-1)
    out = nn.Conv2d(fc2.in_channels, rows, 1, bias=fc2.bias is not None)
    out.weight = nn.Parameter(dense[order].clone(), requires_grad=False)
    if fc2.bias is not None:
        out.bias = nn.Parameter(fc2.bias.detach()[order].clone(), requires_grad=False)
    return out


class FusedBottleneck(nn.Module):
    """Inference form of Bottleneck: every foldable norm folded into its conv; in-place add + ReLU."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.out_channels = block.out_channels
        self.conv1, self.norm1 = fold_conv_norm(block.conv1, block.bn1)
        avd = block.avd_layer is not None
        self.pool_before = copy.deepcopy(block.avd_layer) if avd and block.avd_first else None
        self.pool_after = copy.deepcopy(block.avd_layer) if avd and not block.avd_first else None
        self.conv2_offset = copy.deepcopy(block.conv2_offset)
        if isinstance(block.conv2, SplitAttentionConv2d):
            self.conv2 = FusedSplitAttention(block.conv2)
            self.norm2 = None
        else:  # radix 0: plain grouped conv + norm + ReLU
            conv2, norm2 = fold_conv_norm(block.conv2, block.bn2)
            self.conv2 = conv2
            self.norm2 = norm2
        self.conv3, self.norm3 = fold_conv_norm(block.conv3, block.bn3)
        self.downsample = _fuse_downsample(block.downsample) if block.downsample is not None else None
        self.overwrite_input = False  # fuse_resnest: True where the input is a stage-internal tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = self.onednn_plan(x)
            if dtype is not None:
                return self.forward_onednn(x.to(dtype))
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        if self.pool_before is not None:
            out = self.pool_before(out)
        if self.conv2_offset is not None:
            out = self.conv2(out, self.conv2_offset(out))
        else:
            out = self.conv2(out)
        if self.norm2 is not None:
            out = F.relu(self.norm2(out), inplace=True)
        if self.pool_after is not None:
            out = self.pool_after(out)
        out = self.norm3(self.conv3(out))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return F.relu(out.add_(shortcut), inplace=True)

    @torch.jit.unused
    def onednn_plan(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype of forward_onednn for this call, or None for the plain ops."""
        if self.norm2 is None:  # split attention: FusedSplitAttention checks its conv's norm
            conv2_ok = onednn_conv(self.conv2.conv)
        else:  # radix 0: a plain grouped conv, its norm folded
            conv2_ok = isinstance(self.norm2, nn.Identity) and onednn_conv(self.conv2)
        if (self.conv2_offset is None and conv2_ok and isinstance(self.norm1, nn.Identity)
                and isinstance(self.norm3, nn.Identity) and onednn_conv(self.conv1) and onednn_conv(self.conv3)):
            return onednn_dtype(x)
        return None

    @torch.jit.unused
    def forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with conv1 + ReLU, conv2 + ReLU and conv3 + residual add + ReLU each one oneDNN call,
        and a radix-2 split attention's avd pool taken before the weighted sum (forward_pooled).
        The sum is written into the shortcut when that is a tensor of this block's own (the downsample's
        output) or, with `overwrite_input` (set by fuse_resnest for the blocks after the first of a stage,
        whose input is the previous block's output and used nowhere else), into the input itself."""
        out = _conv_relu(self.conv1, x)
        if self.pool_before is not None:
            out = self.pool_before(out)
        if self.pool_after is not None and self.norm2 is None and self.conv2.pools_before_sum(self.pool_after):
            out = self.conv2.forward_pooled(out, self.pool_after)
        else:
            out = _conv_relu(self.conv2, out) if self.norm2 is not None else self.conv2(out)
            if self.pool_after is not None:
                out = self.pool_after(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
            inplace = shortcut.data_ptr() != x.data_ptr()
        else:
            shortcut, inplace = x, self.overwrite_input
        if shortcut.dtype != x.dtype:  # e.g. a downsample that kept float32: a new tensor in x's dtype
            shortcut, inplace = shortcut.to(x.dtype), True
        if not (shortcut.is_contiguous() or shortcut.is_contiguous(memory_format=torch.channels_last)):
            shortcut, inplace = shortcut.contiguous(), True
        return _conv_add_relu(self.conv3, out, shortcut, inplace)


def _fold_sequence(layers) -> list:
    """Fold each (Conv2d, foldable norm) pair of a layer list; other layers are kept (copied)."""
    layers = list(layers)
    out = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Conv2d) and nxt is not None and norm_scale_shift(nxt) is not None:
            out.append(fold_conv_norm(layer, nxt)[0])
            i += 2
        else:
            out.append(copy.deepcopy(layer))
            i += 1
    return out


def _fuse_downsample(seq: nn.Module) -> nn.Module:
    """[AvgPool,] Conv, Norm -> [AvgPool,] Conv' (norm folded; kept when it cannot be)."""
    if not isinstance(seq, nn.Sequential):
        return copy.deepcopy(seq)
    return nn.Sequential(*[nn.Identity() if _identity_pool(m) else m for m in _fold_sequence(seq)])


def _identity_pool(m: nn.Module) -> bool:
    """An average pool that returns its input unchanged (kernel 1, stride 1, no padding: the avg_down
    shortcut's pool of a stride-1 stage)."""
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    return (type(m) is nn.AvgPool2d and pair(m.kernel_size) == (1, 1)
            and pair(m.stride or m.kernel_size) == (1, 1) and pair(m.padding) == (0, 0)
            and m.divisor_override is None)


def _fuse_stem(model: ResNeSt) -> None:
    """Fold the stem's norms: conv1 (a deep-stem Sequential or one 7x7 conv) and bn1; each conv followed by
    a ReLU becomes a FusedConvReLU (the stem's own ReLU then an nn.Identity)."""
    if isinstance(model.conv1, nn.Sequential):
        fused = _fold_sequence(model.conv1)
        if isinstance(fused[-1], nn.Conv2d) and norm_scale_shift(model.bn1) is not None:
            fused[-1], model.bn1 = fold_conv_norm(fused[-1], model.bn1)
        for i in range(len(fused) - 1):  # conv, ReLU -> FusedConvReLU, Identity (same indices, same keys)
            if type(fused[i]) is nn.Conv2d and type(fused[i + 1]) is nn.ReLU:
                fused[i], fused[i + 1] = FusedConvReLU.from_conv(fused[i]), nn.Identity()
        if type(fused[-1]) is nn.Conv2d and isinstance(model.bn1, nn.Identity) and type(model.relu) is nn.ReLU:
            fused[-1], model.relu = FusedConvReLU.from_conv(fused[-1]), nn.Identity()
        model.conv1 = nn.Sequential(*fused)
    elif isinstance(model.conv1, nn.Conv2d):
        model.conv1, model.bn1 = fold_conv_norm(model.conv1, model.bn1)
        if type(model.conv1) is nn.Conv2d and isinstance(model.bn1, nn.Identity) and type(model.relu) is nn.ReLU:
            model.conv1, model.relu = FusedConvReLU.from_conv(model.conv1), nn.Identity()


# ------------------------------------------------------------------------------------------- entry points
def fuse_resnest(model: ResNeSt, inplace: bool = False, channels_last: bool = False) -> ResNeSt:
    """The inference form of a ResNeSt trunk (or a subclass, e.g. the detectron2 ResNeStBackbone).

    Returns a converted copy (or `model` itself with inplace=True), in eval mode, with gradients off.
    Equal to `model.eval()` up to float rounding (about 1e-6 relative in fp32)."""
    if not isinstance(model, ResNeSt):
        raise TypeError(f"fuse_resnest expects a ResNeSt trunk, got {type(model).__name__} "
                        "(use fuse_model for a model that contains one)")
    if getattr(model, "is_fused", False):
        return model
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        _fuse_stem(model)
        for name in STAGE_MODULES:
            stage = [FusedBottleneck(block) if isinstance(block, Bottleneck) else block
                     for block in getattr(model, name)]
            for prev, block in zip(stage, stage[1:]):
                # Its input is the previous fused block's output, which nothing else reads: the residual
                # sum may overwrite it (the oneDNN path). A stage's first block never overwrites its input
                # (the previous stage's output, a feature the trunk returns).
                if isinstance(block, FusedBottleneck) and isinstance(prev, FusedBottleneck):
                    block.overwrite_input = True
            setattr(model, name, nn.Sequential(*stage))
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_fused = True
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def fuse_model(model: nn.Module, inplace: bool = False, channels_last: bool = False) -> nn.Module:
    """Fuse every ResNeSt trunk inside `model` (e.g. a detectron2 GeneralizedRCNN's backbone.bottom_up),
    and fold the norms of detectron2-style convs that carry one (`conv.norm`: FPN, box head) when they are
    BN / FrozenBN. Returns a converted copy (or `model` with inplace=True), in eval mode."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    if isinstance(model, ResNeSt):
        return fuse_resnest(model, inplace=True, channels_last=channels_last)
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, ResNeSt):
                fuse_resnest(module, inplace=True)
            elif (isinstance(module, nn.Conv2d) and isinstance(getattr(module, "norm", None), nn.Module)
                  and norm_scale_shift(module.norm) is not None):
                # detectron2.layers.Conv2d: forward = activation(norm(conv(x))); fold norm into the conv.
                folded, _ = fold_conv_norm(_plain_conv(module), module.norm)
                module.weight = folded.weight
                module.bias = folded.bias
                module.norm = None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


def deploy(model: nn.Module, channels_last: bool = True, compile: bool = False, inplace: bool = False,
           dtype: Optional[torch.dtype] = None, **compile_kwargs) -> nn.Module:
    """fuse_model + channels_last, optionally reduced precision (dtype) and torch.compile.

    dtype=torch.bfloat16 (or torch.float16, for GPUs): the model's forward runs under
    `torch.autocast(device, dtype)` (autocast_inference): convolutions and linear layers compute in that
    dtype, with fp32 inputs accepted as before; the folding itself is done in float64 and the weights stay
    float32 (autocast casts them per call; on CPU in bf16 the fused blocks and stem run oneDNN's fused
    convolutions on bf16 copies kept on the modules, see the module docstring). What stays float32: the
    radix softmax (core.rsoftmax computes it in fp32), the score / box predictors and mmdet's RoI extractor
    (FP32_HEADS), and what autocast keeps in fp32 or the model casts itself (detectron2 decodes boxes in
    fp32; torchvision's roi_align runs in fp32 under autocast). A trunk's features come out in `dtype`.
    Error against fp32: tests/test_bf16.py (per stage), tests/test_amp_d2.py and tests/test_amp_mm.py
    (detectors).

    compile=True uses inductor with `freezing` (weights become constants) unless `compile_kwargs` say
    otherwise; the compiled graph has the plain ops (onednn_dtype is None while compiling), which inductor
    turns into oneDNN convolutions and generated C++ kernels for the rest. Whether that beats the eager fast
    path is measured by tools/benchmark.py --compile (docs/benchmark.md). On CPU it needs a C++ compiler, the
    first call for each input shape compiles (40 s for ResNeSt-50 at 800x1216 on 2 threads, 2026-12-02), and
    a new input shape recompiles (pass dynamic=True to avoid that, usually slower).
    With dtype, the compiled model is called under autocast (not tested here).
    """
    if dtype is not None and dtype != torch.float32 and dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"deploy: dtype={dtype} is not supported; use None / torch.float32, or one of "
                         f"{[str(d) for d in AUTOCAST_DTYPES]} (autocast)")
    model = fuse_model(model, inplace=inplace, channels_last=channels_last)
    if compile:
        compile_kwargs.setdefault("options", {"freezing": True})
        model = torch.compile(model, **compile_kwargs)
    if dtype is not None and dtype != torch.float32:
        model = autocast_inference(model, dtype)
    return model


# ------------------------------------------------------------------------------------- reduced precision
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)

# The layers whose outputs become scores and box coordinates, kept in float32 by autocast_inference (their
# floating inputs are cast to fp32): class name (this class or a base) -> its submodules ("" = itself). They are
# small (a 1x1 conv / linear over the features), and fp32 scores keep their ranking for NMS and AP.
FP32_HEADS = {
    "FastRCNNOutputLayers": ("",),                         # detectron2: class scores and box deltas
    "StandardRPNHead": ("objectness_logits", "anchor_deltas"),
    "RetinaNetHead": ("cls_score", "bbox_pred"),
    "MaskRCNNConvUpsampleHead": ("predictor",),
    "BBoxHead": ("fc_cls", "fc_reg"),                      # mmdet (ConvFCBBoxHead, Shared2FC/4Conv1FC...)
    "RPNHead": ("rpn_cls", "rpn_reg"),
    "BaseRoIExtractor": ("",),                             # mmdet: mmcv's CPU RoIAlign has no bf16 kernel
}


class _AutocastHooks:
    """A forward pre-hook and forward hook pair running a module's forward under torch.autocast(device_type,
    dtype), or with autocast off and floating inputs (positional; tensors and lists / tuples of tensors) cast
    to float32 (dtype=torch.float32). Copies and pickles
    of the module carry it (rebuilt from device type and dtype)."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        self.device_type, self.dtype = device_type, dtype
        self._local = threading.local()

    def __reduce__(self):
        return type(self), (self.device_type, self.dtype)

    def enter(self, module, args):
        fp32 = self.dtype == torch.float32
        context = torch.autocast(self.device_type, enabled=not fp32, **({} if fp32 else {"dtype": self.dtype}))
        context.__enter__()
        self._local.__dict__.setdefault("stack", []).append(context)
        if fp32:
            return tuple(_to_fp32(a) for a in args)
        return None

    def exit(self, module, args, output):
        self._local.stack.pop().__exit__(None, None, None)


def _to_fp32(value):
    """Floating tensors (also in a list / tuple, e.g. feature levels) as float32; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _set_autocast_hooks(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    for table in (module._forward_pre_hooks, module._forward_hooks):  # an earlier setting (also a copy's)
        for key in [k for k, hook in table.items() if isinstance(getattr(hook, "__self__", None), _AutocastHooks)]:
            del table[key]
            module._forward_hooks_always_called.pop(key, None)
    hooks = _AutocastHooks(device_type, dtype)
    module.register_forward_pre_hook(hooks.enter)
    module.register_forward_hook(hooks.exit, always_call=True)


@contextlib.contextmanager
def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype,
                     keep_fp32: Optional[Sequence[str]] = None):
    """While open, calls of `module` (its forward only: not the backward, not an optimizer step) run under
    torch.autocast(device_type, dtype), with the submodules named in `keep_fp32` (default fp32_heads(module):
    the score / box predictors) in float32 (keep_fp32_heads), as autocast_inference does. The mixed-precision
    training step of d2.train.AutocastTrainer."""
    hooks = _AutocastHooks(device_type, dtype)
    handles = (module.register_forward_pre_hook(hooks.enter),
               module.register_forward_hook(hooks.exit, always_call=True))
    try:
        with keep_fp32_heads(module, device_type, keep_fp32):
            yield module
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def keep_fp32_heads(module: nn.Module, device_type: str, names: Optional[Sequence[str]] = None):
    """While open, the submodules of `module` named in `names` (default fp32_heads(module)) run with
    autocast off on float32 inputs, also when the caller has autocast on (mmengine's optim_context)."""
    handles = []
    for sub in _submodules(module, fp32_heads(module) if names is None else names, "keep_fp32_heads"):
        hooks = _AutocastHooks(device_type, torch.float32)
        handles += [sub.register_forward_pre_hook(hooks.enter),
                    sub.register_forward_hook(hooks.exit, always_call=True)]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()


def _submodules(model: nn.Module, names: Sequence[str], caller: str) -> List[nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"{caller}: keep_fp32 names {missing} are not submodules of {type(model).__name__}")
    return [modules[name] for name in names]


def fp32_heads(model: nn.Module) -> List[str]:
    """Names of the submodules of `model` that FP32_HEADS keeps in float32."""
    names = []
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            for attr in FP32_HEADS.get(cls.__name__, ()):
                if not attr:
                    names.append(name)
                elif isinstance(getattr(module, attr, None), nn.Module):
                    names.append(f"{name}.{attr}" if name else attr)
    return sorted(set(names))


def autocast_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16, device_type: Optional[str] = None,
                       keep_fp32: Optional[Sequence[str]] = None) -> nn.Module:
    """Make `model` (itself: same object, same class) run its forward under torch.autocast(device_type,
    dtype); device_type defaults to that of the model's first parameter. The submodules named in `keep_fp32`
    (default: fp32_heads(model), the score and box predictors) run with autocast off on fp32 inputs. Calling
    it again replaces the earlier setting; `model.autocast_dtype` tells the dtype. Meant for inference
    (deploy(dtype=...)); mixed-precision training goes through the frameworks' AMP (detectron2 SOLVER.AMP,
    mmengine AmpOptimWrapper), which keep backward and the optimizer step outside autocast."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_inference: dtype={dtype} is not one of {[str(d) for d in AUTOCAST_DTYPES]}")
    if device_type is None:
        first = next(iter(model.parameters()), None)
        device_type = first.device.type if first is not None else "cpu"
    heads = _submodules(model, fp32_heads(model) if keep_fp32 is None else list(keep_fp32), "autocast_inference")
    _set_autocast_hooks(model, device_type, dtype)
    for head in heads:
        _set_autocast_hooks(head, device_type, torch.float32)
    model.autocast_dtype = dtype
    return model
