# Cascade Mask R-CNN, ResNeSt-101-FPN, 1x (reference 48.30 box AP / 41.56 mask AP, detectron2-ResNeSt).
from .cascade_mask_rcnn_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.variant = "resnest101"
train.output_dir = "./output/lazy/cascade_mask_rcnn_resnest101_fpn"
