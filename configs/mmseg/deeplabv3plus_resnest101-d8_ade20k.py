# DeepLabV3+ + aux FCN on a dilated ResNeSt-101 (output stride 8), ADE20K 512x512 160k; the recipe of
# deeplabv3plus_resnest50-d8_ade20k.py (mmseg: resnest_s101-d8_deeplabv3plus_4xb4-160k_ade20k-512x512.py).
#   resnest-convert resnest101-22405ba7.pth checkpoints/resnest101_mmdet.pth --format mmdet
_base_ = './deeplabv3plus_resnest50-d8_ade20k.py'
model = dict(
    backbone=dict(
        variant='resnest101',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest101_mmdet.pth')))
