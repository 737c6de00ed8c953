# Small Cascade Mask R-CNN for CPU runs and tests: the cascade-mask-rcnn_resnest50_fpn_1x_coco.py recipe
# (SyncBN backbone + three box heads + mask head, Shared4Conv1FC box heads, multi-scale training) on
# ResNeSt-14d, trained on the project's generated demo shapes (3 classes, 128x128 images, COCO format with
# polygon masks: resnest_backbone.data.demo.ensure_demo_data('datasets')). Evaluates box and mask AP.
# No pretrained weights (init_cfg=None): pass some with
#   --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=FILE.pth
_base_ = './cascade-mask-rcnn_resnest50_fpn_1x_coco.py'

# Narrower than the COCO models (FPN and heads 128 channels instead of 256), fewer proposals.
model = dict(
    backbone=dict(variant='resnest14d', init_cfg=None),
    neck=dict(out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128,
                  anchor_generator=dict(scales=[4])),  # objects are 16-56 px
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        # the recipe's three stages, narrower and with 3 classes
        bbox_head=[dict(head, in_channels=128, conv_out_channels=128, fc_out_channels=512, num_classes=3)
                   for head in _base_.model.roi_head.bbox_head],
        mask_roi_extractor=dict(out_channels=128),
        mask_head=dict(in_channels=128, conv_out_channels=128, num_classes=3)),
    # (the three rcnn stages keep the recipe's samplers; at most 200 proposals per image reach them)
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200)),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=20)))

data_root = 'datasets/resnest_demo/det/'
metainfo = dict(classes=('circle', 'square', 'triangle'))
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, poly2mask=False),
    # the recipe's 640, 672, ..., 800 choice scaled to the 128 px images
    dict(type='RandomChoiceResize', scales=[(1333, s) for s in (112, 120, 128, 136, 144)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(1333, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True, min_size=8),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')  # metric: bbox and segm
test_evaluator = val_evaluator

# 12 epochs of 100 iterations (400 images, batch 4); lr for batch 4 (0.02 per 16 images).
optim_wrapper = dict(optimizer=dict(lr=0.005))
train_cfg = dict(max_epochs=12, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=4))
