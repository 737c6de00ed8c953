# RetinaNet, ResNeSt-50-FPN (P3-P7, P6/P7 from res5), 1x (LazyConfig of ../retinanet_resnest50_fpn.yaml):
# detectron2's RetinaNet recipe (3 scales x 3 ratios per level, focal loss, LR 0.01) on the ResNeSt trunk with
# SyncBN. No published ResNeSt reference number.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from resnest_backbone.d2 import ResNeStBackbone

from .base_rcnn_fpn_resnest import dataloader, lr_multiplier, optimizer, train

model = L(RetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(ResNeStBackbone)(
            variant="resnest50",
            norm="SyncBN",
            freeze_at=2,
            out_features=["res3", "res4", "res5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="SyncBN",
        top_block=L(LastLevelP6P7)(in_channels=2048, out_channels="${..out_channels}"),  # from res5
    ),
    head=L(RetinaNetHead)(
        input_shape=[L(ShapeSpec)(channels=256) for _ in range(5)],
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256, 256],
        prior_prob=0.01,
        num_anchors=9,
    ),
    anchor_generator=L(DefaultAnchorGenerator)(
        # [x, x * 2**(1/3), x * 2**(2/3)] for x in 32..512, rounded to 0.01 as in the yaml config
        sizes=[[32, 40.32, 50.80], [64, 80.63, 101.59], [128, 161.27, 203.19], [256, 322.54, 406.37],
               [512, 645.08, 812.75]],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True),
    num_classes=80,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    pixel_mean=[123.68, 116.779, 103.939],
    pixel_std=[58.393, 57.12, 57.375],
    input_format="RGB",
)
optimizer.lr = 0.01
train.output_dir = "./output/lazy/retinanet_resnest50_fpn"
