# Small DeepLabV3+ for CPU runs and tests: the deeplabv3plus_resnest50-d8_ade20k.py recipe (OS8, separable
# ASPP + res2 decoder + aux FCN, SyncBN) on ResNeSt-14d with narrower heads, trained on the project's generated
# demo shapes in the ADE20K layout (128x128, background + 3 classes:
# resnest_backbone.data.demo.ensure_demo_data('datasets')). No pretrained weights (init_cfg=None).
_base_ = './deeplabv3plus_resnest50-d8_ade20k.py'

crop_size = (128, 128)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(variant='resnest14d', init_cfg=None),
    decode_head=dict(channels=128, c1_channels=24, num_classes=4),
    auxiliary_head=dict(channels=64, num_classes=4))

# The demo annotations follow ADE20K: 0 = "other" (ignored after reduce_zero_label), 1 = background, 2.. shapes.
dataset_type = 'BaseSegDataset'
data_root = 'datasets/resnest_demo/ADEChallengeData2016'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[0, 0, 0], [220, 20, 60], [0, 128, 0], [0, 0, 230]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(128, 128), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                seg_map_suffix='.png', reduce_zero_label=True)
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(**_dataset, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(**_dataset, data_prefix=dict(img_path='images/validation',
                                              seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.01))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2000, val_interval=500)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=2000, by_epoch=False)]
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(by_epoch=False, interval=500))
