"""tools/train_net.py pieces: every project config builds its model; the trainer picks COCOEvaluator or
SemSegEvaluator from the dataset; COCO / ADE20K are read from $DETECTRON2_DATASETS with a clear error naming
the missing path; the ADE20K label conversion; the CPU launch fallback."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import resnest_backbone.d2  # noqa: F401  (registers the backbones and the demo sets)
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.modeling import build_model
from resnest_backbone.d2.train import Trainer, adapt_cfg_to_device, get_resnest_cfg, launch

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(config, *opts):
    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(list(opts))
    adapt_cfg_to_device(cfg)
    return cfg


@pytest.mark.parametrize("config,meta_arch", [
    ("mask_rcnn_resnest50_fpn.yaml", "GeneralizedRCNN"),
    ("cascade_rcnn_resnest50_fpn.yaml", "GeneralizedRCNN"),
    ("retinanet_resnest50_fpn.yaml", "RetinaNet"),
])
def test_detection_configs_build_and_run(config, meta_arch):
    cfg = _cfg(config, "MODEL.RESNEST.VARIANT", "resnest14d", "INPUT.MIN_SIZE_TEST", "64")
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.INPUT.FORMAT == "RGB"
    model = build_model(cfg).eval()
    assert type(model).__name__ == meta_arch
    assert type(model.backbone.bottom_up).__name__ == "ResNeStBackbone"
    if config.startswith("mask"):
        assert model.roi_heads.mask_on
    if config.startswith("cascade"):
        assert type(model.roi_heads).__name__ == "CascadeROIHeads" and len(model.roi_heads.box_predictor) == 3
    if config.startswith("retinanet"):
        assert sorted(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 80)).float(), "height": 64, "width": 80}])
    assert "instances" in out[0]


def test_evaluator_follows_the_dataset(tmp_path):
    det = _cfg("demo_faster_rcnn_resnest.yaml", "OUTPUT_DIR", str(tmp_path))
    seg = _cfg("demo_deeplabv3_resnest.yaml", "OUTPUT_DIR", str(tmp_path))
    evaluator = Trainer.build_evaluator(det, "resnest_demo_det_val")
    assert isinstance(evaluator, COCOEvaluator) and evaluator._use_fast_impl is False  # no C++ extension here
    assert isinstance(Trainer.build_evaluator(seg, "resnest_demo_seg_val"), SemSegEvaluator)


def test_cpu_launch_single_process_runs_in_place():
    assert launch(lambda x: x * 2, 1, args=(21,), backend="gloo") == 42


MISSING = textwrap.dedent("""
    import os, sys
    import numpy as np, cv2
    from resnest_backbone.d2 import DatasetMissingError, check_datasets
    from resnest_backbone.data import prepare_ade20k
    root = os.environ["DETECTRON2_DATASETS"]
    for name in ["coco_2017_val", "ade20k_sem_seg_val"]:
        try:
            check_datasets([name])
        except DatasetMissingError as e:
            print("ERROR", name, str(e).replace(chr(10), " | "))
    # the official ADE20K layout without detectron2's label folder
    ade = os.path.join(root, "ADEChallengeData2016")
    for split in ["training", "validation"]:
        os.makedirs(os.path.join(ade, "images", split))
        os.makedirs(os.path.join(ade, "annotations", split))
        cv2.imwrite(os.path.join(ade, "images", split, "ADE_x_00000001.jpg"), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(os.path.join(ade, "annotations", split, "ADE_x_00000001.png"),
                    np.array([[0, 1, 150, 7]], np.uint8))
    try:
        check_datasets(["ade20k_sem_seg_val"])
    except DatasetMissingError as e:
        print("ERROR2", str(e).replace(chr(10), " | "))
    prepare_ade20k()
    check_datasets(["ade20k_sem_seg_train", "ade20k_sem_seg_val"])
    labels = cv2.imread(os.path.join(ade, "annotations_detectron2", "validation", "ADE_x_00000001.png"),
                        cv2.IMREAD_UNCHANGED)
    print("LABELS", labels.tolist())
""")


def test_missing_datasets_are_named_and_ade20k_is_prepared(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", MISSING], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines() if line.startswith(("ERROR", "LABELS"))}
    coco, ade = [line for line in proc.stdout.splitlines() if line.startswith("ERROR ")]
    assert f"{tmp_path}/coco/annotations/instances_val2017.json does not exist" in coco
    assert f"DETECTRON2_DATASETS={tmp_path}" in coco and "instances_{train,val}2017.json" in coco
    assert f"{tmp_path}/ADEChallengeData2016/images/validation does not exist" in ade
    assert "annotations_detectron2" in ade
    assert "resnest_backbone.data.prepare_ade20k" in lines["ERROR2"]  # official labels there: how to convert
    assert lines["LABELS"] == "LABELS [[255, 0, 149, 6]]"  # 0 (other) -> ignore, 1..150 -> 0..149


def test_demo_data_is_deterministic(tmp_path):
    from resnest_backbone.data.demo import DEFAULT_SPEC, ensure_demo_data

    spec = dict(DEFAULT_SPEC, det={"train": 3, "val": 2}, seg={"train": 2, "val": 1}, pan={"train": 2, "val": 1})
    a = ensure_demo_data(str(tmp_path / "a"), spec)
    b = ensure_demo_data(str(tmp_path / "b"), spec)
    for rel in ["det/annotations/instances_train.json", "det/val/00001.jpg",
                "ADEChallengeData2016/annotations_detectron2/training/ADE_demo_train_00000001.png",
                "panoptic/annotations/panoptic_train.json", "panoptic/annotations/instances_val.json",
                "panoptic/panoptic_train/00001.png", "panoptic/panoptic_stuff_train/00001.png",
                "panoptic/val/00000.jpg"]:
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read()
    mtime = os.path.getmtime(os.path.join(a, "spec.json"))
    assert ensure_demo_data(str(tmp_path / "a"), spec) == a and os.path.getmtime(os.path.join(a, "spec.json")) == mtime
    import cv2

    labels = cv2.imread(os.path.join(a, "ADEChallengeData2016/annotations/training/ADE_demo_train_00000000.png"),
                        cv2.IMREAD_UNCHANGED)
    assert labels.min() >= 1 and set(np.unique(labels)) <= {1, 2, 3, 4}  # ADE: 1 = background, shapes 2..4
