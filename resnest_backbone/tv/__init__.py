"""torchvision adapter: ResNeSt the way torchvision's builders give ResNet (docs/torchvision.md).

    from resnest_backbone.tv import deeplabv3_resnest, fasterrcnn_resnest_fpn, resnest_fpn_backbone
    model = fasterrcnn_resnest_fpn("resnest50", weights_backbone="resnest50", num_classes=91)
    backbone = resnest_fpn_backbone(backbone_name="resnest50", weights="resnest50", trainable_layers=3)
    model = torchvision.models.detection.MaskRCNN(backbone, num_classes=91)   # or RetinaNet
    model = deeplabv3_resnest("resnest50", num_classes=21, aux_loss=True, weights_backbone="resnest50")

    fast = core.fuse.deploy(model)                                          # the fast path, as for any model
    fast = core.fuse.autocast_inference(fast, torch.bfloat16, keep_fp32=fp32_heads(fast))  # bf16, fp32 boxes

Importing it registers nothing and changes nothing in torchvision.
"""
from .models import (FP32_HEADS, ResNeStBody, deeplabv3_resnest, fasterrcnn_resnest_fpn, fp32_heads,
                     resnest_fpn_backbone)

__all__ = ["FP32_HEADS", "ResNeStBody", "deeplabv3_resnest", "fasterrcnn_resnest_fpn", "fp32_heads",
           "resnest_fpn_backbone"]
