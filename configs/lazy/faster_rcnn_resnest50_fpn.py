# Faster R-CNN, ResNeSt-50-FPN, 1x (LazyConfig of ../faster_rcnn_resnest50_fpn.yaml; reference 42.33 box AP,
# detectron2-ResNeSt). Pretrained trunk: resnest-convert the ImageNet checkpoint, then
# train.init_checkpoint=resnest50_d2.pkl.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .base_rcnn_fpn_resnest import dataloader, lr_multiplier, model, optimizer, train

# range-scale training as the official faster_rcnn_ResNeSt_50_FPN_syncbn_range-scale_1x: short side uniform in 640-800
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(640, 800), sample_style="range", max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
train.output_dir = "./output/lazy/faster_rcnn_resnest50_fpn"
