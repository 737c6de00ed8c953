# DeepLabV3 + aux FCN on a dilated ResNeSt-101 (output stride 8), ADE20K 512x512 160k; the recipe of
# deeplabv3_resnest50-d8_ade20k.py.
#   resnest-convert resnest101-22405ba7.pth checkpoints/resnest101_mmdet.pth --format mmdet
_base_ = './deeplabv3_resnest50-d8_ade20k.py'
model = dict(
    backbone=dict(
        variant='resnest101',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest101_mmdet.pth')))
