"""torchvision adapter: ResNeSt the way torchvision's builders give ResNet (docs/torchvision.md).

    from resnest_backbone.tv import deeplabv3_resnest, fasterrcnn_resnest_fpn, resnest_fpn_backbone
    model = fasterrcnn_resnest_fpn("resnest50", weights_backbone="resnest50", num_classes=91)
    backbone = resnest_fpn_backbone(backbone_name="resnest50", weights="resnest50", trainable_layers=3)
    model = torchvision.models.detection.MaskRCNN(backbone, num_classes=91)   # or RetinaNet
    model = deeplabv3_resnest("resnest50", num_classes=21, aux_loss=True, weights_backbone="resnest50")

    fast = core.fuse.deploy(model)                           # the fast path, as for any model
    fast = core.fuse.deploy(model, dtype=torch.bfloat16)     # bf16; scores and boxes in fp32

Importing it changes nothing in torchvision; it names torchvision's score and box layers to the core's
precision policy (core.precision.register_fp32_heads), as the other adapters do.
"""
from .models import ResNeStBody, deeplabv3_resnest, fasterrcnn_resnest_fpn, resnest_fpn_backbone

__all__ = ["ResNeStBody", "deeplabv3_resnest", "fasterrcnn_resnest_fpn", "resnest_fpn_backbone"]
