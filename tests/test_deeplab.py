"""DeepLabV3 on ResNeSt: the dilated backbone (output stride 8/16, multi-grid), the DeepLab heads, one real
training step through the project's Trainer (DeepLab augmentation, poly LR, auxiliary head) and
SemSegEvaluator (mIoU) on generated ADE-format images."""
import json
import math
import os

import pytest
import torch

import resnest_backbone.d2  # noqa: F401  (registers the backbones and heads, and the demo sets)
from detectron2.modeling import build_backbone, build_model
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
from resnest_backbone.d2.train import Trainer, get_resnest_cfg

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.CROP.SIZE", "(64, 64)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]


def _cfg(config="demo_deeplabv3_resnest.yaml", *opts):
    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("stride", [8, 16])
def test_output_stride_and_multi_grid(stride):
    cfg = _cfg("demo_deeplabv3_resnest.yaml", "MODEL.RESNEST.OUTPUT_STRIDE", str(stride),
               "MODEL.RESNEST.LAYERS", "[1, 1, 1, 3]", "MODEL.RESNEST.RES5_MULTI_GRID", "[1, 2, 4]")
    backbone = build_backbone(cfg)
    assert backbone.output_shape()["res5"].stride == stride and backbone.size_divisibility == stride
    res5 = 4 if stride == 8 else 2  # dilation of res5
    assert [b.conv2.conv.dilation[0] for b in backbone.layer4] == [res5 * g for g in (1, 2, 4)]
    if stride == 8:  # res4 dilated too (its first block at half the rate, as the official code)
        assert [b.conv2.conv.dilation[0] for b in backbone.layer3] == [1]
    out = backbone(torch.randn(1, 3, 64, 96))
    assert out["res5"].shape[-2:] == (64 // stride, 96 // stride)


def test_stride_config_conflict_is_refused():
    cfg = _cfg("demo_deeplabv3_resnest.yaml", "MODEL.RESNEST.OUTPUT_STRIDE", "8", "MODEL.RESNETS.RES5_DILATION", "2")
    with pytest.raises(ValueError, match="MODEL.RESNEST.OUTPUT_STRIDE"):
        build_backbone(cfg)
    cfg = _cfg("demo_deeplabv3_resnest.yaml", "MODEL.RESNEST.OUTPUT_STRIDE", "32")
    with pytest.raises(ValueError, match="8 .* or 16"):
        build_backbone(cfg)


def test_ade20k_configs_follow_the_recipe():
    for variant, config in [("resnest50", "deeplabv3_resnest50_ade20k.yaml"),
                            ("resnest101", "deeplabv3_resnest101_ade20k.yaml")]:
        cfg = _cfg(config)
        assert cfg.MODEL.RESNEST.VARIANT == variant and cfg.MODEL.RESNEST.OUTPUT_STRIDE == 8
        assert list(cfg.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS) == [12, 24, 36]
        assert cfg.MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE == "res4" and cfg.INPUT.CROP.SIZE == [512, 512]
        assert cfg.DATASETS.TEST == ("ade20k_sem_seg_val",)
    model = build_model(_cfg("deeplabv3_resnest50_ade20k.yaml")).eval()
    assert model.sem_seg_head.aux_head is not None
    with torch.no_grad():  # global image pooling: any test size, not only multiples of the crop
        out = model([{"image": torch.zeros(3, 72, 100), "height": 72, "width": 100}])
    assert out[0]["sem_seg"].shape == (150, 72, 100)


def test_train_step_and_sem_seg_evaluation(tmp_path):
    cfg = _cfg("demo_deeplabv3_resnest.yaml", *TINY, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
               "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    trainer = Trainer(cfg)
    assert isinstance(trainer.scheduler, WarmupPolyLR)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items() if v.is_floating_point()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert {"loss_sem_seg", "loss_sem_seg_aux"} <= set(rows[-1])
    assert all(math.isfinite(rows[-1][k]) for k in ("loss_sem_seg", "loss_sem_seg_aux", "total_loss"))
    after = trainer.model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the trunk was trained

    test_cfg = cfg.clone()
    test_cfg.defrost()
    test_cfg.DATASETS.TEST = ("resnest_demo_seg_val_mini",)
    results = Trainer.test(test_cfg, trainer.model)
    sem = results["sem_seg"]
    assert 0.0 <= sem["mIoU"] <= 100.0 and 0.0 < sem["pACC"] <= 100.0
    assert {"IoU-background", "IoU-circle", "IoU-square", "IoU-triangle"} <= set(sem)


def test_deeplabv3_plus_head_trains_on_the_resnest_backbone():
    cfg = _cfg("demo_deeplabv3_resnest.yaml", *TINY, "MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead",
               "MODEL.SEM_SEG_HEAD.IN_FEATURES", '["res2", "res5"]', "MODEL.RESNETS.OUT_FEATURES", '["res2", "res5"]',
               "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", "4")
    model = build_model(cfg).train()
    batch = next(iter(Trainer.build_train_loader(cfg)))
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and math.isfinite(losses["loss_sem_seg"].item())
    losses["loss_sem_seg"].backward()
    assert model.backbone.conv1[0].weight.grad.abs().sum() > 0
