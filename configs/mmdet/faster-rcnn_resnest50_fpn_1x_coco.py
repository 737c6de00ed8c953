# Faster R-CNN + FPN on a ResNeSt-50 backbone, COCO 1x, following mmdet's ResNeSt recipe
# (configs/resnest/faster-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py): SyncBN in the backbone and
# the box head, Shared4Conv1FC box head, multi-scale training (short side 640-800), ResNeSt's RGB mean/std.
#
# Weights: convert the official ImageNet checkpoint once (any naming: official, timm, mmdet, d2 fork):
#   resnest-convert resnest50-528c19ca.pth checkpoints/resnest50_mmdet.pth --format mmdet
# Train (with mmdet's tools/train.py, or mmengine's Runner.from_cfg):
#   python tools/train.py configs/mmdet/faster-rcnn_resnest50_fpn_1x_coco.py
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

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
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg)))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=[(1333, 640), (1333, 800)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
