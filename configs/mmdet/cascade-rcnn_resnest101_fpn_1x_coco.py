# Cascade R-CNN + FPN on ResNeSt-101 (stem width 64, i.e. mmdet's stem_channels=128), COCO 1x; the recipe of
# cascade-rcnn_resnest50_fpn_1x_coco.py
# (mmdet: configs/resnest/cascade-rcnn_s101_fpn_syncbn-backbone+head_ms-range-1x_coco.py).
#   resnest-convert resnest101-22405ba7.pth checkpoints/resnest101_mmdet.pth --format mmdet
_base_ = './cascade-rcnn_resnest50_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        variant='resnest101',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest101_mmdet.pth')))
