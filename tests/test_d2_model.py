"""detectron2 integration: builders, output shapes, freezing, norms, and a real Faster R-CNN step."""
import logging

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.utils.events import EventStorage

from conftest import d2_cfg
from resnest_backbone.core import SyncBatchNorm

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


SMALL = {"MODEL.RESNEST.VARIANT": "resnest14d", "INPUT.MIN_SIZE_TEST": 128, "INPUT.MAX_SIZE_TEST": 192,
         "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 50,
         "MODEL.RPN.PRE_NMS_TOPK_TEST": 200, "MODEL.RPN.POST_NMS_TOPK_TEST": 50,
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32, "MODEL.ROI_HEADS.NUM_CLASSES": 3}


def _batch():
    torch.manual_seed(0)
    from detectron2.structures import Boxes, Instances

    batch = []
    for h, w in [(128, 160), (112, 144)]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 100.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        batch.append({"image": torch.rand(3, h, w) * 255, "instances": inst, "height": h, "width": w})
    return batch


def test_three_lines_are_enough():
    """The README's recipe: import, add config, set BACKBONE.NAME, in a stock detectron2 config."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    import resnest_backbone.d2

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    resnest_backbone.d2.add_resnest_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnest_fpn_backbone"
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert type(model.backbone.bottom_up).__name__ == "ResNeStBackbone"
    assert "backbone.bottom_up.layer1.0.conv2.fc1.weight" in model.state_dict()


def test_faster_rcnn_from_config_trains_and_infers():
    cfg = d2_cfg(**SMALL)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(_batch())
    assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trunk = model.backbone.bottom_up
    grad = trunk.layer4[0].conv2.fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # gradients reach the split attention
    assert trunk.layer1[0].conv1.weight.grad is None  # FREEZE_AT 2: stem and res2 frozen
    assert isinstance(trunk.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(trunk.layer2[0].bn1, SyncBatchNorm)  # config asks SyncBN; runs as BN in one process
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 120, 150) * 255}])
    inst = out[0]["instances"]
    assert inst.image_size == (120, 150)
    assert inst.pred_boxes.tensor.shape[1] == 4 and len(inst.scores) == len(inst.pred_classes)


def test_syncbn_single_process_warns_instead_of_crashing(caplog):
    cfg = d2_cfg(**SMALL)
    model = build_model(cfg).train()
    SyncBatchNorm._warned = False
    with caplog.at_level(logging.WARNING), EventStorage():
        model(_batch())
    assert any("SyncBN requested but no multi-process group" in r.message for r in caplog.records)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("features", [["res2", "res3", "res4", "res5"], ["res4"], ["stem", "res3"]])
def test_output_shape_matches_features(output_stride, features):
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.RESNEST.OUTPUT_STRIDE": output_stride,
                    "MODEL.RESNETS.OUT_FEATURES": features, "MODEL.RESNETS.NORM": "BN"})
    backbone = BACKBONE_REGISTRY.get("build_resnest_backbone")(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    shapes = backbone.output_shape()
    assert list(out) == features == list(shapes)
    for name, spec in shapes.items():
        assert out[name].shape[1] == spec.channels
        assert out[name].shape[-2:] == (64 // spec.stride, 96 // spec.stride)
    if "res5" in shapes:
        assert shapes["res5"].stride == output_stride


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.BACKBONE.FREEZE_AT": freeze_at,
                    "MODEL.RESNETS.NORM": "BN"})
    backbone = BACKBONE_REGISTRY.get("build_resnest_backbone")(cfg, ShapeSpec(channels=3))
    parts = [backbone.conv1, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    for index, part in enumerate(parts):
        frozen = index < freeze_at
        assert all(p.requires_grad != frozen for p in part.parameters())
        norms = [m for m in part.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms)


def test_retinanet_backbone_has_p6_p7_from_res5():
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.RESNETS.NORM": "GN",
                    "MODEL.FPN.NORM": "GN", "MODEL.BACKBONE.FREEZE_AT": 0})
    fpn = BACKBONE_REGISTRY.get("build_resnest_retinanet_fpn_backbone")(cfg, ShapeSpec(channels=3)).eval()
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32,
                                                                    "p6": 64, "p7": 128}
    assert fpn.top_block.p6.in_channels == 2048
    assert isinstance(fpn.bottom_up.layer1[0].bn1, torch.nn.GroupNorm)
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 128, 128))
    assert out["p7"].shape[-2:] == (1, 1)


@pytest.mark.parametrize("key,value,message", [
    ("MODEL.RESNEST.VARIANT", "resnest51", "unknown ResNeSt variant"),
    ("MODEL.RESNEST.RADIX", -1, "radix=-1"),
    ("MODEL.RESNEST.OUTPUT_STRIDE", 4, "output_stride=4"),
    ("MODEL.RESNEST.RADIX", 3, "not divisible by cardinality\\*radix=3"),
    ("MODEL.RESNEST.LAYERS", [3, 4, 6], "layers="),
    ("MODEL.RESNETS.NORM", "LayerNorm", "MODEL.RESNETS.NORM is 'LayerNorm', which detectron2's get_norm does not"),
    ("MODEL.RESNEST.NORM", "LN2d", "MODEL.RESNEST.NORM is 'LN2d'"),
])
def test_bad_config_values_raise_clear_errors(key, value, message):
    cfg = d2_cfg(**{key: value})
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
