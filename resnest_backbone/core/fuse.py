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
  - the radix sum runs on views of the split conv's output (core/radix.py; radix 2: one torch.lerp,
    softmax_split_sum), and the residual add + ReLU run in place; DropBlock (a no-op in inference) is dropped;
  - channels_last is supported end to end (views only, no `.contiguous()`), which is what oneDNN / cuDNN
    convolutions prefer;
  - deformable blocks (core/deform.py) keep their offset conv; bn0 / bn2 fold into the deformable conv's
    weight and bias exactly as into a plain conv (it is linear in its weight);
  - on CPU, eager inference runs each block as three oneDNN fused-convolution calls (core/onednn.py), the
    residual sum written in place into the downsample's output or, for the blocks after the first of a
    stage, into the block's input (the previous block's output, which nothing else reads: a forward hook
    that keeps a block's output sees it overwritten);
  - deploy(dtype=...) adds the precision policy (core/precision.py).
The converted modules are inference only: folded statistics can no longer update (train() changes nothing).
The result stays a ResNeSt (same class, same `forward`, `output_shape()` for detectron2), and scripts,
traces and exports to ONNX like the original.
"""
import copy
import warnings
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .deform import DeformConv2d
from .onednn import FusedConvReLU, conv_add_relu, conv_relu, onednn_conv, onednn_dtype
from .precision import AUTOCAST_DTYPES, autocast_device, autocast_inference, cpu_flags, slower_than_fp32
from .radix import fused_split_sum, softmax_split_sum, split_sum
from .split_attention import SplitAttentionConv2d, rsoftmax
from .trunk import STAGE_MODULES, Bottleneck, ResNeSt

__all__ = ["FusedBottleneck", "FusedSplitAttention", "deploy", "fold_conv_norm", "fuse_model", "fuse_resnest",
           "norm_scale_shift"]


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


# ------------------------------------------------------------------------------------ fused modules
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
            return fused_split_sum(x, rsoftmax(attention, self.radix, 1), self.radix)
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
        return None if dtype is None else conv_relu(self.conv, x.to(dtype))


def _radix_major_fc2(fc2: nn.Conv2d, cardinality: int, radix: int) -> nn.Conv2d:
    """fc2 is grouped by cardinality and its output is cardinality-major (k, r, c). Return the same map as
    one dense 1x1 conv (block-diagonal weight) whose output rows are radix-major (r, k, c), the layout of
    the split conv, so rSoftMax becomes a softmax over a plain (B, radix, channels) view. (Rows of a grouped
    conv cannot be permuted across groups; the dense form costs a few kMACs on a 1x1 input.)"""
    rows, per_group_in = fc2.out_channels, fc2.in_channels // cardinality
    rows_per_group = rows // cardinality
    weight = fc2.weight.detach()
    dense = weight.new_zeros(rows, fc2.in_channels, 1, 1)  # on the weight's device, in its dtype
    for k in range(cardinality):
        dense[k * rows_per_group:(k + 1) * rows_per_group, k * per_group_in:(k + 1) * per_group_in] = \
            weight[k * rows_per_group:(k + 1) * rows_per_group]
    order = torch.arange(rows, device=weight.device).view(cardinality, radix, -1).transpose(0, 1).reshape(-1)
    out = nn.Conv2d(fc2.in_channels, rows, 1, bias=fc2.bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(dense[order], requires_grad=False)
    if fc2.bias is not None:
        out.bias = nn.Parameter(fc2.bias.detach()[order], requires_grad=False)
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
        out = conv_relu(self.conv1, x)
        if self.pool_before is not None:
            out = self.pool_before(out)
        if self.pool_after is not None and self.norm2 is None and self.conv2.pools_before_sum(self.pool_after):
            out = self.conv2.forward_pooled(out, self.pool_after)
        else:
            out = conv_relu(self.conv2, out) if self.norm2 is not None else self.conv2(out)
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
        return conv_add_relu(self.conv3, out, shortcut, inplace)


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
    BN / FrozenBN. Returns a converted copy (or `model` with inplace=True), in eval mode. A model without a
    ResNeSt trunk is refused: there would be nothing of ours to fuse."""
    if not any(isinstance(m, ResNeSt) for m in model.modules()):
        raise ValueError(f"fuse_model / deploy: {type(model).__name__} contains no ResNeSt trunk, so there is "
                         "nothing to fuse. Give it a ResNeSt backbone (resnest_backbone.core.build_resnest, or "
                         "the detectron2 / mmdet adapters), or fold another model's BatchNorms with "
                         "torch.fx.experimental.optimization.fuse(model)")
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
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
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
    (precision.FP32_HEADS), and what autocast keeps in fp32 or the model casts itself (detectron2 decodes boxes in
    fp32; torchvision's roi_align runs in fp32 under autocast). A trunk's features come out in `dtype`.
    Error against fp32: tests/test_bf16.py (per stage), tests/test_amp_d2.py and tests/test_amp_mm.py
    (detectors).

    compile=True uses inductor with `freezing` (weights become constants) unless `compile_kwargs` say
    otherwise; the compiled graph has the plain ops (onednn_dtype is None while compiling), which inductor
    turns into oneDNN convolutions and generated C++ kernels for the rest. Whether that beats the eager fast
    path is measured by tools/benchmark.py --compile (docs/benchmark.md). On CPU it needs a C++ compiler, the
    first call for each input shape compiles (tens of seconds for ResNeSt-50 at detection size), and
    a new input shape recompiles (pass dynamic=True to avoid that, usually slower).
    With dtype, the compiled model is called under autocast (not tested here). A model on a CPU where `dtype`
    is slower than float32 (without native bf16 / fp16 instructions: precision.slower_than_fp32) gets a
    warning.
    """
    if dtype is not None and dtype != torch.float32 and dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"deploy: dtype={dtype} is not supported; use None / torch.float32, or one of "
                         f"{[str(d) for d in AUTOCAST_DTYPES]} (autocast)")
    slower = slower_than_fp32(dtype, cpu_flags()) if autocast_device(model) == "cpu" else None
    if slower:
        warnings.warn(f"deploy: {slower}")  # from here: once per process (the default filter)
    model = fuse_model(model, inplace=inplace, channels_last=channels_last)
    if compile:
        compile_kwargs.setdefault("options", {"freezing": True})
        model = torch.compile(model, **compile_kwargs)
    if dtype is not None and dtype != torch.float32:
        model = autocast_inference(model, dtype)
    return model
