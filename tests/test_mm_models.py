"""The mmdet / mmseg configs: they parse and build with the recipe's parts, and the small (demo) ones run a
real Faster R-CNN / DeepLabV3 `loss` and `predict` on fake batches on CPU."""
import os

import pytest

pytest.importorskip("mmengine", reason="mmengine is not installed (make env installs the OpenMMLab stack)")
pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops (mmcv.ops) is not importable (make env builds it)")
pytest.importorskip("mmdet", reason="mmdet is not installed (make env installs mmdet==3.3.0)")
pytest.importorskip("mmseg", reason="mmsegmentation is not installed (make env installs mmsegmentation==1.2.2)")

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
