"""torchvision builders for ResNeSt, mirroring `resnet_fpn_backbone`, `fasterrcnn_resnet50_fpn` and
`deeplabv3_resnet50`: the same arguments, defaults, freezing rule, output names and model classes; the backbone
is the core trunk (official key names) and its weights go through resnest_backbone.convert.load_weights."""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _validate_trainable_layers
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetRegressionHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from ..convert import load_weights
from ..core import ResNeSt, get_variant
from ..core.precision import register_fp32_heads
from ..core.trunk import STAGE_MODULES, STAGE_NAMES

# The layers of torchvision's detectors whose outputs become scores and box coordinates run in float32 under
# bf16 autocast (deploy(model, dtype=torch.bfloat16)), so boxes are decoded and ranked in float32, as for the
# detectron2 and mmdet heads. Registered by class: mmdet has an `RPNHead` too.
register_fp32_heads({RPNHead: ("cls_logits", "bbox_pred"), FastRCNNPredictor: ("",), MaskRCNNPredictor: ("mask_fcn_logits",),
                     RetinaNetClassificationHead: ("cls_logits",), RetinaNetRegressionHead: ("bbox_reg",)})


class ResNeStBody(ResNeSt):
    """The core trunk of `variant` returning what torchvision's IntermediateLayerGetter returns: `return_layers`
    maps stage modules ("layer1".."layer4", the official names and torchvision's) to output names, in stage order,
    e.g. {"layer3": "aux", "layer4": "out"}. It is the trunk itself, not a getter over its children, so it keeps
    the trunk's input checks, its architecture record in state dicts and its fast path (core.fuse.deploy).
    **kwargs: core.ResNeSt knobs over the variant's (norm, output_stride, dropblock_prob, grad_checkpoint, ...)."""

    def __init__(self, variant: str, return_layers: Dict[str, str], **kwargs):
        unknown = sorted(set(return_layers) - set(STAGE_MODULES))
        if unknown or not return_layers:
            raise ValueError(f"return_layers={return_layers!r}: {unknown or 'none'} are not stages of ResNeSt; "
                             f"use some of {list(STAGE_MODULES)}")
        names = {stage: return_layers[module] for module, stage in zip(STAGE_MODULES, STAGE_NAMES)
                 if module in return_layers}
        super().__init__(**{**get_variant(variant).arch(), **kwargs}, out_features=list(names))
        self.output_names = names  # stage ("res2".."res5") -> output name, in stage order

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = super().forward(x)
        return OrderedDict((name, features[stage]) for stage, name in self.output_names.items())


def resnest_fpn_backbone(*, backbone_name: str, weights: Optional[str],
                         norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d, trainable_layers: int = 3,
                         returned_layers: Optional[List[int]] = None, extra_blocks: Optional[ExtraFPNBlock] = None,
                         out_channels: int = 256, **kwargs) -> BackboneWithFPN:
    """torchvision's `resnet_fpn_backbone` for a ResNeSt: a BackboneWithFPN whose outputs are named "0", "1", ...
    (one per returned layer) and "pool" (LastLevelMaxPool), for torchvision's FasterRCNN, MaskRCNN, RetinaNet
    (returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256), as retinanet_resnet50_fpn), ...

    Args:
        backbone_name: a ResNeSt variant (resnest50, resnest101, ...; core/variants.py).
        weights: None, a variant name (its published ImageNet weights, downloaded once and hash-checked) or a
            checkpoint file in any naming convert/ reads. Loaded strictly into the trunk before freezing: weights
            of another architecture are refused. FrozenBatchNorm2d takes the file's BN statistics.
        norm_layer: the trunk's norm (torchvision's default: its FrozenBatchNorm2d).
        trainable_layers: 0..5 as torchvision counts: the last k of layer4, layer3, layer2, layer1, stem (conv1,
            bn1) keep requires_grad; the others do not. Norms are whatever norm_layer is, as in torchvision.
        returned_layers: the stages (1..4) fed to the FPN (default all).
        extra_blocks: the FPN's extra block (default LastLevelMaxPool).
        out_channels: the FPN's channels (torchvision: 256).
        **kwargs: other core.ResNeSt knobs (output_stride, dropblock_prob, grad_checkpoint, ...).
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"Trainable layers should be in the range [0,5], got {trainable_layers}")
    returned_layers = [1, 2, 3, 4] if returned_layers is None else list(returned_layers)
    if not returned_layers or min(returned_layers) <= 0 or max(returned_layers) >= 5:
        raise ValueError(f"Each returned layer should be in the range [1,4]. Got {returned_layers}")
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}  # torchvision's names
    body = ResNeStBody(backbone_name, return_layers, norm=norm_layer, **kwargs)
    if weights is not None:
        load_weights(body, weights)
    for module in body.frozen_modules(5 - trainable_layers):  # the stem, then layer1..: torchvision's order
        module.requires_grad_(False)
    backbone = BackboneWithFPN(body, return_layers, list(body.output_channels().values()), out_channels,
                               extra_blocks)
    backbone.body = body  # the trunk itself, not the IntermediateLayerGetter over its children (ResNeStBody)
    return backbone


def fasterrcnn_resnest_fpn(variant: str = "resnest50", *, weights: None = None, num_classes: Optional[int] = None,
                           weights_backbone: Optional[str] = None, trainable_backbone_layers: Optional[int] = None,
                           **kwargs) -> FasterRCNN:
    """torchvision's `fasterrcnn_resnet50_fpn` with a ResNeSt FPN backbone. As there: with weights_backbone the
    trunk has FrozenBatchNorm2d and trainable_backbone_layers (default 3) trainable layers; without, BatchNorm2d
    and all five trainable (torchvision warns when trainable_backbone_layers is then given). num_classes
    defaults to 91 (COCO); **kwargs go to FasterRCNN (min_size, box_score_thresh, ...). Its default transform
    normalises RGB images in [0, 1] with the ImageNet mean and std: the input ResNeSt weights expect.
    weights_backbone: None (the default, unlike torchvision: nothing is downloaded unless asked), a variant
    name or a file (see resnest_fpn_backbone). `weights` (detector weights) must stay None: none are published.
    """
    _no_model_weights(weights)
    is_trained = weights_backbone is not None
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    backbone = resnest_fpn_backbone(backbone_name=variant, weights=weights_backbone,
                                    norm_layer=FrozenBatchNorm2d if is_trained else nn.BatchNorm2d,
                                    trainable_layers=trainable_backbone_layers)
    return FasterRCNN(backbone, num_classes=91 if num_classes is None else num_classes, **kwargs)


def deeplabv3_resnest(variant: str = "resnest50", *, weights: None = None, num_classes: Optional[int] = None,
                      aux_loss: Optional[bool] = None, weights_backbone: Optional[str] = None,
                      **kwargs) -> DeepLabV3:
    """torchvision's `deeplabv3_resnet50` with a ResNeSt trunk: output stride 8 (layer3 and layer4 dilated as
    torchvision's replace_stride_with_dilation=[False, True, True]: first block of each at half the dilation),
    BatchNorm2d, all layers trainable, DeepLabHead on layer4 ("out") and with aux_loss an FCNHead on layer3
    ("aux"). num_classes defaults to 21 (VOC). Inputs: RGB in [0, 1] normalised with the ImageNet mean and std,
    as for torchvision's. weights_backbone: None, a variant name or a file (loaded strictly into the trunk);
    `weights` must stay None; **kwargs: core.ResNeSt knobs (output_stride=16, multi_grid, norm, ...)."""
    _no_model_weights(weights)
    num_classes = 21 if num_classes is None else num_classes
    body = ResNeStBody(variant, {"layer3": "aux", "layer4": "out"} if aux_loss else {"layer4": "out"},
                       **{"output_stride": 8, **kwargs})
    if weights_backbone is not None:
        load_weights(body, weights_backbone)
    channels = body.output_channels()
    return DeepLabV3(body, DeepLabHead(channels["res5"], num_classes),
                     FCNHead(channels["res4"], num_classes) if aux_loss else None)


def _no_model_weights(weights) -> None:
    if weights is not None:
        raise ValueError(f"weights={weights!r}: no trained ResNeSt detection or segmentation model is published for "
                         "torchvision; pass the ImageNet trunk as weights_backbone (a variant name or a file)")
