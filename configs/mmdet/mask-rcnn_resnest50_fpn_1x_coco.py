# Mask R-CNN + FPN on a ResNeSt-50 backbone, COCO 1x, following mmdet's ResNeSt recipe
# (configs/resnest/mask-rcnn_s50_fpn_syncbn-backbone+head_ms-1x_coco.py): SyncBN in the backbone, the box head
# and the mask head, Shared4Conv1FC box head, multi-scale training (short side one of 640, 672, ..., 800),
# ResNeSt's RGB mean/std. Everything but the backbone is mmdet's config (tests/test_mm_models.py checks it).
#
# Weights: resnest-convert resnest50-528c19ca.pth checkpoints/resnest50_mmdet.pth --format mmdet
# Train: python tools/train.py configs/mmdet/mask-rcnn_resnest50_fpn_1x_coco.py  (mmdet's tools/train.py)
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

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
            type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    dict(type='RandomChoiceResize',
         scales=[(1333, 640), (1333, 672), (1333, 704), (1333, 736), (1333, 768), (1333, 800)],
         keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
