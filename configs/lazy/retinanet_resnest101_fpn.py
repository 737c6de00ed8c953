# RetinaNet, ResNeSt-101-FPN, 1x.
from .retinanet_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.variant = "resnest101"
train.output_dir = "./output/lazy/retinanet_resnest101_fpn"
