"""`make demo` at a tiny scale: tools/demo.py generates (or reuses) the data, trains, evaluates, and writes
its AP table and PNGs."""
import json
import math
import os
import subprocess
import sys

import cv2
import pytest

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_tiny(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--max-iter", "6", "--val-limit", "8",
           "--num-vis", "3", "--score-thresh", "0.0", "--output", str(out),
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
           "SOLVER.IMS_PER_BATCH", "2", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
           "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # progress while training, then the AP table
    assert "iter: 5" in proc.stdout and "| AP" in proc.stdout and "[demo] AP50" in proc.stdout

    summary = json.loads((out / "eval_results.json").read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
    bbox = summary["results"]["bbox"]
    assert set(["AP", "AP50", "AP75"]) <= set(bbox) and all(math.isfinite(bbox[k]) for k in ("AP", "AP50", "AP75"))
    assert summary["dataset"] == "resnest_demo_det_val_first8" and summary["max_iter"] == 6

    curve = cv2.imread(str(out / "loss_curve.png"))
    grid = cv2.imread(str(out / "val_predictions.png"))
    assert curve is not None and curve.shape[0] > 200 and curve.std() > 0
    assert grid is not None and grid.shape[:2] == (256, 3 * 256)  # 3 images of 128 px drawn at scale 2
    singles = sorted((out / "val_predictions").glob("*.png"))
    assert len(singles) == 3 and all(cv2.imread(str(p)) is not None for p in singles)
    assert (out / "model_final.pth").exists() and (out / "metrics.json").exists()
