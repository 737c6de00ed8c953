# Cascade R-CNN + FPN on a ResNeSt-50 backbone, COCO 1x, following mmdet's ResNeSt recipe
# (configs/resnest/cascade-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py): SyncBN in the backbone and
# the three box heads, Shared4Conv1FC box heads, multi-scale training (short side 640-800), ResNeSt's RGB
# mean/std. Everything but the backbone is mmdet's config (tests/test_mm_models.py checks it).
#
# Weights: resnest-convert resnest50-528c19ca.pth checkpoints/resnest50_mmdet.pth --format mmdet
# Train: python tools/train.py configs/mmdet/cascade-rcnn_resnest50_fpn_1x_coco.py  (mmdet's tools/train.py)
_base_ = 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'

# Registers the `ResNeStSA` backbone in mmdet's (and mmseg's) MODELS.
custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)
# Warns before the run when ResNeSt weights meet BGR input or another mean/std (resnest_backbone/guards.py).
custom_hooks = [dict(type='ResNeStInputCheckHook')]

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    # ResNeSt was trained on RGB images with these statistics.
    data_preprocessor=dict(
        mean=[123.68, 116.779, 103.939], std=[58.393, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,  # do not inherit the ResNet-50 keys (depth, init_cfg, ...)
        type='ResNeStSA',
        variant='resnest50',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest50_mmdet.pth')),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
    roi_head=dict(
        # one head per stage, the stages' box-delta stds as in the base config (a list replaces the base's)
        bbox_head=[
            dict(type='Shared4Conv1FCBBoxHead', in_channels=256, conv_out_channels=256, fc_out_channels=1024,
                 norm_cfg=norm_cfg, roi_feat_size=7, num_classes=80,
                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
                 reg_class_agnostic=True,
                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
            for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=[(1333, 640), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
