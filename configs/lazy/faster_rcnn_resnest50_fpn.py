# Faster R-CNN, ResNeSt-50-FPN, 1x (LazyConfig of ../faster_rcnn_resnest50_fpn.yaml; reference 42.33 box AP,
# detectron2-ResNeSt). Pretrained trunk: resnest-convert the ImageNet checkpoint, then
# train.init_checkpoint=resnest50_d2.pkl.
from .base_rcnn_fpn_resnest import dataloader, lr_multiplier, model, optimizer, train

train.output_dir = "./output/lazy/faster_rcnn_resnest50_fpn"
