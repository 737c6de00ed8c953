"""The mmdet / mmseg configs: each equals mmdet's / mmseg's own ResNeSt config but for the backbone, builds
with the recipe's parts, and the small (demo) ones run a real Faster R-CNN / DeepLabV3 `loss` and `predict`
on fake batches on CPU (the other demo configs train and evaluate in test_mm_runner.py)."""
import os
import re

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")
require("mmseg", "make env installs mmsegmentation==1.2.2")

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402

from resnest_backbone.mm import ResNeStSA  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = os.path.join(ROOT, "configs", "mmdet")
SEG = os.path.join(ROOT, "configs", "mmseg")


def _build(path):
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get("default_scope"))
    if cfg.default_scope == "mmdet":
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    return cfg, MODELS.build(cfg.model)


# (package, our config, the package's own ResNeSt config in its configs/resnest/, our variant)
RECIPES = [
    ("mmdet", "faster-rcnn_resnest50_fpn_1x_coco.py", "faster-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py",
     "resnest50"),
    ("mmdet", "faster-rcnn_resnest101_fpn_1x_coco.py",
     "faster-rcnn_s101_fpn_syncbn-backbone+head_ms-range-1x_coco.py", "resnest101"),
    ("mmdet", "mask-rcnn_resnest50_fpn_1x_coco.py", "mask-rcnn_s50_fpn_syncbn-backbone+head_ms-1x_coco.py",
     "resnest50"),
    ("mmdet", "mask-rcnn_resnest101_fpn_1x_coco.py", "mask-rcnn_s101_fpn_syncbn-backbone+head_ms-1x_coco.py",
     "resnest101"),
    ("mmdet", "cascade-rcnn_resnest50_fpn_1x_coco.py",
     "cascade-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py", "resnest50"),
    ("mmdet", "cascade-rcnn_resnest101_fpn_1x_coco.py",
     "cascade-rcnn_s101_fpn_syncbn-backbone+head_ms-range-1x_coco.py", "resnest101"),
    ("mmdet", "cascade-mask-rcnn_resnest50_fpn_1x_coco.py",
     "cascade-mask-rcnn_s50_fpn_syncbn-backbone+head_ms-1x_coco.py", "resnest50"),
    ("mmdet", "cascade-mask-rcnn_resnest101_fpn_1x_coco.py",
     "cascade-mask-rcnn_s101_fpn_syncbn-backbone+head_ms-1x_coco.py", "resnest101"),
    # mmseg publishes S-101 configs only; the S-50 ones differ from them in the backbone alone
    ("mmseg", "deeplabv3_resnest50-d8_ade20k.py", "resnest_s101-d8_deeplabv3_4xb4-160k_ade20k-512x512.py",
     "resnest50"),
    ("mmseg", "deeplabv3_resnest101-d8_ade20k.py", "resnest_s101-d8_deeplabv3_4xb4-160k_ade20k-512x512.py",
     "resnest101"),
    ("mmseg", "deeplabv3plus_resnest50-d8_ade20k.py", "resnest_s101-d8_deeplabv3plus_4xb4-160k_ade20k-512x512.py",
     "resnest50"),
    ("mmseg", "deeplabv3plus_resnest101-d8_ade20k.py",
     "resnest_s101-d8_deeplabv3plus_4xb4-160k_ade20k-512x512.py", "resnest101"),
]
RESNEST_MEAN, RESNEST_STD = [123.68, 116.779, 103.939], [58.393, 57.12, 57.375]


def _plain(value):
    """A config as plain data, without the `_scope_` markers mmengine adds to a base from another package."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "_scope_"}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@pytest.mark.parametrize("package,name,reference,variant", RECIPES)
def test_configs_equal_openmmlab_resnest_configs_but_the_backbone(package, name, reference, variant):
    from mmengine.utils import get_installed_path

    ours = _plain(Config.fromfile(os.path.join(ROOT, "configs", package, name)).to_dict())
    ref_path = os.path.join(get_installed_path(package), ".mim", "configs", "resnest", reference)
    ref = _plain(Config.fromfile(ref_path).to_dict())
    assert ours.pop("custom_imports") == dict(imports=["resnest_backbone.mm"], allow_failed_imports=False)
    assert ours.pop("custom_hooks") == [dict(type="ResNeStInputCheckHook")]  # guards.py: input-format warning
    assert "custom_hooks" not in ref
    backbone, ref_backbone = ours["model"].pop("backbone"), ref["model"].pop("backbone")
    if package == "mmseg":
        # mmseg's ResNeSt configs keep ResNet's input statistics and load weights through `pretrained`; ours use
        # ResNeSt's RGB statistics (as mmdet's ResNeSt configs do) and the backbone's init_cfg
        ours_pre, ref_pre = ours["model"]["data_preprocessor"], ref["model"]["data_preprocessor"]
        assert (ours_pre.pop("mean"), ours_pre.pop("std")) == (RESNEST_MEAN, RESNEST_STD)
        ref_pre.pop("mean"), ref_pre.pop("std")
        assert ours["model"].pop("pretrained") is None
        assert ref["model"].pop("pretrained") == "open-mmlab://resnest101"
    else:
        assert ours["model"]["data_preprocessor"]["mean"] == RESNEST_MEAN
    assert ours == ref  # heads, neck, train/test settings, data pipelines, schedule, runtime

    # the backbone: their depth and stem (mmdet's stem_channels = 2 x stem width) and training settings
    assert backbone["type"] == "ResNeStSA" and backbone["variant"] == variant
    assert ref_backbone["type"] == "ResNeSt"
    assert (ref_backbone["radix"], ref_backbone["reduction_factor"], ref_backbone["avg_down_stride"]) == (2, 4, True)
    ref_variant = "resnest" + re.search(r"_s(\d+)", reference).group(1)
    assert (ref_backbone["depth"], ref_backbone["stem_channels"]) == \
        {"resnest50": (50, 64), "resnest101": (101, 128)}[ref_variant]
    assert ref_variant == variant or package == "mmseg"
    settings = ("out_indices", "frozen_stages", "norm_cfg", "norm_eval", "strides", "dilations", "contract_dilation")
    assert {k: backbone.get(k) for k in settings if k in ref_backbone} == \
        {k: ref_backbone[k] for k in settings if k in ref_backbone}
    assert "frozen_stages" in ref_backbone or "frozen_stages" not in backbone
    assert backbone["init_cfg"] == dict(type="Pretrained", checkpoint=f"checkpoints/{variant}_mmdet.pth")


@pytest.mark.parametrize("name,variant", [("faster-rcnn_resnest50_fpn_1x_coco.py", "resnest50"),
                                          ("faster-rcnn_resnest101_fpn_1x_coco.py", "resnest101")])
def test_faster_rcnn_configs_follow_mmdet_resnest_recipe(name, variant):
    cfg, model = _build(os.path.join(DET, name))
    assert cfg.custom_imports["imports"] == ["resnest_backbone.mm"]
    backbone = cfg.model.backbone
    assert backbone.type == "ResNeStSA" and backbone.variant == variant
    assert "depth" not in backbone  # _delete_ kept the base ResNet keys out
    assert backbone.norm_cfg.type == "SyncBN" and backbone.frozen_stages == 1 and not backbone.norm_eval
    assert backbone.init_cfg == dict(type="Pretrained", checkpoint=f"checkpoints/{variant}_mmdet.pth")
    head = cfg.model.roi_head.bbox_head
    assert head.type == "Shared4Conv1FCBBoxHead" and head.norm_cfg.type == "SyncBN"
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomResize"]
    assert resize and resize[0].scale == [(1333, 640), (1333, 800)]
    assert cfg.model.data_preprocessor.bgr_to_rgb
    assert isinstance(model.backbone, ResNeStSA) and model.backbone.variant == variant
    assert isinstance(model.backbone.layer3[0].conv2.bn0, torch.nn.SyncBatchNorm)
    assert model.backbone.output_strides()["res5"] == 32


@pytest.mark.parametrize("name,variant", [("deeplabv3_resnest50-d8_ade20k.py", "resnest50"),
                                          ("deeplabv3_resnest101-d8_ade20k.py", "resnest101")])
def test_deeplabv3_configs(name, variant):
    cfg, model = _build(os.path.join(SEG, name))
    assert cfg.model.pretrained is None
    assert cfg.model.decode_head.type == "ASPPHead" and tuple(cfg.model.decode_head.dilations) == (1, 12, 24, 36)
    assert cfg.model.auxiliary_head.type == "FCNHead"
    assert cfg.model.decode_head.num_classes == 150
    assert isinstance(model.backbone, ResNeStSA) and model.backbone.variant == variant
    assert model.backbone.output_strides() == {"res2": 4, "res3": 8, "res4": 8, "res5": 8}
    assert model.backbone.init_cfg["checkpoint"] == f"checkpoints/{variant}_mmdet.pth"


@pytest.mark.parametrize("name,variant,stages,masks", [
    ("mask-rcnn_resnest50_fpn_1x_coco.py", "resnest50", 1, True),
    ("cascade-rcnn_resnest50_fpn_1x_coco.py", "resnest50", 3, False),
    ("cascade-mask-rcnn_resnest101_fpn_1x_coco.py", "resnest101", 3, True),
    ("mask-rcnn_resnest14d_fpn_demo.py", "resnest14d", 1, True),
    ("cascade-mask-rcnn_resnest14d_fpn_demo.py", "resnest14d", 3, True),
])
def test_mask_and_cascade_configs_build_the_recipe(name, variant, stages, masks):
    from mmdet.models.roi_heads.bbox_heads import Shared4Conv1FCBBoxHead

    cfg, model = _build(os.path.join(DET, name))
    assert isinstance(model.backbone, ResNeStSA) and model.backbone.variant == variant
    assert isinstance(model.backbone.layer3[0].conv2.bn0, torch.nn.SyncBatchNorm)
    assert model.backbone.layer1[0].conv1.weight.requires_grad is False  # frozen_stages=1
    heads = model.roi_head.bbox_head if stages > 1 else [model.roi_head.bbox_head]
    assert len(heads) == stages
    for head in heads:
        assert isinstance(head, Shared4Conv1FCBBoxHead) and len(head.shared_convs) == 4
        assert all(isinstance(conv.norm, torch.nn.SyncBatchNorm) for conv in head.shared_convs)
    if stages > 1:  # the cascade's tightening box-delta stds
        assert [list(h.bbox_coder.stds) for h in heads] == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                                                            [0.033, 0.033, 0.067, 0.067]]
    assert model.with_mask == masks
    if masks:
        mask_head = model.roi_head.mask_head[-1] if stages > 1 else model.roi_head.mask_head
        assert all(isinstance(conv.norm, torch.nn.SyncBatchNorm) for conv in mask_head.convs)
        assert mask_head.num_classes == heads[0].num_classes
        assert cfg.val_evaluator.metric == ["bbox", "segm"]
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type in ("RandomResize", "RandomChoiceResize")]
    assert len(resize) == 1 and resize[0].keep_ratio


@pytest.mark.parametrize("name,variant", [("deeplabv3plus_resnest50-d8_ade20k.py", "resnest50"),
                                          ("deeplabv3plus_resnest101-d8_ade20k.py", "resnest101"),
                                          ("deeplabv3plus_resnest14d-d8_demo.py", "resnest14d")])
def test_deeplabv3plus_configs(name, variant):
    from mmseg.models.decode_heads import DepthwiseSeparableASPPHead

    cfg, model = _build(os.path.join(SEG, name))
    assert isinstance(model.decode_head, DepthwiseSeparableASPPHead)
    assert model.decode_head.dilations == (1, 12, 24, 36)
    assert isinstance(model.backbone, ResNeStSA) and model.backbone.variant == variant
    assert model.backbone.output_strides() == {"res2": 4, "res3": 8, "res4": 8, "res5": 8}
    # the decoder's low-level branch reads res2 (256 channels), the ASPP res5 (2048)
    assert model.decode_head.c1_bottleneck.conv.in_channels == 256 and model.decode_head.in_channels == 2048
    assert isinstance(model.decode_head.c1_bottleneck.norm, torch.nn.SyncBatchNorm)
    assert model.auxiliary_head.in_channels == 1024
    if variant != "resnest14d":
        assert cfg.model.decode_head.num_classes == 150
        assert model.backbone.init_cfg["checkpoint"] == f"checkpoints/{variant}_mmdet.pth"
    else:
        assert model.decode_head.num_classes == 4 and model.backbone.init_cfg is None


def test_demo_faster_rcnn_loss_and_predict():
    from mmdet.structures import DetDataSample

    torch.manual_seed(0)
    cfg, model = _build(os.path.join(DET, "faster-rcnn_resnest14d_fpn_demo.py"))
    model.init_weights()
    samples, inputs = [], []
    for i in range(2):
        h, w = 128, 112 + 16 * i
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0),
                                             pad_shape=(h, w), batch_input_shape=(128, 128)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 100.0, 90.0]]),
                                           labels=torch.tensor([0, 2]))
        samples.append(sample)
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    model.train()
    batch = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
    losses = model(**batch, mode="loss")
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "acc"} <= set(losses)
    total = sum(v if torch.is_tensor(v) else sum(v) for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    backbone = model.backbone
    grad = backbone.layer3[0].conv2.fc1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert backbone.layer1[0].conv1.weight.grad is None  # frozen_stages=1
    assert model.roi_head.bbox_head.shared_convs[0].conv.weight.grad is not None

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=False)
        results = model(**batch, mode="predict")
    assert len(results) == 2
    for result, (h, w) in zip(results, [(128, 112), (128, 128)]):
        pred = result.pred_instances
        n = len(pred)
        assert 0 < n <= cfg.model.test_cfg.rcnn.max_per_img
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert pred.labels.max() < 3 and (pred.scores >= 0).all() and (pred.scores <= 1).all()
        assert (pred.bboxes[:, 2] >= pred.bboxes[:, 0]).all() and (pred.bboxes[:, 3] >= pred.bboxes[:, 1]).all()
        assert pred.bboxes[:, 0::2].max() <= w and pred.bboxes[:, 1::2].max() <= h and pred.bboxes.min() >= 0


def test_demo_deeplabv3_loss_and_predict():
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    cfg, model = _build(os.path.join(SEG, "deeplabv3_resnest14d-d8_demo.py"))
    model.init_weights()
    assert model.backbone.output_strides()["res5"] == 8
    samples, inputs = [], []
    for _ in range(2):
        label = torch.zeros(1, 128, 128, dtype=torch.long)
        label[:, 20:60, 30:90] = 1
        label[:, 70:120, 10:50] = 3
        label[:, :4] = 255  # ignore
        sample = SegDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
        inputs.append(torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8))
    model.train()
    batch = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
    losses = model(**batch, mode="loss")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    total = losses["decode.loss_ce"] + losses["aux.loss_ce"]
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.layer4[0].conv2.fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.backbone.layer1[0].conv2.conv.weight.grad is not None  # frozen_stages=-1 in the seg recipe

    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=inputs[:1], data_samples=samples[:1]), training=False)
        results = model(**batch, mode="predict")
    pred = results[0].pred_sem_seg.data
    assert pred.shape == (1, 128, 128) and pred.dtype == torch.int64
    assert 0 <= pred.min() and pred.max() < 4
    assert results[0].seg_logits.data.shape == (4, 128, 128)
