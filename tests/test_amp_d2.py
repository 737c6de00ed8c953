"""detectron2 in reduced precision: mixed-precision training with SOLVER.AMP.ENABLED on the CPU (bfloat16,
resnest_backbone.d2.train.build_trainer / AutocastTrainer), and a whole detector through the bf16 inference path
(core.fuse.deploy(dtype=torch.bfloat16)) against float32."""
import os

import pytest
import torch
from torch import nn

from test_bf16 import BF16_MIN, BF16_REL, OpRecorder, rel_err
from test_fuse import randomize_norms

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEC = {"version": 1, "seed": 7, "size": 128, "det": {"train": 4, "val": 1}, "seg": {"train": 1, "val": 1},
             "min_object": 20, "max_object": 56, "max_objects": 3}


def _cfg(*opts, config="demo_faster_rcnn_resnest.yaml"):
    from resnest_backbone.d2.train import adapt_cfg_to_device, get_resnest_cfg

    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    adapt_cfg_to_device(cfg)
    return cfg


def test_build_trainer_choice_and_errors():
    from detectron2.engine import SimpleTrainer

    from resnest_backbone.d2.train import AutocastTrainer, build_trainer

    cfg = _cfg()
    assert cfg.SOLVER.AMP.PRECISION == ""  # the key add_resnest_config adds
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = build_trainer(model, [], optimizer, "cpu", amp=False)
    assert type(plain) is SimpleTrainer
    amp = build_trainer(model, [], optimizer, "cpu", amp=True)
    assert isinstance(amp, AutocastTrainer) and amp.precision == torch.bfloat16 and amp.device_type == "cpu"
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='float16' on device 'cpu'.*use bfloat16"):
        build_trainer(model, [], optimizer, "cpu", amp=True, precision="float16")
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='half'"):
        build_trainer(model, [], optimizer, "cpu", amp=True, precision="half")


def test_trainer_amp_bf16_on_cpu(tmp_path):
    """SOLVER.AMP.ENABLED on the CPU: the project's Trainer runs 3 bf16 mixed-precision steps of the demo
    Faster R-CNN (ResNeSt-14 FPN, SyncBN as BN in one process) with finite losses; during the steps every
    convolution (one per Conv2d call) and its backward ran in bf16 but the RPN's two predictors (fp32), every
    radix softmax in fp32, every BN on fp32 statistics; after them the parameters are fp32, finite, and
    changed; the running statistics fp32 and finite."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import HookBase

    from resnest_backbone.d2.train import AutocastTrainer, Trainer
    from resnest_backbone.data.demo import DET_CLASSES, ensure_demo_data

    data = ensure_demo_data(str(tmp_path / "data"), spec=TINY_SPEC)
    name = "amp_test_det_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": list(DET_CLASSES)},
                            f"{data}/det/annotations/instances_train.json", f"{data}/det/train")
    cfg = _cfg("SOLVER.AMP.ENABLED", True, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 100,
               "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path / "out"),
               "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128, "SOLVER.IMS_PER_BATCH", 2,
               "SOLVER.WARMUP_ITERS", 1, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32)

    class Record(HookBase):
        def __init__(self):
            self.recorder, self.losses, self.conv_calls = OpRecorder(), [], []

        def before_step(self):
            self.counting = nn.modules.module.register_module_forward_hook(
                lambda module, args, out: self.conv_calls.append(module) if isinstance(module, nn.Conv2d) else None)
            self.recorder.__enter__()

        def after_step(self):
            self.recorder.__exit__(None, None, None)
            self.counting.remove()
            self.losses.append(self.trainer.storage.history("total_loss").latest())

    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, AutocastTrainer)
    record = Record()
    trainer.register_hooks([record])
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    model = trainer.model
    assert len(record.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in record.losses)
    radix = model.backbone.bottom_up.layer1[0].conv2.radix
    blocks = sum(len(getattr(model.backbone.bottom_up, s)) for s in ("layer1", "layer2", "layer3", "layer4"))
    assert radix == 2 and record.recorder.softmax == [torch.float32] * (3 * blocks)
    # every convolution (one per Conv2d call: trunk, FPN, RPN, box head) ran in bf16, but the RPN's two
    # predictors, kept in fp32 (core.precision.FP32_HEADS); the backward likewise
    names = {id(m): n for n, m in model.named_modules()}
    assert len(record.recorder.convolution) == len(record.conv_calls) > 3 * blocks
    dtypes = {}
    for module, ran in zip(record.conv_calls, record.recorder.convolution):
        dtypes.setdefault(names[id(module)], set()).add(ran)
    fp32, bf16 = torch.float32, torch.bfloat16
    fp32_heads = {"proposal_generator.rpn_head.objectness_logits", "proposal_generator.rpn_head.anchor_deltas"}
    assert {n for n, d in dtypes.items() if d != {(bf16, bf16)}} == fp32_heads, dtypes
    assert all(dtypes[n] == {(fp32, fp32)} for n in fp32_heads)
    assert {(bf16,) * 3, (fp32,) * 3} == set(record.recorder.convolution_backward)
    assert record.recorder.batch_norm and {s for _, s in record.recorder.batch_norm} == {torch.float32}
    assert torch.bfloat16 in {i for i, _ in record.recorder.batch_norm}
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    changed = [n for n, p in params.items() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("backbone.bottom_up.layer4") for n in changed)
    assert any(n.startswith("roi_heads.box_predictor") for n in changed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean.dtype == m.running_var.dtype == torch.float32
            assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()


@pytest.mark.slow
def test_detector_bf16_against_fp32():
    """A Faster R-CNN ResNeSt-50 FPN (the project's config, random weights with the well-conditioned random
    norms of test_fuse, FrozenBN / BN folded by deploy) on one 192x288 image: deploy(dtype=bf16) against the
    float32 model. FPN features per level within BF16_REL (relative); on the same proposals, the box
    predictor's class probabilities within 2e-3 absolute and its box deltas within BF16_REL (relative); the
    end-to-end outputs have float32 boxes and scores (the predictor and box decoding run in fp32)."""
    from detectron2.modeling import build_model

    from resnest_backbone.core.fuse import deploy

    cfg = _cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, config="faster_rcnn_resnest50_fpn.yaml")
    torch.manual_seed(0)
    model = randomize_norms(build_model(cfg)).eval()
    fp32 = deploy(model, channels_last=True)
    bf16 = deploy(model, channels_last=True, dtype=torch.bfloat16)
    assert "roi_heads.box_predictor" in [n for n, m in bf16.named_modules() if m._forward_pre_hooks]
    g = torch.Generator().manual_seed(1)
    image = (torch.rand(3, 192, 288, generator=g) * 255).round()
    inputs = [{"image": image, "height": 192, "width": 288}]
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        ref_features = model.backbone(images.tensor)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = bf16.backbone(images.tensor)
        errors = {k: rel_err(features[k], ref_features[k]) for k in ref_features}
        assert all(features[k].dtype == torch.bfloat16 for k in features)
        assert all(BF16_MIN < e < BF16_REL for e in errors.values()), errors

        proposals, _ = model.proposal_generator(images, ref_features)

        def predictions(net, feats):
            heads = net.roi_heads
            pooled = heads.box_pooler([feats[f] for f in heads.box_in_features],
                                      [p.proposal_boxes for p in proposals])
            return heads.box_predictor(heads.box_head(pooled))

        ref_scores, ref_deltas = predictions(model, ref_features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores, deltas = predictions(bf16, features)
        assert scores.dtype == deltas.dtype == torch.float32  # the predictor ran in fp32
        ref_probs, probs = ref_scores.softmax(-1), scores.softmax(-1)
        assert (probs - ref_probs).abs().max().item() < 2e-3
        assert BF16_MIN < rel_err(deltas, ref_deltas) < BF16_REL

        out = bf16(inputs)[0]["instances"]
        ref_out = fp32(inputs)[0]["instances"]
    assert len(out) > 0 and len(ref_out) > 0
    assert out.pred_boxes.tensor.dtype == out.scores.dtype == torch.float32
    assert torch.isfinite(out.pred_boxes.tensor).all() and torch.isfinite(out.scores).all()
