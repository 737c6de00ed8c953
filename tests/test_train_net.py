"""tools/train_net.py pieces: every project config builds its model; the trainer picks COCOEvaluator or
SemSegEvaluator from the dataset; COCO / ADE20K are read from $DETECTRON2_DATASETS with a clear error naming
the missing path; the ADE20K label conversion; the device decisions (a CUDA config without CUDA is an error
naming the fix, the process-group backend and --deploy int8 follow the config's device); a DeepLab config
without detectron2's DeepLab project names that import's error."""
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
from resnest_backbone.d2.train import (DeviceError, Trainer, adapt_cfg_to_device, check_deploy, check_device,
                                       get_resnest_cfg, launch, process_group_backend)

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(config, *opts):
    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
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
    assert launch(lambda x: x * 2, 1, args=(21,), device="cpu") == 42


def test_a_cuda_config_without_cuda_is_an_error_naming_the_fix():
    with pytest.raises(DeviceError, match="MODEL.DEVICE is 'cuda', but CUDA is not available.*add `MODEL.DEVICE cpu`"):
        check_device("cuda", cuda_available=False)
    with pytest.raises(DeviceError, match="add `train.device=cpu`"):
        check_device("cuda:1", "train.device", "train.device=cpu", cuda_available=False)
    assert check_device("cuda", cuda_available=True) == "cuda" and check_device("cpu", cuda_available=False) == "cpu"
    # the demo configs say cpu themselves
    for name in ("demo_faster_rcnn_resnest.yaml", "demo_deeplabv3_resnest.yaml"):
        cfg = get_resnest_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", name))
        assert cfg.MODEL.DEVICE == "cpu", name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the recipe's device is there")
def test_train_net_stops_on_a_cuda_recipe_without_cuda_and_writes_nothing(tmp_path):
    """A recipe (MODEL.DEVICE cuda, detectron2's default) on a machine without CUDA: tools/train_net.py exits
    with the one-line fix before any process starts or any file is written; no silent CPU run."""
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config", "faster_rcnn_resnest50_fpn.yaml",
           "--num-gpus", "2", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "train_net: error: MODEL.DEVICE is 'cuda', but CUDA is not available" in proc.stdout
    assert "add `MODEL.DEVICE cpu`" in proc.stdout and not out.exists()


def test_process_group_backend_and_int8_follow_the_configs_device():
    """`MODEL.DEVICE cpu --num-gpus N` on a GPU machine runs gloo (NCCL cannot carry CPU tensors); int8
    evaluation runs on the CPU, so it is refused up front for a CUDA model, naming the fix."""
    assert process_group_backend("cpu") == "gloo" and process_group_backend("cuda") == "nccl"
    assert process_group_backend("cuda:3") == "nccl"
    assert process_group_backend(None) == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(DeviceError, match="--deploy int8 runs on the CPU.*'cuda'.*add `MODEL.DEVICE cpu`"):
        check_deploy("int8", True, "cuda")
    with pytest.raises(DeviceError, match="add --eval-only"):
        check_deploy("fp32", False, "cpu")
    check_deploy("int8", True, "cpu")
    check_deploy("bf16", True, "cuda")
    check_deploy(None, False, "cuda")


DEEPLAB_MISSING = textwrap.dedent("""
    import sys
    sys.modules["detectron2.projects.deeplab"] = None  # a detectron2 without its DeepLab project
    from resnest_backbone.d2.model_zoo import get_config
    get_config("faster_rcnn_resnest50_fpn.yaml")  # a detection config needs no DeepLab key
    try:
        get_config("deeplabv3_resnest50_ade20k.yaml")
    except ImportError as exc:
        print("ERROR", exc)
""")


def test_a_deeplab_config_without_the_deeplab_project_names_its_import_error():
    proc = subprocess.run([sys.executable, "-c", DEEPLAB_MISSING], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR"))
    assert "deeplabv3_resnest50_ade20k.yaml: Non-existent config key: MODEL.SEM_SEG_HEAD." in line
    assert "DeepLab project, which defines it, did not import: import of detectron2.projects.deeplab halted" in line


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


def test_demo_data_finished_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two processes generating the same set (e.g. pytest-xdist workers): the one that finishes second keeps
    the first one's folder, which readers may already use, instead of replacing it."""
    from resnest_backbone.data import demo

    spec = dict(demo.DEFAULT_SPEC, det={"train": 1, "val": 1}, seg={"train": 1, "val": 1})
    write_det, seen = demo._write_det, {}

    def other_process_finishes_meanwhile(folder, spec_):
        monkeypatch.setattr(demo, "_write_det", write_det)
        seen["folder"] = demo.ensure_demo_data(str(tmp_path), spec)  # the other process, start to end
        seen["inode"] = os.stat(seen["folder"]).st_ino
        write_det(folder, spec_)

    monkeypatch.setattr(demo, "_write_det", other_process_finishes_meanwhile)
    assert demo.ensure_demo_data(str(tmp_path), spec) == seen["folder"]
    assert os.stat(seen["folder"]).st_ino == seen["inode"]  # the same folder, not a replacement
    assert not [p for p in os.listdir(os.path.dirname(seen["folder"])) if p.startswith(".resnest_demo.")]
