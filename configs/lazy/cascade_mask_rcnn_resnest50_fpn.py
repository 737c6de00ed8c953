# Cascade Mask R-CNN, ResNeSt-50-FPN, 1x (LazyConfig of ../cascade_mask_rcnn_resnest50_fpn.yaml: the cascade
# box heads of cascade_rcnn_resnest50_fpn.py plus the SyncBN mask head of mask_rcnn_resnest50_fpn.py; scale
# augmentation as the official recipe, the short side one of 640, 672, ..., 800; reference 46.19 box AP /
# 39.55 mask AP, detectron2-ResNeSt).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .cascade_rcnn_resnest50_fpn import dataloader, lr_multiplier, model, optimizer, train
from .mask_rcnn_resnest50_fpn import model as _mask_model

for _key in ("mask_in_features", "mask_pooler", "mask_head"):
    model.roi_heads[_key] = _mask_model.roi_heads[_key]
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(640, 672, 704, 736, 768, 800), sample_style="choice", max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
train.output_dir = "./output/lazy/cascade_mask_rcnn_resnest50_fpn"
