"""The detectron2 recipe configs (Faster, Mask, Cascade, Cascade Mask R-CNN, DCN Faster R-CNN, Panoptic FPN;
S-50 and S-101) each train one step and evaluate on the generated demo data with detectron2's Trainer (a narrow
ResNeSt-14 trunk and 64 px images, so each takes seconds); TEST.PRECISE_BN recomputes the running statistics
of every norm the recipe trains (backbone, FPN, box / mask / semantic heads) to the statistics of the batches
it runs; the S-101 Faster R-CNN config builds its real architecture; the panoptic demo set is consistent (PNG
ids, segments_info, stuff labels, instance json)."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import resnest_backbone.d2  # noqa: F401  (registers the backbones and the demo sets)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.layers import FrozenBatchNorm2d
from resnest_backbone.core import SyncBatchNorm
from resnest_backbone.d2 import register_demo_subset
from resnest_backbone.d2.train import Trainer, adapt_cfg_to_device, get_resnest_cfg

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A narrow ResNeSt-14 and small heads at 64 px: the recipe's architecture and heads, seconds per run.
TINY = ["MODEL.DEVICE", "cpu", "MODEL.RESNEST.VARIANT", "resnest14d", "MODEL.RESNEST.STEM_WIDTH", "16",
        "MODEL.RESNEST.BOTTLENECK_WIDTH", "32", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "128", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "TEST.DETECTIONS_PER_IMAGE", "20",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "SEED", "0"]
DET = ["DATASETS.TRAIN", "('resnest_demo_det_train',)"]
PAN = ["DATASETS.TRAIN", "('resnest_demo_panoptic_train_separated',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"]

# config -> (variant the file asks for, ROI heads, mask head?, deformable stages, panoptic?)
RECIPES = {
    "faster_rcnn_resnest50_fpn.yaml": ("resnest50", "StandardROIHeads", False, False, False),
    "faster_rcnn_resnest101_fpn.yaml": ("resnest101", "StandardROIHeads", False, False, False),
    "mask_rcnn_resnest50_fpn.yaml": ("resnest50", "StandardROIHeads", True, False, False),
    "cascade_rcnn_resnest50_fpn.yaml": ("resnest50", "CascadeROIHeads", False, False, False),
    "cascade_mask_rcnn_resnest50_fpn.yaml": ("resnest50", "CascadeROIHeads", True, False, False),
    "cascade_mask_rcnn_resnest101_fpn.yaml": ("resnest101", "CascadeROIHeads", True, False, False),
    "faster_rcnn_resnest50_dcn_fpn.yaml": ("resnest50", "StandardROIHeads", False, True, False),
    "panoptic_fpn_resnest50_fpn.yaml": ("resnest50", "CascadeROIHeads", True, False, True),
    "panoptic_fpn_resnest101_fpn.yaml": ("resnest101", "CascadeROIHeads", True, False, True),
}


def recipe_cfg(config, tmp_path, *opts):
    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    file_variant = cfg.MODEL.RESNEST.VARIANT
    panoptic = cfg.MODEL.META_ARCHITECTURE == "PanopticFPN"
    # 6 val images, a subset of its own per config: COCOEvaluator points a subset's metadata json_file at the
    # COCO json it writes into the first run's output folder, which pytest removes after a passed test
    val = register_demo_subset("resnest_demo_panoptic_val_separated" if panoptic else "resnest_demo_det_val", 6,
                               config[:-len(".yaml")])
    cfg.merge_from_list(TINY + (PAN if panoptic else DET) + ["DATASETS.TEST", f"('{val}',)",
                                                              "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    adapt_cfg_to_device(cfg)
    return cfg, file_variant


def train_and_evaluate(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, trainer._last_eval_results  # DefaultTrainer's EvalHook result after the last iteration


def _check_ap(task_results):
    assert {"AP", "AP50", "AP75"} <= set(task_results), task_results
    assert all(0 <= task_results[k] <= 100 for k in ("AP", "AP50", "AP75")), task_results


@pytest.mark.parametrize("config", list(RECIPES))
def test_recipe_trains_one_step_and_evaluates(config, tmp_path, one_thread):
    variant, roi_heads, mask, deform, panoptic = RECIPES[config]
    cfg, file_variant = recipe_cfg(config, tmp_path, "TEST.PRECISE_BN.ENABLED", "False")
    # the recipe as written: SyncBN everywhere it trains a norm, 4conv1fc box head, RGB, PreciseBN
    assert file_variant == variant
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.FPN.NORM == "SyncBN"
    assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 1
    assert cfg.MODEL.ROI_BOX_HEAD.NORM == "naiveSyncBN"  # "SyncBN" in the file, adapted to the CPU
    assert cfg.INPUT.FORMAT == "RGB"
    raw = get_resnest_cfg()
    raw.merge_from_file(os.path.join(REPO, "configs", config))
    assert raw.TEST.PRECISE_BN.ENABLED and raw.INPUT.MIN_SIZE_TRAIN[0] == 640 and raw.INPUT.MIN_SIZE_TRAIN[-1] == 800
    # the official files: range-scale for the box-only and panoptic recipes, 640..800 in steps of 32 for the
    # (cascade) mask ones (detectron2's Base-RCNN-FPN scales)
    assert raw.INPUT.MIN_SIZE_TRAIN_SAMPLING == ("choice" if "mask_rcnn" in config else "range")
    assert len(raw.INPUT.MIN_SIZE_TRAIN) == (6 if "mask_rcnn" in config else 2)
    if roi_heads == "CascadeROIHeads":
        assert raw.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG and raw.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000
    if panoptic:
        assert raw.MODEL.SEM_SEG_HEAD.NORM == "SyncBN" and raw.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT == 0.5
        assert raw.DATASETS.TRAIN == ("coco_2017_train_panoptic_separated",)

    trainer, results = train_and_evaluate(cfg)
    model = trainer.model
    assert type(model).__name__ == ("PanopticFPN" if panoptic else "GeneralizedRCNN")
    assert type(model.roi_heads).__name__ == roi_heads and model.roi_heads.mask_on == mask
    if roi_heads == "CascadeROIHeads":
        assert len(model.roi_heads.box_predictor) == 3
        assert all(p.bbox_pred.out_features == 4 for p in model.roi_heads.box_predictor)  # class-agnostic
    deformable = [n for n, m in model.named_modules() if n.endswith("conv2_offset")]
    assert bool(deformable) == deform
    if deform:  # res3..res5 deformable, res2 not
        assert {n.split(".")[2] for n in deformable} == {"layer2", "layer3", "layer4"}

    # one real step: finite losses, the recipe's heads among them
    losses = {k: v.latest() for k, v in trainer.storage.histories().items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert math.isfinite(trainer.storage.history("total_loss").latest())
    assert ("loss_mask" in losses) == mask and ("loss_sem_seg" in losses) == panoptic
    if roi_heads == "CascadeROIHeads":
        assert {f"loss_box_reg_stage{i}" for i in range(3)} <= set(losses)

    # one real evaluation on the demo val images
    expected = ["bbox", "segm"] if mask else ["bbox"]
    if panoptic:
        # SemSegEvaluator (stuff), COCOEvaluator (things), COCOPanopticEvaluator (PQ through panopticapi, on the
        # subset's own panoptic json)
        expected = ["sem_seg", "panoptic_seg"] + expected
    assert sorted(results) == sorted(expected), results
    for task in expected:
        if task == "sem_seg":
            assert {"mIoU", "fwIoU", "mACC", "pACC"} <= set(results[task])
            assert {f"IoU-{c}" for c in ["things"] + ["noise", "stripes", "checkerboard", "gradient"]} <= set(
                results[task]), results[task]
        elif task == "panoptic_seg":
            pq = results[task]
            assert {f"{m}{k}" for m in ("PQ", "SQ", "RQ") for k in ("", "_th", "_st")} <= set(pq), pq
            assert all(0 <= v <= 100 for v in pq.values()), pq
        else:
            _check_ap(results[task])


def test_s101_recipe_builds_its_own_architecture():
    """faster_rcnn_resnest101_fpn.yaml as written, on the meta device (structure without values): the trunk
    has every tensor of the official resnest==0.0.5 ResNeSt-101 (names and shapes: 3-4-23-3, deep stem of
    width 64, radix 2, avd), SyncBN in trunk and FPN, the 4conv1fc SyncBN box head."""
    from detectron2.modeling import build_model
    from resnest.torch import resnest as official_resnest

    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "faster_rcnn_resnest101_fpn.yaml"))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
        official = official_resnest.resnest101()
    trunk = model.backbone.bottom_up
    def shapes(state):  # (FrozenBatchNorm2d, in the frozen stem and res2, has no step counter)
        return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}

    ours, theirs = shapes(trunk.state_dict()), shapes(official.state_dict())
    assert ours == {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert len(trunk.layer3) == 23 and trunk.conv1[0].out_channels == 64
    assert type(trunk.bn1) is FrozenBatchNorm2d and type(trunk.layer2[0].bn1) is SyncBatchNorm  # FREEZE_AT 2
    assert all(type(m) is SyncBatchNorm for n, m in model.backbone.named_modules() if n.startswith("fpn_")
               and isinstance(m, nn.modules.batchnorm._BatchNorm))
    head = model.roi_heads.box_head
    assert [type(m.norm).__name__ for m in head.conv_norm_relus] == ["SyncBatchNorm"] * 4 and len(head.fcs) == 1


def _bn_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class _Recorder:
    """Forward pre-hooks on every BatchNorm layer: the inputs of each call made in training mode."""

    def __init__(self, model):
        self.inputs = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in _bn_layers(model).items()]

    def _hook(self, name):
        def record(module, args):
            if module.training:
                self.inputs.setdefault(name, []).append(args[0].detach().double().clone())
        return record

    def remove(self):
        for h in self.handles:
            h.remove()


def _precise_stats(batches):
    """Mean and (biased) variance per channel over all values of the given batches: the population statistics
    PreciseBN estimates (fvcore's _PopulationVarianceEstimator), computed directly."""
    flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in batches], dim=1)
    mean = flat.mean(dim=1)
    return mean, ((flat - mean[:, None]) ** 2).mean(dim=1)


@pytest.mark.parametrize("config", ["cascade_mask_rcnn_resnest50_fpn.yaml", "panoptic_fpn_resnest50_fpn.yaml"])
def test_precise_bn_recomputes_every_trained_norm(config, tmp_path, one_thread):
    num_iter = 2
    cfg, _ = recipe_cfg(config, tmp_path, "TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER",
                        str(num_iter), "DATASETS.TEST", "()", "MODEL.BACKBONE.FREEZE_AT", "2")
    trainer = Trainer(cfg)
    model = trainer.model
    layers = _bn_layers(model)
    # the norms of the recipe, by kind: the core's SyncBatchNorm in the trunk and FPN, detectron2's
    # NaiveSyncBatchNorm ("SyncBN" on the CPU) in the heads; the frozen stem and res2 are FrozenBatchNorm2d
    assert any(n.startswith("backbone.bottom_up.") and type(m) is SyncBatchNorm for n, m in layers.items())
    assert any(n.startswith("backbone.fpn_") and type(m) is SyncBatchNorm for n, m in layers.items())
    assert any(n.startswith("roi_heads.box_head.") for n in layers)
    if "panoptic" in config:  # SyncBN semantic head; the mask head has no norm in the official panoptic recipe
        assert any(n.startswith("sem_seg_head.") for n in layers)
    else:
        assert any(n.startswith("roi_heads.mask_head.") for n in layers)
    assert isinstance(model.backbone.bottom_up.bn1, FrozenBatchNorm2d)
    assert [type(h).__name__ for h in trainer._hooks].count("ResNeStPreciseBN") == 1

    recorder = _Recorder(model)
    trainer.resume_or_load(resume=False)
    trainer.train()
    recorder.remove()
    # every trained norm ran once in the training step and once in each precise-BN pass
    assert set(recorder.inputs) == set(layers)
    for name, m in layers.items():
        calls = recorder.inputs[name]
        assert len(calls) == 1 + num_iter, (name, len(calls))
        mean, var = _precise_stats(calls[1:])
        assert torch.allclose(m.running_mean.double(), mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(m.running_var.double(), var, rtol=1e-4, atol=1e-5), name
        # and not what the training step's momentum update had left (0.9 * init + 0.1 * batch)
        step_mean, _ = _precise_stats(calls[:1])
        assert not torch.allclose(m.running_mean.double(), 0.1 * step_mean, rtol=1e-3, atol=1e-6), name


def test_precise_bn_keeps_the_stats_of_norms_it_cannot_recompute(tmp_path, one_thread, caplog):
    """At 1 image per process the split-attention norm after the global pool normalises with its running
    statistics and does not run its forward: fvcore would set its running mean and variance to 0."""
    cfg, _ = recipe_cfg("cascade_rcnn_resnest50_fpn.yaml", tmp_path, "SOLVER.IMS_PER_BATCH", "1",
                        "TEST.PRECISE_BN.ENABLED", "True", "TEST.PRECISE_BN.NUM_ITER", "2", "DATASETS.TEST", "()")
    trainer = Trainer(cfg)
    layers = _bn_layers(trainer.model)
    pooled = [n for n in layers if n.endswith("conv2.bn1")]
    assert pooled
    before = {}

    class Snapshot(HookBase):  # the stats the training step left, before PreciseBN
        def after_step(self):
            before.update({n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers.items()})

    trainer.register_hooks([Snapshot()])
    trainer._hooks.insert(0, trainer._hooks.pop())  # before PreciseBN's after_step
    with caplog.at_level(logging.WARNING, logger="resnest_backbone.d2.hooks"):
        trainer.resume_or_load(resume=False)
        trainer.train()
    for name in pooled:
        mean, var = before[name]
        assert torch.equal(layers[name].running_mean, mean) and torch.equal(layers[name].running_var, var), name
        assert (layers[name].running_var > 0).all()
    others = [n for n in layers if n not in pooled and not n.startswith("roi_heads")]
    assert any(not torch.equal(layers[n].running_mean, before[n][0]) for n in others)  # those were recomputed
    assert any("PreciseBN" in r.message and "conv2.bn1" in r.message for r in caplog.records)


def test_panoptic_demo_set_is_consistent():
    """The generated panoptic set: every pixel in one segment, segments_info areas / boxes / categories as the
    PNG says, the stuff PNG = the panoptic PNG through detectron2's separated mapping, things = the instance
    json's annotations; and the registered dicts carry both."""
    import cv2

    dicts = DatasetCatalog.get("resnest_demo_panoptic_val_separated")
    meta = MetadataCatalog.get("resnest_demo_panoptic_val_separated")
    with open(meta.panoptic_json) as f:
        pan = json.load(f)
    with open(meta.json_file) as f:
        inst = json.load(f)
    cats = {c["id"]: c for c in pan["categories"]}
    assert sorted(c["name"] for c in cats.values() if c["isthing"]) == sorted(meta.thing_classes)
    assert len(dicts) == len(pan["annotations"]) == len(inst["images"]) > 0
    by_image = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for d, ann in zip(dicts[:10], pan["annotations"][:10]):
        assert d["image_id"] == ann["image_id"] and os.path.isfile(d["file_name"])
        rgb = cv2.imread(os.path.join(meta.panoptic_root, ann["file_name"]))[:, :, ::-1].astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segments = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids)) == set(segments)  # no void pixel, no segment without pixels
        semantic = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        expected = np.full(ids.shape, 255, np.int64)
        for sid, s in segments.items():
            mask = ids == sid
            ys, xs = np.nonzero(mask)
            assert s["area"] == mask.sum() and s["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                                                             ys.max() + 1 - ys.min()]
            expected[mask] = 0 if cats[s["category_id"]]["isthing"] else meta.stuff_dataset_id_to_contiguous_id[
                s["category_id"]]
        assert np.array_equal(semantic, expected)
        things = sorted((s["category_id"], s["area"]) for s in ann["segments_info"]
                        if cats[s["category_id"]]["isthing"])
        assert things == sorted((a["category_id"], a["area"]) for a in by_image.get(ann["image_id"], []))
        assert sorted(meta.thing_classes[a["category_id"]] for a in d["annotations"]) == sorted(
            cats[c]["name"] for c, _ in things)


def test_panoptic_quality_of_the_ground_truth_is_100(tmp_path):
    """detectron2's COCOPanopticEvaluator (panopticapi's pq_compute) on a demo subset, given the ground truth as
    the model's output (segment ids, contiguous categories as PanopticFPN emits them): PQ, SQ, RQ all 100 for
    things and stuff. Checks the panoptic set, its category mapping and the subset's own panoptic json."""
    import cv2
    from detectron2.evaluation import COCOPanopticEvaluator

    name = register_demo_subset("resnest_demo_panoptic_val_separated", 5, "pq_check")
    dicts = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    with open(meta.panoptic_json) as f:
        pan = json.load(f)
    assert sorted(im["id"] for im in pan["images"]) == sorted(d["image_id"] for d in dicts)
    cats = {c["id"]: c for c in pan["categories"]}
    evaluator = COCOPanopticEvaluator(name, str(tmp_path))
    evaluator.reset()
    for ann in pan["annotations"]:
        rgb = cv2.imread(os.path.join(meta.panoptic_root, ann["file_name"]))[:, :, ::-1].astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        segments = []
        for s in ann["segments_info"]:
            thing = bool(cats[s["category_id"]]["isthing"])
            mapping = meta.thing_dataset_id_to_contiguous_id if thing else meta.stuff_dataset_id_to_contiguous_id
            segments.append({"id": s["id"], "isthing": thing, "category_id": mapping[s["category_id"]]})
        d = next(d for d in dicts if d["image_id"] == ann["image_id"])
        evaluator.process([{"image_id": d["image_id"], "file_name": d["file_name"]}],
                          [{"panoptic_seg": (torch.from_numpy(ids).int(), segments)}])
    result = evaluator.evaluate()["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert result[key] == pytest.approx(100.0), (key, result)
