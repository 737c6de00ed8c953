# Cascade R-CNN (box), ResNeSt-101-FPN, 1x (reference 47.50 box AP, detectron2-ResNeSt).
from .cascade_rcnn_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.variant = "resnest101"
train.output_dir = "./output/lazy/cascade_rcnn_resnest101_fpn"
