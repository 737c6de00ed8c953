"""Two processes on the CPU (gloo backend) through tools/train_net.py --num-gpus 2: DDP training with SyncBN
in the ResNeSt backbone and FPN; both ranks finish and the (all-reduced) losses are finite."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml")


@pytest.mark.slow
def test_two_process_cpu_run_with_syncbn(tmp_path):
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG,
           "--num-gpus", "2", "--dist-url", "auto",
           "MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM", "SyncBN", "MODEL.ROI_BOX_HEAD.NORM", "SyncBN",
           "MODEL.ROI_BOX_HEAD.NUM_CONV", "1", "MODEL.ROI_BOX_HEAD.CONV_DIM", "32",
           "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.01",
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "DATASETS.TEST", "()",
           "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
           "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    log0 = (out / "log.txt").read_text()
    log1 = (out / "log.txt.rank1").read_text()
    assert "World size: 2" in log0 and "Rank of current process: 1. World size: 2" in log1
    # SyncBN in the trunk and FPN is the ResNeSt core's (all-reduce on gloo); the box head's became
    # detectron2's naiveSyncBN (torch's SyncBatchNorm needs CUDA).
    assert "SyncBatchNorm" in log0 and "NaiveSyncBatchNorm" in log0
    for log in (log0, log1):  # each rank ran to the end of training
        assert "Starting training from iteration 0" in log and "Overall training speed:" in log
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert rows[-1]["iteration"] == 3
    assert (out / "model_final.pth").exists()
