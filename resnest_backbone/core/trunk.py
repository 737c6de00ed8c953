"""ResNeSt trunk: deep stem, split-attention bottlenecks, four stages (res2..res5).

Module names are the official checkpoint names (conv1.0, bn1, layer1.0.conv2.fc1, downsample.1, ...), so an
official or timm ResNeSt state_dict loads with strict=True and no renaming; each framework adapter holds this
trunk and only adds a prefix. The behaviour follows the official code (resnest==0.0.5) knob for knob,
including its quirks that checkpoints depend on (see comments).
"""
import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .deform import DeformConv2d, offset_conv
from .dropblock import dropblock_or_identity
from .norm import FrozenBatchNorm2d, NormSpec, make_norm
from .split_attention import SplitAttentionConv2d, attention_channels

STAGE_NAMES = ("res2", "res3", "res4", "res5")
STAGE_MODULES = ("layer1", "layer2", "layer3", "layer4")  # the stages' attribute (official key) names
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
STEM_STRIDE = 4  # the stem's conv (stride 2) and max pool (stride 2)
# What freeze(at) freezes, in order: at=1 the stem, at=k the stem and res2..res{k} (detectron2's FREEZE_AT,
# mmdet's frozen_stages + 1). Attribute names, so the frozen norms can be swapped in by name.
FREEZABLE_PARTS = (("conv1", "bn1"),) + tuple((name,) for name in STAGE_MODULES)
# The knobs a trunk's weights are for (output stride, norm type, DropBlock are not: an ImageNet trunk
# loads into a dilated or FrozenBN trunk unchanged). avd and avd_first cannot be seen in the tensors.
# Deformable stages are not recorded: their offset convs are visible in the weights (present or not, their
# shapes give modulation and groups), and an ImageNet trunk loads into a DCN trunk (offsets start at zero).
WEIGHT_ARCH_KEYS = ("layers", "stem_width", "radix", "cardinality", "bottleneck_width", "deep_stem", "avg_down",
                    "avd", "avd_first")
ARCH_METADATA_KEY = "resnest_arch"  # in state_dict._metadata[<trunk prefix>], saved with the tensors
# output stride -> (stride, dilation) per stage res2..res5, as the official `dilated` / `dilation` options.
OUTPUT_STRIDES = {
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
}


def group_width(planes: int, bottleneck_width: int, cardinality: int) -> int:
    """Channels of a bottleneck's 3x3 (split-attention) conv: `bottleneck_width` per cardinal group for
    planes=64, scaled with planes, times the cardinality (official formula, truncation included)."""
    return int(planes * (bottleneck_width / 64.0)) * cardinality


def stem_out_channels(deep_stem: bool, stem_width: int) -> int:
    """Output channels of the stem: 2 * stem_width for the deep stem, 64 for the 7x7 conv."""
    return stem_width * 2 if deep_stem else 64


class Bottleneck(nn.Module):
    """ResNeSt bottleneck: 1x1 reduce, 3x3 split-attention conv, 1x1 expand, (avg-pool) shortcut.

    avd ("average down"): the stride is moved out of the 3x3 conv into a 3x3 average pool, placed after
    the split-attention conv (avd_first=False, the paper models) or before it (avd_first=True, the `fast`
    ablation variants, cheaper since the conv then runs at the lower resolution).

    deform_groups > 0 (core/deform.py, the official detectron2 wrapper's DeformBottleneckBlock): the 3x3 conv
    is deformable and `conv2_offset` (zero-initialised) predicts its offsets (+ mask when deform_modulated)
    from the same input, with the same stride and dilation.

    grad_checkpoint: in training, when gradients are needed, keep only the block's input for the backward
    and recompute the block there (torch.utils.checkpoint, non-reentrant): see `_checkpointed`.
    """

    grad_checkpoint: bool

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, radix: int = 2, cardinality: int = 1,
                 bottleneck_width: int = 64, avd: bool = False, avd_first: bool = False,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d, dropblock_prob: float = 0.0,
                 last_gamma: bool = False, reduction_factor: int = 4, deform_groups: int = 0,
                 deform_modulated: bool = False):
        super().__init__()
        width = group_width(planes, bottleneck_width, cardinality)
        if width < 1:
            raise ValueError(f"bottleneck_width={bottleneck_width} gives an empty bottleneck")
        self.radix = radix
        self.avd = avd
        self.avd_first = avd_first
        self.stride = stride
        self.out_channels = planes * EXPANSION

        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.dropblock1 = dropblock_or_identity(dropblock_prob)
        self.relu = nn.ReLU(inplace=True)
        # With avd the 3x3 conv keeps stride 1 and an AvgPool2d(3, stride) does the downsampling. The
        # official code also adds the pool to the first block of a dilated (stride-1) stage: a 3x3 blur.
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if avd else None
        conv_stride = 1 if avd else stride
        self.conv2_offset = (offset_conv(width, conv_stride, dilation, deform_groups, deform_modulated)
                             if deform_groups > 0 else None)
        if radix >= 1:
            self.conv2 = SplitAttentionConv2d(
                width, width, 3, conv_stride, padding=dilation, dilation=dilation,
                cardinality=cardinality, radix=radix, reduction_factor=reduction_factor,
                norm_layer=norm_layer, dropblock_prob=dropblock_prob, deform_groups=deform_groups,
                deform_modulated=deform_modulated)
            self.bn2 = None
            self.dropblock2 = None
        else:  # radix 0: a plain grouped 3x3 conv (ResNeXt block)
            if deform_groups > 0:
                self.conv2 = DeformConv2d(width, width, 3, conv_stride, padding=dilation, dilation=dilation,
                                          groups=cardinality, deform_groups=deform_groups,
                                          modulated=deform_modulated)
            else:
                self.conv2 = nn.Conv2d(width, width, 3, conv_stride, padding=dilation,
                                       dilation=dilation, groups=cardinality, bias=False)
            self.bn2 = norm_layer(width)
            self.dropblock2 = dropblock_or_identity(dropblock_prob)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=False)
        self.bn3 = norm_layer(self.out_channels)
        self.dropblock3 = dropblock_or_identity(dropblock_prob)
        if last_gamma and getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)  # each block starts as identity: helps very deep nets train
        self.downsample = downsample
        self.grad_checkpoint = False  # set by ResNeSt.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles (and tracing records) the plain path only
            if self.grad_checkpoint and self._needs_checkpoint(x):
                return self._checkpointed(x)
        return self._forward(x)

    @torch.jit.unused
    def _needs_checkpoint(self, x: torch.Tensor) -> bool:
        """Training with gradients wanted (by the input or the block's parameters); not under tracing."""
        return (self.training and torch.is_grad_enabled() and not torch.jit.is_tracing()
                and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    @torch.jit.unused
    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        """The block under torch.utils.checkpoint (non-reentrant): its activations are freed after the
        forward and recomputed in the backward. Gradients equal the plain block's: the recomputation
        restores the random state first (preserve_rng_state), so DropBlock draws the same masks, and
        normalizes with the same batch statistics. It would also update BatchNorm running statistics (and
        num_batches_tracked) a second time: `_undo_buffer_updates` puts them back after it, so they are
        updated once per forward, as in the plain model."""
        if torch.compiler.is_compiling():  # compiled: buffer updates are applied once by the compiler
            return checkpoint(self._forward, x, use_reentrant=False, preserve_rng_state=True)
        return checkpoint(self._forward, x, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (contextlib.nullcontext(), _undo_buffer_updates(self)))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.dropblock1(self.bn1(self.conv1(x))))
        if self.avd_layer is not None and self.avd_first:
            out = self.avd_layer(out)
        if self.conv2_offset is not None:  # resolved when scripting: one branch is compiled
            out = self.conv2(out, self.conv2_offset(out))
        else:
            out = self.conv2(out)
        if self.bn2 is not None:
            out = self.relu(self.dropblock2(self.bn2(out)))
        if self.avd_layer is not None and not self.avd_first:
            out = self.avd_layer(out)
        out = self.dropblock3(self.bn3(self.conv3(out)))
        shortcut = self.downsample(x) if self.downsample is not None else x
        # In place, as the official code: no new (B, C, H, W) tensor per block (the norm output is not
        # needed by any backward).
        out += shortcut
        return self.relu(out)


@contextlib.contextmanager
def _undo_buffer_updates(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of `module` (BN running_mean / running_var / num_batches_tracked, ...) on exit to
    its value on entry: wrapped around a checkpoint's recomputation, which runs the forward a second time.
    Also when the recomputation stops early (torch stops it once the backward has what it needs)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def check_image_batch(x: torch.Tensor) -> None:
    """ValueError unless `x` is an (N, 3, H, W) batch. A leaf for torch.fx (wrapped below): symbolic tracing
    (e.g. int8 FX quantization) records the call instead of branching on a traced shape."""
    if x.dim() != 4 or x.size(1) != 3:
        if not torch.jit.is_scripting():
            raise ValueError(f"ResNeSt expects an (N, 3, H, W) image batch, got shape {tuple(x.shape)}")
        raise ValueError("ResNeSt expects an (N, 3, H, W) image batch")


torch.fx.wrap("check_image_batch")


class ResNeSt(nn.Module):
    """The ResNeSt trunk. `forward(x)` returns {"stem", "res2".."res5"} restricted to `out_features`.

    Every knob of the official `ResNet(...)` constructor, named the same where it can be:
      layers            blocks per stage (res2..res5)
      radix             splits per cardinal group (0: plain conv, 1: sigmoid gate, >=2: softmax)
      cardinality       cardinal groups (official `groups`)
      bottleneck_width  width per group for planes=64 (the "d" of NsKxWd)
      deep_stem, stem_width   three 3x3 convs (stem_width, stem_width, 2*stem_width) instead of one 7x7
      avg_down          shortcut: AvgPool then 1x1 conv, instead of a strided 1x1 conv
      avd, avd_first    see Bottleneck
      output_stride     32, 16 or 8 by dilating res5 (16) or res4+res5 (8), as the official code
      strides, dilations   per-stage override of output_stride (res2..res5)
      contract_dilation the first block of a dilated stage uses half the dilation (official behaviour)
      multi_grid        res5 per-block dilation multipliers (DeepLab), e.g. (1, 2, 4)
      norm              "BN", "SyncBN", "FrozenBN", "GN", or a callable channels -> module
      dropblock_prob    DropBlock in res4 and res5 (official placement)
      last_gamma        zero-init the last norm of each block
      deform_on_per_stage, deform_modulated, deform_num_groups
                        deformable 3x3 conv in split attention per stage res2..res5 (DCN v1, or DCNv2 when
                        modulated), offset groups: detectron2's MODEL.RESNETS.DEFORM_* (core/deform.py)
      num_classes       > 0 adds the classifier (`fc`), for ImageNet checkpoints and classification
      grad_checkpoint   gradient (activation) checkpointing per bottleneck in training: less memory, one
                        more forward of the blocks in the backward; same gradients and running statistics
                        (also `set_grad_checkpointing()`). Eval, no-grad, TorchScript and tracing run the
                        plain forward.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), radix: int = 2, cardinality: int = 1,
                 bottleneck_width: int = 64, deep_stem: bool = True, stem_width: int = 32,
                 avg_down: bool = True, avd: bool = True, avd_first: bool = False,
                 output_stride: int = 32, strides: Optional[Sequence[int]] = None,
                 dilations: Optional[Sequence[int]] = None, contract_dilation: bool = True,
                 multi_grid: Optional[Sequence[int]] = None, norm: NormSpec = "BN",
                 dropblock_prob: float = 0.0, last_gamma: bool = False, reduction_factor: int = 4,
                 out_features: Sequence[str] = STAGE_NAMES, num_classes: int = 0,
                 deform_on_per_stage: Sequence[bool] = (False, False, False, False),
                 deform_modulated: bool = False, deform_num_groups: int = 1, grad_checkpoint: bool = False):
        super().__init__()
        strides, dilations = _check_config(layers, radix, cardinality, bottleneck_width, stem_width,
                                           output_stride, strides, dilations, multi_grid, dropblock_prob,
                                           reduction_factor, out_features)
        deform_on_per_stage = _check_deform(deform_on_per_stage, deform_modulated, deform_num_groups,
                                            bottleneck_width, cardinality)
        norm_layer = make_norm(norm)
        if norm_layer is None:
            raise ValueError("norm must name a normalization layer for the trunk (got none)")
        self.arch = dict(layers=tuple(layers), radix=radix, cardinality=cardinality,
                         bottleneck_width=bottleneck_width, deep_stem=deep_stem, stem_width=stem_width,
                         avg_down=avg_down, avd=avd, avd_first=avd_first, strides=tuple(strides),
                         dilations=tuple(dilations), contract_dilation=contract_dilation,
                         multi_grid=tuple(multi_grid) if multi_grid else None,
                         deform_on_per_stage=deform_on_per_stage, deform_modulated=bool(deform_modulated),
                         deform_num_groups=deform_num_groups)

        # Stem. Official names: conv1 (a Sequential for the deep stem), bn1 for the last norm.
        stem_channels = stem_out_channels(deep_stem, stem_width)
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), norm_layer(stem_width), nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False), norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_channels, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        self._out_channels: Dict[str, int] = {"stem": stem_channels}
        self._out_strides: Dict[str, int] = {"stem": STEM_STRIDE}
        in_channels, total_stride = stem_channels, STEM_STRIDE
        for index, (blocks, planes, stride, dilation) in enumerate(zip(layers, STAGE_PLANES, strides,
                                                                       dilations)):
            is_last = index == len(layers) - 1
            stage = self._make_stage(
                in_channels, planes, blocks, stride, dilation, first_stage=index == 0,
                contract_dilation=contract_dilation,
                multi_grid=multi_grid if is_last else None, radix=radix, cardinality=cardinality,
                bottleneck_width=bottleneck_width, avg_down=avg_down, avd=avd, avd_first=avd_first,
                norm_layer=norm_layer, dropblock_prob=dropblock_prob if index >= 2 else 0.0,
                last_gamma=last_gamma, reduction_factor=reduction_factor,
                deform_groups=deform_num_groups if deform_on_per_stage[index] else 0,
                deform_modulated=bool(deform_modulated))
            self.add_module(STAGE_MODULES[index], stage)
            in_channels = planes * EXPANSION
            total_stride *= stride
            self._out_channels[STAGE_NAMES[index]] = in_channels
            self._out_strides[STAGE_NAMES[index]] = total_stride

        self.num_classes = num_classes
        if num_classes > 0:
            self.fc = nn.Linear(in_channels, num_classes)
        self.out_features: List[str] = list(out_features)
        self._init_weights()
        self._register_state_dict_hook(_record_weight_arch)
        self.grad_checkpoint = False
        self.set_grad_checkpointing(grad_checkpoint)

    @staticmethod
    def _make_stage(in_channels, planes, blocks, stride, dilation, first_stage, contract_dilation,
                    multi_grid, avg_down, norm_layer, **block_kwargs) -> nn.Sequential:
        downsample = None
        out_channels = planes * EXPANSION
        if stride != 1 or in_channels != out_channels:
            if avg_down:  # official: AvgPool (identity when stride 1) + 1x1 conv; key names downsample.1/.2
                downsample = nn.Sequential(
                    nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                    nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(out_channels))
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels))
        avd = block_kwargs.pop("avd")
        blocks_list = []
        for i in range(blocks):
            if multi_grid:
                block_dilation = dilation * multi_grid[i % len(multi_grid)]
            elif i == 0 and contract_dilation and dilation > 1:
                block_dilation = dilation // 2
            else:
                block_dilation = dilation
            # Official: avd in any strided block and in the first block of every stage but the first.
            first_block = i == 0
            blocks_list.append(Bottleneck(
                in_channels if first_block else out_channels, planes,
                stride=stride if first_block else 1, dilation=block_dilation,
                downsample=downsample if first_block else None,
                avd=avd and first_block and (stride > 1 or not first_stage),
                norm_layer=norm_layer, **block_kwargs))
        return nn.Sequential(*blocks_list)

    @torch.jit.unused
    def set_grad_checkpointing(self, enable: bool = True) -> "ResNeSt":
        """Turn gradient checkpointing of every bottleneck on or off (the `grad_checkpoint` knob)."""
        if not isinstance(enable, bool):
            raise ValueError(f"grad_checkpoint={enable!r} must be True or False")
        self.grad_checkpoint = enable
        for module in self.modules():
            if isinstance(module, Bottleneck):
                module.grad_checkpoint = enable
        return self

    def weight_arch(self) -> Dict[str, object]:
        """The architecture the trunk's weights are for (WEIGHT_ARCH_KEYS), as plain values."""
        return {k: list(self.arch[k]) if isinstance(self.arch[k], tuple) else self.arch[k]
                for k in WEIGHT_ARCH_KEYS}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        """Refuse a state_dict saved from a trunk of another architecture: every state_dict of a trunk
        records weight_arch() in its metadata (torch.save and mmengine keep it), because avd_first is
        invisible in the tensors and would otherwise load silently."""
        saved = local_metadata.get(ARCH_METADATA_KEY) if isinstance(local_metadata, dict) else None
        if isinstance(saved, dict):
            ours = self.weight_arch()
            different = arch_differences(saved, ours)
            if different:
                raise ValueError(
                    f"state_dict for {prefix or 'the trunk'!r} was saved from a ResNeSt with "
                    + ", ".join(f"{k}={saved[k]}" for k in different) + " but this model has "
                    + ", ".join(f"{k}={ours[k]}" for k in different) + "; nothing of the trunk was loaded. "
                    "Build the model with the checkpoint's architecture.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _init_weights(self) -> None:
        # Official init: He-normal (fan-out) convs. Norms keep their identity init, so a zeroed bn3
        # (last_gamma) stays zero; the official code re-fills it with ones afterwards, undoing last_gamma.
        # Deformable convs too; their offset convs (conv2_offset) stay zero: zero offsets at the start.
        offset_convs = {id(m.conv2_offset) for m in self.modules()
                        if isinstance(m, Bottleneck) and m.conv2_offset is not None}
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)) and id(m) not in offset_convs:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # ------------------------------------------------------------------------------------------------------
    def output_channels(self) -> Dict[str, int]:
        return {name: self._out_channels[name] for name in self.out_features}

    def output_strides(self) -> Dict[str, int]:
        return {name: self._out_strides[name] for name in self.out_features}

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_image_batch(x)
        if self.training and x.size(0) == 1 and not torch.jit.is_scripting():
            self._check_batch_statistics(x)
        outputs: Dict[str, torch.Tensor] = {}
        x = self.stem(x)
        if "stem" in self.out_features:
            outputs["stem"] = x
        # Unrolled over the four stages (TorchScript cannot iterate over a list of different modules).
        last = self._last_stage_needed()
        if last >= 0:
            x = self.layer1(x)
            if "res2" in self.out_features:
                outputs["res2"] = x
        if last >= 1:
            x = self.layer2(x)
            if "res3" in self.out_features:
                outputs["res3"] = x
        if last >= 2:
            x = self.layer3(x)
            if "res4" in self.out_features:
                outputs["res4"] = x
        if last >= 3:
            x = self.layer4(x)
            if "res5" in self.out_features:
                outputs["res5"] = x
        return outputs

    @torch.jit.unused
    def _check_batch_statistics(self, x: torch.Tensor) -> None:
        """Training BatchNorm needs more than one value per channel. With one image whose deepest
        computed map is 1x1 (e.g. a 32x32 image), torch fails inside a block with a bare "Expected more
        than 1 value per channel"; say why and what to change instead."""
        last = self._last_stage_needed()
        stride = self._out_strides[STAGE_NAMES[last]] if last >= 0 else STEM_STRIDE
        cells = -(-x.size(2) // stride) * -(-x.size(3) // stride)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return  # SyncBN may see the other processes' images; let it decide
        training_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                          for m in getattr(self, STAGE_MODULES[max(last, 0)]).modules())
        if cells <= 1 and training_bn:
            raise ValueError(
                f"a batch of one {x.size(2)}x{x.size(3)} image leaves a 1x1 map at stride {stride}, where "
                "BatchNorm in training mode has a single value per channel. Use larger images "
                "(e.g. INPUT.MIN_SIZE_TRAIN), a batch of at least 2, SyncBN across processes, or "
                "FrozenBN / GN for that stage.")

    def _last_stage_needed(self) -> int:
        last = -1
        for index, name in enumerate(["res2", "res3", "res4", "res5"]):
            if name in self.out_features:
                last = index
        return last

    def fuse(self, channels_last: bool = False) -> "ResNeSt":
        """Convert this trunk, in place, into its inference form (see core/fuse.py): norms folded into the
        convs, attention without per-split ops. Inference only: the folded statistics no longer update."""
        from .fuse import fuse_resnest

        return fuse_resnest(self, inplace=True, channels_last=channels_last)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-style logits (needs num_classes > 0)."""
        if self.num_classes <= 0:
            raise RuntimeError("this trunk was built without a classifier (num_classes=0)")
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))

    def freeze(self, at: int, frozen_bn: Callable[[nn.Module], nn.Module] = FrozenBatchNorm2d.convert):
        """Freeze the stem (at >= 1) and stages res2..res{at} (at >= 2): no gradients, frozen norms.

        Same meaning as detectron2's MODEL.BACKBONE.FREEZE_AT and mmdet's frozen_stages + 1.
        """
        if not 0 <= at <= 5:
            raise ValueError(f"freeze at={at} must be in 0..5 (0 nothing, 1 stem, 2..5 up to res2..res5)")
        for module in self.frozen_modules(at):
            for p in module.parameters():
                p.requires_grad_(False)
        # Replace norms with frozen copies (attribute swap, so state_dict keys stay the same).
        for name in _frozen_names(at):
            setattr(self, name, frozen_bn(getattr(self, name)))
        return self

    def frozen_modules(self, at: int) -> List[nn.Module]:
        """The modules freeze(at) freezes (FREEZABLE_PARTS[:at]): the stem's and res2..res{at}'s."""
        return [getattr(self, name) for name in _frozen_names(at)]


def _frozen_names(at: int) -> List[str]:
    return [name for part in FREEZABLE_PARTS[:at] for name in part]


def arch_differences(recorded: Dict[str, object], model: Dict[str, object],
                     keys: Sequence[str] = WEIGHT_ARCH_KEYS) -> List[str]:
    """The knobs in `keys` where a recorded architecture differs from a model's (lists and tuples alike):
    the one comparison behind every architecture check (here and in resnest_backbone.convert)."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return [k for k in keys if k in recorded and plain(recorded[k]) != plain(model[k])]


def _record_weight_arch(module: "ResNeSt", destination, prefix, local_metadata) -> None:
    # a state_dict hook: the trunk's architecture goes into the state_dict's per-module metadata
    local_metadata[ARCH_METADATA_KEY] = module.weight_arch()


def _check_deform(deform_on_per_stage, deform_modulated, deform_num_groups, bottleneck_width,
                  cardinality) -> Tuple[bool, ...]:
    """The deformable-conv knobs, checked (ValueError naming the value); returns the four stage flags."""
    import numbers

    def bad(msg):
        raise ValueError(f"ResNeSt config: {msg}")

    try:
        flags = tuple(deform_on_per_stage)
    except TypeError:
        flags = ()
    if isinstance(deform_on_per_stage, (str, bytes)) or len(flags) != 4 or \
            any(not isinstance(f, bool) for f in flags):
        bad(f"deform_on_per_stage={deform_on_per_stage!r} must be four booleans (res2..res5), "
            "e.g. (False, True, True, True)")
    if not isinstance(deform_modulated, bool):
        bad(f"deform_modulated={deform_modulated!r} must be True (DCNv2) or False (DCN v1)")
    if (not isinstance(deform_num_groups, numbers.Integral) or isinstance(deform_num_groups, bool)
            or deform_num_groups < 1):
        bad(f"deform_num_groups={deform_num_groups!r} must be an integer >= 1")
    for stage, planes, on in zip(STAGE_NAMES, STAGE_PLANES, flags):
        width = group_width(planes, bottleneck_width, cardinality)
        if on and width % deform_num_groups:
            bad(f"{stage}: bottleneck channels {width} are not divisible by deform_num_groups="
                f"{deform_num_groups}")
    return flags


def _check_config(layers, radix, cardinality, bottleneck_width, stem_width, output_stride, strides,
                  dilations, multi_grid, dropblock_prob, reduction_factor,
                  out_features) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Refuse, at build time, values that cannot work, naming the value and the reason (ValueError, also
    for wrong types such as None or 2.5 where an integer is needed)."""
    import numbers

    def bad(msg):
        raise ValueError(f"ResNeSt config: {msg}")

    def is_int(value) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def int_seq(value, n=None) -> bool:
        try:
            items = list(value)
        except TypeError:
            return False
        return (not isinstance(value, (str, bytes)) and all(is_int(v) for v in items)
                and (n is None or len(items) == n))

    if not int_seq(layers, 4) or any(n < 1 for n in layers):
        bad(f"layers={layers!r} must be four positive block counts (res2..res5)")
    if not is_int(radix) or radix < 0:
        bad(f"radix={radix!r} must be an integer >= 0 (0 plain conv, 1 sigmoid gate, >=2 softmax)")
    if not is_int(cardinality) or cardinality < 1:
        bad(f"cardinality={cardinality!r} must be an integer >= 1")
    if not is_int(bottleneck_width) or bottleneck_width < 1:
        bad(f"bottleneck_width={bottleneck_width!r} must be an integer >= 1")
    if not is_int(stem_width) or stem_width < 1:
        bad(f"stem_width={stem_width!r} must be an integer >= 1")
    if not is_int(reduction_factor) or reduction_factor < 1:
        bad(f"reduction_factor={reduction_factor!r} must be an integer >= 1")
    if (not isinstance(dropblock_prob, numbers.Real) or isinstance(dropblock_prob, bool)
            or not 0.0 <= dropblock_prob < 1.0):
        bad(f"dropblock_prob={dropblock_prob!r} must be a number in [0, 1)")
    if strides is None and dilations is None:
        if not is_int(output_stride) or output_stride not in OUTPUT_STRIDES:
            bad(f"output_stride={output_stride!r} must be one of {sorted(OUTPUT_STRIDES)}")
        strides, dilations = OUTPUT_STRIDES[output_stride]
    else:
        default_strides, default_dilations = OUTPUT_STRIDES[32]
        if strides is not None and (not int_seq(strides, 4) or any(s not in (1, 2) for s in strides)):
            bad(f"strides={strides!r} must be four values of 1 or 2 (res2..res5)")
        if dilations is not None and (not int_seq(dilations, 4) or any(d < 1 for d in dilations)):
            bad(f"dilations={dilations!r} must be four integers >= 1 (res2..res5)")
        strides = tuple(strides) if strides is not None else default_strides
        dilations = tuple(dilations) if dilations is not None else default_dilations
        total = STEM_STRIDE
        for s in strides:
            total *= s
        if output_stride != 32 and output_stride != total:
            bad(f"output_stride={output_stride!r} contradicts strides={strides} (output stride {total}); "
                "give one or the other")
    if multi_grid is not None and (not int_seq(multi_grid) or len(list(multi_grid)) == 0
                                   or any(g < 1 for g in multi_grid)):
        bad(f"multi_grid={multi_grid!r} must be a non-empty list of integers >= 1")
    for stage, planes in zip(STAGE_NAMES, STAGE_PLANES):
        width = group_width(planes, bottleneck_width, cardinality)
        if width < 1:
            bad(f"{stage}: bottleneck_width={bottleneck_width} gives no bottleneck channels")
        if radix >= 1 and width % (cardinality * radix):
            bad(f"{stage}: bottleneck channels {width} (planes {planes} x width {bottleneck_width}/64 "
                f"x cardinality {cardinality}) are not divisible by cardinality*radix={cardinality * radix}: "
                f"change radix={radix}, cardinality={cardinality} or bottleneck_width={bottleneck_width}")
        if radix >= 1:
            inter = attention_channels(width, radix, reduction_factor)
            if inter % cardinality:
                bad(f"{stage}: the split-attention width {inter} (max(channels {width} x radix {radix} "
                    f"// reduction_factor {reduction_factor}, 32)) is not divisible by "
                    f"cardinality={cardinality}")
    if isinstance(out_features, str):
        bad(f"out_features={out_features!r} must be a list of names, e.g. ['res4'] not 'res4'")
    unknown = [f for f in out_features if f not in ("stem",) + STAGE_NAMES]
    if unknown or not out_features:
        bad(f"out_features={list(out_features)} must be a non-empty subset of {['stem', *STAGE_NAMES]}")
    return tuple(strides), tuple(dilations)
