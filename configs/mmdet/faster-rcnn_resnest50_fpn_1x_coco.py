# Faster R-CNN + FPN on a ResNeSt-50 backbone, COCO 1x: mmdet's own ResNeSt recipe (SyncBN backbone and box head,
# Shared4Conv1FC box head, multi-scale training with short side 640-800, ResNeSt's RGB mean/std) with its backbone
# replaced by this project's and _base_/resnest_plugin.py added; tests/test_mm_models.py checks that nothing else
# differs.
#
# Weights: convert the official ImageNet checkpoint once (any naming: official, timm, mmdet, d2 fork):
#   resnest-convert resnest50-528c19ca.pth checkpoints/resnest50_mmdet.pth --format mmdet
# Train (with mmdet's tools/train.py, or mmengine's Runner.from_cfg):
#   python tools/train.py configs/mmdet/faster-rcnn_resnest50_fpn_1x_coco.py
_base_ = ['mmdet::resnest/faster-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py',
          './_base_/resnest_plugin.py']

model = dict(
    backbone=dict(
        _delete_=True,  # do not inherit mmdet's ResNeSt keys (depth, radix, init_cfg, ...)
        type='ResNeStSA',
        variant='resnest50',
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest50_mmdet.pth')))
