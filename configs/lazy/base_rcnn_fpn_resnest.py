# Faster R-CNN + FPN on ResNeSt-50 as a detectron2 LazyConfig: the detectron2-ResNeSt recipe of
# ../Base-RCNN-FPN-ResNeSt.yaml (SyncBN in backbone, FPN and box head, 4conv1fc box head, 640-800 multi-scale
# training, RGB input with the ImageNet mean/std in 0-255 scale, 1x schedule), in the style of detectron2's
# configs/common/models and new_baselines. Self-contained (no detectron2 model-zoo config is imported) and
# only plain values, so LazyConfig.save writes a yaml that LazyConfig.load reads back. The other configs of
# this folder import from here. Run with tools/train_net.py or detectron2's tools/lazyconfig_train_net.py.
import torch
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (DatasetMapper, build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from resnest_backbone.d2 import ResNeStBackbone  # registers the ResNeSt backbones and the demo datasets too
from resnest_backbone.d2.train import has_fast_coco_eval

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        # MODEL.RESNEST.VARIANT, MODEL.RESNETS.NORM, MODEL.BACKBONE.FREEZE_AT of the yaml configs
        bottom_up=L(ResNeStBackbone)(
            variant="resnest50",
            norm="SyncBN",  # the core's SyncBatchNorm: BN in one process, synchronised on CPU groups too
            freeze_at=2,  # stem + res2 frozen (FrozenBatchNorm2d, no gradients)
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        norm="SyncBN",
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=256, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),
        post_nms_topk=(1000, 1000),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=80,
        batch_size_per_image=512,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        # 4conv1fc with SyncBN (ShapeSpec through L(...), so the config stays plain values)
        box_head=L(FastRCNNConvFCHead)(
            input_shape=L(ShapeSpec)(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="SyncBN",
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=L(ShapeSpec)(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
        ),
    ),
    # ResNeSt checkpoints are trained on RGB images normalised with the ImageNet mean/std (0-255 scale).
    pixel_mean=[123.68, 116.779, 103.939],
    pixel_std=[58.393, 57.12, 57.375],
    input_format="RGB",
)

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(640, 672, 704, 736, 768, 800), sample_style="choice",
                                    max_size=1333),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
# box AP (+ mask AP when the model has masks); the C++ evaluation only where detectron2 has it built. The
# output folder also lets COCOEvaluator evaluate datasets registered without a COCO json (the demo subsets).
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
    use_fast_impl=has_fast_coco_eval(),
)

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),  # params.model is set to the model
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)

# 1x: 90k iterations at batch 16, LR x0.1 at 60k and 80k, 1000 linear warm-up iterations from 0.001. The
# milestones are fractions of train.max_iter (as detectron2's coco_schedule): a shorter run scales them.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[60000, 80000, 90000]),
    warmup_length=1000 / 90000,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = dict(
    output_dir="./output/lazy/faster_rcnn_resnest50_fpn",
    init_checkpoint="",  # a trunk converted with resnest-convert (.pkl), or a whole-model checkpoint
    max_iter=90000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,  # 0: evaluate once, at the end (the yaml configs' TEST.EVAL_PERIOD)
    log_period=20,
    device="cuda",  # without CUDA, tools/train_net.py stops and names the override train.device=cpu
    seed=-1,
    # TEST.PRECISE_BN of the yaml recipe; tools/train_net.py runs it, upstream's lazyconfig_train_net.py
    # ignores this key
    precise_bn=dict(enabled=True, num_iter=200),
)
