"""DeepLabV3 / DeepLabV3+ on ResNeSt, with detectron2's DeepLab project (`detectron2.projects.deeplab`).

    build_resnest_deeplab_backbone   the dilated trunk: MODEL.RESNEST.OUTPUT_STRIDE 8 or 16,
                                     MODEL.RESNEST.RES5_MULTI_GRID (e.g. [1, 2, 4]) for res5
    DeepLabV3AuxHead                 detectron2's DeepLabV3Head as PyTorch-Encoding trains it: ASPP image
                                     pooling over the whole feature map (any test size), plus an auxiliary
                                     FCN head (MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE, loss weight 0.2) in training

The project's DeepLabV3PlusHead works with the same backbone (MODEL.RESNETS.OUT_FEATURES ["res2", "res5"]).
Call add_resnest_deeplab_config(cfg) before merging a DeepLab config.
"""
from typing import Dict, Optional

from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY

try:  # shipped with the detectron2 wheel / this project's build; a source checkout may lack it
    from detectron2.projects.deeplab import DeepLabV3Head, add_deeplab_config
except ImportError as _exc:  # the backbone still registers; the DeepLab head and config keys do not
    DeepLabV3Head, add_deeplab_config, _DEEPLAB_IMPORT_ERROR = None, None, _exc
else:
    _DEEPLAB_IMPORT_ERROR = None

from .backbone import ResNeStBackbone, resnest_kwargs_from_cfg
from .config import add_resnest_config

# detectron2's DeepLab ResNet says the output stride with MODEL.RESNETS.RES4_DILATION / RES5_DILATION.
_DILATIONS_TO_STRIDE = {(1, 1): 32, (1, 2): 16, (2, 4): 8}


# The keys add_deeplab_config (detectron2 v0.6 and main) and add_resnest_deeplab_config add, by prefix.
_DEEPLAB_KEYS = ("INPUT.CROP.SINGLE_CATEGORY_MAX_AREA", "SOLVER.POLY_LR_", "MODEL.SEM_SEG_HEAD.LOSS_TYPE",
                 "MODEL.SEM_SEG_HEAD.PROJECT_", "MODEL.SEM_SEG_HEAD.ASPP_", "MODEL.SEM_SEG_HEAD.AUX_",
                 "MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV", "MODEL.RESNETS.RES4_DILATION",
                 "MODEL.RESNETS.RES5_MULTI_GRID", "MODEL.RESNETS.STEM_TYPE")


def deeplab_key_error(exc: KeyError, source: str) -> Optional[ImportError]:
    """For detectron2's KeyError "Non-existent config key: KEY" while merging `source`: when KEY is a DeepLab
    key and detectron2's DeepLab project did not import, the ImportError that says so (with that import's
    error); otherwise None."""
    message = str(exc.args[0]) if exc.args else ""
    if _DEEPLAB_IMPORT_ERROR is None or not message.rsplit(" ", 1)[-1].startswith(_DEEPLAB_KEYS):
        return None
    return ImportError(f"{source}: {message}: a DeepLab key, and detectron2's DeepLab project, which defines it, "
                       f"did not import: {_DEEPLAB_IMPORT_ERROR}")


def add_resnest_deeplab_config(cfg) -> None:
    """MODEL.RESNEST.* + detectron2's DeepLab keys + the auxiliary-head keys (idempotent)."""
    add_resnest_config(cfg)
    if add_deeplab_config is None:
        raise ImportError(f"detectron2.projects.deeplab is not importable ({_DEEPLAB_IMPORT_ERROR}); install "
                          "detectron2 with its projects (see README) to train DeepLab")
    if "POLY_LR_POWER" not in cfg.SOLVER:
        add_deeplab_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    if "AUX_IN_FEATURE" not in head:
        head.AUX_IN_FEATURE = ""  # "" = no auxiliary head; PyTorch-Encoding: "res4"
        head.AUX_LOSS_WEIGHT = 0.2


class ResNeStDeepLabBackbone(ResNeStBackbone):
    """The dilated trunk. Pads inputs to a multiple of its output stride, so features x stride = input."""

    @property
    def size_divisibility(self) -> int:
        return max(self.output_strides().values())


@BACKBONE_REGISTRY.register()
def build_resnest_deeplab_backbone(cfg, input_shape: ShapeSpec) -> ResNeStDeepLabBackbone:
    if input_shape.channels != 3:
        raise ValueError(f"ResNeSt takes 3-channel images; the input shape has {input_shape.channels} channels")
    kwargs = resnest_kwargs_from_cfg(cfg)
    output_stride = kwargs["output_stride"]
    if output_stride not in (8, 16):
        raise ValueError(f"build_resnest_deeplab_backbone: MODEL.RESNEST.OUTPUT_STRIDE={output_stride}; DeepLab "
                         "uses 8 (res4 and res5 dilated) or 16 (res5 dilated)")
    resnets = cfg.MODEL.RESNETS
    implied = _DILATIONS_TO_STRIDE.get((resnets.get("RES4_DILATION", 1), resnets.RES5_DILATION))
    if implied != 32 and implied != output_stride:
        raise ValueError(
            f"MODEL.RESNETS.RES4_DILATION/RES5_DILATION ({resnets.get('RES4_DILATION', 1)}, "
            f"{resnets.RES5_DILATION}) ask for output stride {implied} but MODEL.RESNEST.OUTPUT_STRIDE is "
            f"{output_stride}: ResNeSt takes the stride from MODEL.RESNEST.OUTPUT_STRIDE (leave the RESNETS "
            "dilations at 1)")
    backbone = ResNeStDeepLabBackbone(**kwargs)
    return backbone.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


if DeepLabV3Head is not None:
    @SEM_SEG_HEADS_REGISTRY.register()
    class DeepLabV3AuxHead(DeepLabV3Head):
        """DeepLabV3 (ASPP) head with PyTorch-Encoding's two differences from detectron2's DeepLabV3Head:

        - the ASPP image-pooling branch averages the whole feature map (detectron2 pools with a kernel of the
          training crop size, which fails on test images whose size is not a multiple of it, e.g. ADE20K's);
        - an auxiliary FCN head (3x3 conv to in/4 channels, norm, ReLU, dropout 0.1, 1x1 conv) on
          MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE (e.g. res4), trained with weight AUX_LOSS_WEIGHT and unused at test.
        """

        def __init__(self, cfg, input_shape: Dict[str, ShapeSpec]):
            head_cfg = cfg.clone()
            head_cfg.defrost()
            head_cfg.INPUT.CROP.ENABLED = False  # -> ASPP pool_kernel_size None: global image pooling
            super().__init__(head_cfg, input_shape)
            c = cfg.MODEL.SEM_SEG_HEAD
            stride = input_shape[self.in_features[0]].stride
            if stride != self.common_stride:
                raise ValueError(f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE={self.common_stride} but "
                                 f"{self.in_features[0]} has stride {stride}: set them equal (the output stride)")
            self.aux_in_feature = c.get("AUX_IN_FEATURE", "")
            self.aux_loss_weight = c.get("AUX_LOSS_WEIGHT", 0.2)
            self.aux_head = None
            if self.aux_in_feature:
                if self.aux_in_feature not in input_shape:
                    raise ValueError(f"MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE={self.aux_in_feature!r} is not a backbone "
                                     f"output ({sorted(input_shape)}): add it to MODEL.RESNETS.OUT_FEATURES")
                in_channels = input_shape[self.aux_in_feature].channels
                mid = in_channels // 4
                self.aux_head = nn.Sequential(
                    Conv2d(in_channels, mid, 3, padding=1, bias=not c.NORM, norm=get_norm(c.NORM, mid),
                           activation=F.relu),
                    nn.Dropout(0.1),
                    Conv2d(mid, c.NUM_CLASSES, 1))
                nn.init.kaiming_normal_(self.aux_head[0].weight, mode="fan_out", nonlinearity="relu")
                nn.init.normal_(self.aux_head[2].weight, 0, 0.001)
                nn.init.constant_(self.aux_head[2].bias, 0)

        def forward(self, features, targets=None):
            out, losses = super().forward(features, targets)
            if self.training and self.aux_head is not None:
                aux = self.aux_head(features[self.aux_in_feature])
                aux = F.interpolate(aux, size=targets.shape[-2:], mode="bilinear", align_corners=False)
                losses["loss_sem_seg_aux"] = self.aux_loss_weight * F.cross_entropy(
                    aux, targets, reduction="mean", ignore_index=self.ignore_value)
            return out, losses
