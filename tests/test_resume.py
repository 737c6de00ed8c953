"""A training run killed with SIGKILL resumes (--resume) at the iteration of its last checkpoint, and no
checkpoint on disk is left unreadable (checkpoints are written to a temporary file, then renamed)."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml")
# The demo config at test scale: 64 px images, batch 2, few proposals.
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.BASE_LR", "0.01", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "DATASETS.TEST", "('resnest_demo_det_val_mini',)"]


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    return env


def _train_cmd(out, *extra):
    return [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG, *extra,
            *TINY, "OUTPUT_DIR", str(out)]


def _checkpoint_iteration(path):
    return torch.load(path, map_location="cpu", weights_only=True)["iteration"]


def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    # A long run, checkpointing every 4 iterations; killed once two checkpoints are on disk.
    first = subprocess.Popen(_train_cmd(out, "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "4"),
                             cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and first.poll() is None:
            if (out / "model_0000007.pth").exists():
                break
            time.sleep(0.2)
        assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        assert (out / "model_0000007.pth").exists(), "no checkpoint within the time limit"
        time.sleep(0.3)  # let it go on into the next checkpoint period: the kill lands mid-run
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, every checkpoint on disk is whole and last_checkpoint names one.
    checkpoints = sorted(out.glob("model_*.pth"))
    assert checkpoints
    for path in checkpoints:
        _checkpoint_iteration(path)
    last = (out / "last_checkpoint").read_text().strip()
    assert (out / last).exists()
    saved = _checkpoint_iteration(out / last)
    assert saved >= 7 and saved == max(_checkpoint_iteration(p) for p in checkpoints)
    state = torch.load(out / last, map_location="cpu", weights_only=True)
    trainer_state = state["trainer"]  # optimizer (momentum) and LR scheduler are in the checkpoint too
    assert trainer_state["_trainer"]["optimizer"]["state"] and trainer_state["iteration"] == saved
    assert trainer_state["hooks"]["LRScheduler"]["last_epoch"] == saved + 1

    # Resume: training continues at the iteration after the checkpoint and runs to MAX_ITER.
    max_iter = saved + 4
    resumed = subprocess.run(_train_cmd(out, "--resume", "SOLVER.MAX_ITER", str(max_iter),
                                        "SOLVER.CHECKPOINT_PERIOD", "4"),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"Loading from {out / last}" in resumed.stdout and f"Loading trainer from {out / last}" in resumed.stdout
    assert f"Starting training from iteration {saved + 1}" in resumed.stdout
    final = out / "model_final.pth"
    assert _checkpoint_iteration(final) == max_iter - 1
    # metrics.json: the resumed run's entries start after the checkpoint (none repeat the killed run's
    # iterations up to it), and it evaluated at the end.
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    iters = [r["iteration"] for r in rows if "total_loss" in r]
    assert iters[-1] == max_iter - 1
    assert any("bbox/AP50" in r for r in rows)

    # --eval-only on the final weights reads them back and reports COCO box AP.
    evaluated = subprocess.run(_train_cmd(out, "--eval-only", "MODEL.WEIGHTS", str(final)), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in evaluated.stdout
