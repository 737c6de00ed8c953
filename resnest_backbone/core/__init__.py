"""Framework-agnostic ResNeSt (imports torch only), each formula in one place:

    split_attention.py  SplitAttentionConv2d (the plain forward); attention_channels, rsoftmax
    radix.py            the radix reductions (sum / weighted sum of the splits) in each execution mode
    trunk.py            stem, Bottleneck, ResNeSt (official parameter names); group_width, stem_out_channels,
                        FREEZABLE_PARTS / ResNeSt.frozen_modules, output strides and dilation
    variants.py         the variant table (official, fast ablations, timm) and build_resnest
    norm.py             BN / SyncBN (also on CPU process groups) / FrozenBN / GN
    dropblock.py        DropBlock2D as in the paper, its schedule
    fuse.py             the inference fast path: folded norms, fused modules, fuse_model / deploy
    onednn.py           its oneDNN dispatch (fused convolutions on CPU)
    precision.py        the precision policy: autocast hooks, fp32 heads, the CPU's native bf16 / fp16
"""
from .dropblock import DropBlock2D, DropBlockScheduler, dropblock_gamma, expected_drop_fraction
from .norm import FrozenBatchNorm2d, SyncBatchNorm, make_norm
from .split_attention import SplitAttentionConv2d, attention_channels
from .trunk import OUTPUT_STRIDES, STAGE_NAMES, Bottleneck, ResNeSt, group_width, stem_out_channels
from .variants import ALIASES, VARIANTS, Variant, build_resnest, get_variant

__all__ = ["ALIASES", "Bottleneck", "DropBlock2D", "DropBlockScheduler", "FrozenBatchNorm2d",
           "OUTPUT_STRIDES", "ResNeSt", "STAGE_NAMES", "SplitAttentionConv2d", "SyncBatchNorm",
           "VARIANTS", "Variant", "attention_channels", "build_resnest", "dropblock_gamma", "expected_drop_fraction",
           "get_variant", "group_width", "make_norm", "stem_out_channels"]
