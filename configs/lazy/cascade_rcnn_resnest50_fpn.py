# Cascade R-CNN (box), ResNeSt-50-FPN, 1x (LazyConfig of ../cascade_rcnn_resnest50_fpn.yaml: three 4conv1fc
# SyncBN box heads, class-agnostic regression, IoUs 0.5/0.6/0.7, 2000 RPN proposals in training, range-scale
# training 640-800; reference 45.41 box AP, detectron2-ResNeSt).
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .base_rcnn_fpn_resnest import dataloader, lr_multiplier, model, optimizer, train

for _key in ("box_head", "box_predictor", "proposal_matcher"):  # one of each per stage instead
    model.roi_heads.pop(_key)
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=L(ShapeSpec)(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="SyncBN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
    ],
)
model.proposal_generator.post_nms_topk = (2000, 1000)
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(640, 800), sample_style="range", max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
train.output_dir = "./output/lazy/cascade_rcnn_resnest50_fpn"
