"""Framework-agnostic ResNeSt (imports torch only)."""
from .dropblock import DropBlock2D, DropBlockScheduler, dropblock_gamma, expected_drop_fraction
from .norm import FrozenBatchNorm2d, SyncBatchNorm, make_norm
from .split_attention import SplitAttentionConv2d, attention_channels
from .trunk import OUTPUT_STRIDES, STAGE_NAMES, Bottleneck, ResNeSt, group_width, stem_out_channels
from .variants import ALIASES, VARIANTS, Variant, build_resnest, get_variant

__all__ = ["ALIASES", "Bottleneck", "DropBlock2D", "DropBlockScheduler", "FrozenBatchNorm2d",
           "OUTPUT_STRIDES", "ResNeSt", "STAGE_NAMES", "SplitAttentionConv2d", "SyncBatchNorm",
           "VARIANTS", "Variant", "attention_channels", "build_resnest", "dropblock_gamma", "expected_drop_fraction",
           "get_variant", "group_width", "make_norm", "stem_out_channels"]
