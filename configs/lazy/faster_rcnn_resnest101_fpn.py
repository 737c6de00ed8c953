# Faster R-CNN, ResNeSt-101-FPN, 1x (LazyConfig of ../faster_rcnn_resnest101_fpn.yaml; reference 44.72 box AP).
from .faster_rcnn_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.variant = "resnest101"
train.output_dir = "./output/lazy/faster_rcnn_resnest101_fpn"
