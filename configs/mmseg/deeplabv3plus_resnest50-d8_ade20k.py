# DeepLabV3+ (depthwise-separable ASPP, dilations 1/12/24/36, decoder on res2) + auxiliary FCN head on a
# dilated ResNeSt-50, output stride 8, ADE20K 512x512, 160k iterations: mmseg's DeepLabV3+ ADE20K recipe with
# the backbone swapped (mmseg's own ResNeSt config is resnest_s101-d8_deeplabv3plus_4xb4-160k_ade20k-512x512.py;
# everything but the backbone and the input mean/std equals it, tests/test_mm_models.py checks it). The
# backbone is the one of deeplabv3_resnest50-d8_ade20k.py.
#
# Weights: resnest-convert resnest50-528c19ca.pth checkpoints/resnest50_mmdet.pth --format mmdet
# Train: python tools/train.py configs/mmseg/deeplabv3plus_resnest50-d8_ade20k.py  (mmseg's tools/train.py)
_base_ = ['mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb4-160k_ade20k-512x512.py',
          '../mmdet/_base_/resnest_plugin.py']

model = dict(
    pretrained=None,  # the base's ResNet-V1c weights; ours come through the backbone's init_cfg
    # ResNeSt was trained on RGB images with these statistics (mmseg's ResNeSt configs keep ResNet's).
    data_preprocessor=dict(
        mean=[123.68, 116.779, 103.939], std=[58.393, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(
        _delete_=True,  # do not inherit the ResNetV1c keys
        type='ResNeStSA',
        variant='resnest50',
        # output stride 8 (mmseg's -d8): res4 and res5 dilated (2, 4) instead of strided; the first block of a
        # dilated stage uses half the dilation (contract_dilation), as mmseg's ResNetV1c and the official
        # ResNeSt `dilated=True` do.
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest50_mmdet.pth')))
