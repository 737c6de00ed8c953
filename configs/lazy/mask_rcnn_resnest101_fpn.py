# Mask R-CNN, ResNeSt-101-FPN, 1x (reference 45.75 box AP / 40.65 mask AP, detectron2-ResNeSt).
from .mask_rcnn_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.variant = "resnest101"
train.output_dir = "./output/lazy/mask_rcnn_resnest101_fpn"
