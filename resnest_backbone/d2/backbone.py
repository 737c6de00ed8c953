"""detectron2 backbones built from the ResNeSt core, registered in BACKBONE_REGISTRY:

    build_resnest_backbone               the trunk (res2..res5, MODEL.RESNETS.OUT_FEATURES)
    build_resnest_fpn_backbone           + FPN with LastLevelMaxPool (Faster / Mask / Cascade R-CNN)
    build_resnest_retinanet_fpn_backbone + FPN with P6/P7 from res5 (RetinaNet)

State-dict keys are the official ResNeSt names under the backbone's prefix (for an FPN model
`backbone.bottom_up.layer1.0.conv2.fc1.weight`), so converted ImageNet checkpoints load by name.
"""
from typing import Dict, Optional

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from ..core import ResNeSt, SyncBatchNorm, get_variant
from .config import add_resnest_config

_ARCH_KEYS = {"LAYERS": "layers", "RADIX": "radix", "CARDINALITY": "cardinality",
              "BOTTLENECK_WIDTH": "bottleneck_width", "STEM_WIDTH": "stem_width", "DEEP_STEM": "deep_stem",
              "AVG_DOWN": "avg_down", "AVD": "avd", "AVD_FIRST": "avd_first"}
_SEQUENCE_ARGS = ("layers", "strides", "dilations", "multi_grid", "out_features", "deform_on_per_stage")


def d2_norm(norm, key: str = "ResNeStBackbone(norm=...)"):
    """A norm factory from a detectron2 norm name (`key`: where the name came from, for the error). "SyncBN"
    uses the core's SyncBatchNorm, which runs in a single process (as BN, with a warning) and on CPU process
    groups, where torch's SyncBatchNorm fails."""
    if norm == "SyncBN":
        return SyncBatchNorm
    if isinstance(norm, str) and norm == "":
        raise ValueError("ResNeSt needs a norm: set MODEL.RESNETS.NORM or MODEL.RESNEST.NORM "
                         "(LazyConfig: ResNeStBackbone's norm) to BN, SyncBN, FrozenBN, GN, ...")
    try:
        get_norm(norm, 32)  # fail now for an unknown name (detectron2 raises a bare KeyError)
    except KeyError:
        raise ValueError(f"{key} is {norm!r}, which detectron2's get_norm does not know: use BN, SyncBN, "
                         "FrozenBN, GN, naiveSyncBN or nnSyncBN") from None
    return lambda channels: get_norm(norm, channels)


class ResNeStBackbone(ResNeSt, Backbone):
    """The core trunk as a detectron2 Backbone (same modules, hence official key names).

    Buildable from plain values, so it works in LazyConfig (`L(ResNeStBackbone)(...)`) and survives
    LazyConfig.save / load:

        ResNeStBackbone(variant="resnest50", norm="SyncBN", freeze_at=2, out_features=["res2", ..., "res5"])

    Args:
        variant: a row of the variant table (resnest50, resnest101, ...); its knobs are the defaults and any
            core.ResNeSt keyword given here (radix, stem_width, layers, ...) overrides them. None: the core's
            defaults (a ResNeSt-50 layout) and the given keywords only.
        norm: a detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN", ...: detectron2's meaning, "SyncBN"
            being the core's SyncBatchNorm, which also runs in one process and on CPU process groups) or a
            callable channels -> module.
        freeze_at: detectron2's MODEL.BACKBONE.FREEZE_AT: 0 nothing, 1 the stem, k the stem and res2..res{k}
            (no gradients, FrozenBatchNorm2d).
        **kwargs: the other core.ResNeSt knobs (out_features, output_stride, dropblock_prob, last_gamma,
            grad_checkpoint, ...); sequences may be lists or OmegaConf ListConfigs.
    """

    def __init__(self, variant: Optional[str] = None, *, norm="BN", freeze_at: int = 0, **kwargs):
        for key in _SEQUENCE_ARGS:  # ListConfig (from instantiate) -> tuple, so the core sees plain values
            value = kwargs.get(key)
            if value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
                kwargs[key] = tuple(value)
        arch = get_variant(variant).arch() if variant is not None else {}
        super().__init__(**{**arch, **kwargs}, norm=d2_norm(norm) if isinstance(norm, str) else norm)
        self.freeze(freeze_at)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        channels, strides = self.output_channels(), self.output_strides()
        return {name: ShapeSpec(channels=channels[name], stride=strides[name]) for name in self.out_features}

    def freeze(self, at: int = 0):
        """detectron2 semantics of MODEL.BACKBONE.FREEZE_AT: 1 = stem, 2 = stem + res2, ..."""
        return super().freeze(at, frozen_bn=FrozenBatchNorm2d.convert_frozen_batchnorm)


def resnest_kwargs_from_cfg(cfg) -> dict:
    """core.ResNeSt keyword arguments for a detectron2 config (variant row + overrides)."""
    rc = cfg.MODEL.get("RESNEST")
    if rc is None:  # add_resnest_config was not called: use its defaults
        from detectron2.config import get_cfg

        defaults = get_cfg()
        add_resnest_config(defaults)
        rc = defaults.MODEL.RESNEST
    kwargs = get_variant(rc.VARIANT).arch()
    for key, arg in _ARCH_KEYS.items():
        if rc[key] is not None:
            kwargs[arg] = tuple(rc[key]) if key == "LAYERS" else rc[key]
    kwargs.update(
        norm=d2_norm(rc.NORM or cfg.MODEL.RESNETS.NORM, "MODEL.RESNEST.NORM" if rc.NORM else "MODEL.RESNETS.NORM"),
        output_stride=rc.OUTPUT_STRIDE,
        multi_grid=tuple(rc.RES5_MULTI_GRID) if rc.RES5_MULTI_GRID else None,
        dropblock_prob=rc.DROPBLOCK_PROB,
        last_gamma=rc.LAST_GAMMA,
        grad_checkpoint=bool(rc.get("GRAD_CHECKPOINT", False)),
        out_features=tuple(cfg.MODEL.RESNETS.OUT_FEATURES),
        # detectron2's own deformable-conv keys, as the official ResNeSt wrapper reads them
        deform_on_per_stage=tuple(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE),
        deform_modulated=cfg.MODEL.RESNETS.DEFORM_MODULATED,
        deform_num_groups=cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS,
    )
    return kwargs


@BACKBONE_REGISTRY.register()
def build_resnest_backbone(cfg, input_shape: ShapeSpec) -> ResNeStBackbone:
    if input_shape.channels != 3:
        raise ValueError(f"ResNeSt takes 3-channel images; the input shape has {input_shape.channels} "
                         "channels (check INPUT.FORMAT / MODEL.PIXEL_MEAN)")
    return ResNeStBackbone(**resnest_kwargs_from_cfg(cfg), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def _fpn(cfg, bottom_up, top_block) -> FPN:
    norm = cfg.MODEL.FPN.NORM
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
               norm=SyncBatchNorm if norm == "SyncBN" else norm,
               top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_resnest_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    return _fpn(cfg, build_resnest_backbone(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_resnest_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    bottom_up = build_resnest_backbone(cfg, input_shape)
    if "res5" not in bottom_up.output_shape():
        raise ValueError("the RetinaNet FPN builds P6/P7 from res5: add res5 to MODEL.RESNETS.OUT_FEATURES")
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return _fpn(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
