"""mmengine Runner, IterBasedTrainLoop: a run killed with SIGKILL after a checkpoint and resumed with
`resume=True` ends with the same weights, bit for bit, as the same run never interrupted, with every
iteration done once on the same data -- with resnest_backbone.mm.resume.ExactResumeHook in custom_hooks.

The model is the project's demo Faster R-CNN (configs/mmdet/faster-rcnn_resnest14d_fpn_demo.py: ResNeSt-14d
trunk with SyncBN, multi-scale RandomResize and RandomFlip in the pipeline, mmdet's random RPN / R-CNN
sampling) on a few generated images, batch 2, on the CPU. Checkpoints are written by mmengine and read back
(resume, and the comparison here) through the project's weights-only loader (resnest_backbone.mm.compat)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")

import torch  # noqa: E402

from conftest import tensors_of  # noqa: E402
from resnest_backbone.data.demo import ensure_demo_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"version": 1, "seed": 7, "size": 128, "det": {"train": 6, "val": 2}, "seg": {"train": 2, "val": 1},
        "min_object": 20, "max_object": 56, "max_objects": 3}
ITERS, INTERVAL, KILL_AT = 12, 4, 10  # checkpoints iter_4, iter_8, iter_12; killed before iteration 10

# One training run in a fresh process. A recorder hook (highest priority: before the CheckpointHook) appends
# each iteration's number, loss and images (file, flip, scale) to a JSON-lines file, and SIGKILLs the process
# at the start of iteration KILL_AT when asked.
RUN = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

args = json.loads(sys.argv[1])
cfg = Config.fromfile(os.path.join({root!r}, "configs", "mmdet", "faster-rcnn_resnest14d_fpn_demo.py"))
cfg.train_dataloader.dataset.data_root = args["data"]
cfg.work_dir = args["work_dir"]
cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=args["iters"], val_interval=10 ** 9)
cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4),
                       dict(type="MultiStepLR", by_epoch=False, begin=0, end=args["iters"], milestones=[9])]
cfg.optim_wrapper.optimizer.lr = 0.01
cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=args["interval"])
cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
cfg.log_processor = dict(by_epoch=False)
cfg.train_dataloader.batch_size = 2
cfg.train_dataloader.num_workers = args.get("workers", 0)
cfg.randomness = dict(seed=0)
cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
import resnest_backbone.mm.resume  # what custom_imports=[..., 'resnest_backbone.mm.resume'] does in a config file
cfg.custom_hooks = [dict(type="ExactResumeHook")] if args["exact"] else []
cfg.resume = args["resume"]


class Record(Hook):
    priority = "HIGHEST"

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter == args["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        images = [[os.path.basename(s.img_path), bool(s.flip), list(s.img_shape)] for s in data_batch["data_samples"]]
        row = dict(iter=runner.iter, loss=float(outputs["loss"]), images=images)
        with open(args["record"], "a") as f:
            f.write(json.dumps(row) + "\\n")


runner = Runner.from_cfg(cfg)
runner.register_hook(Record())
runner.train()
"""


@pytest.fixture(scope="module")
def tiny_det(tmp_path_factory):
    return os.path.join(ensure_demo_data(str(tmp_path_factory.mktemp("data")), spec=TINY), "det") + os.sep


def _run(tmp_path, data, work_dir, name, *, resume=False, kill_at=-1, exact=True):
    script = tmp_path / "run_mm.py"
    script.write_text(RUN.format(root=ROOT))
    args = dict(data=data, work_dir=str(work_dir), iters=ITERS, interval=INTERVAL, resume=resume, kill_at=kill_at,
                exact=exact, record=str(tmp_path / f"{name}.jsonl"))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    path = tmp_path / f"{name}.jsonl"
    rows = [json.loads(line) for line in open(path)] if path.exists() else []
    return proc, rows


def _killed_and_resumed(tmp_path, data, name, exact=True):
    work_dir = tmp_path / name
    killed, before = _run(tmp_path, data, work_dir, f"{name}_1", kill_at=KILL_AT, exact=exact)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert (work_dir / "last_checkpoint").read_text().strip().endswith("iter_8.pth")
    assert not (work_dir / f"iter_{ITERS}.pth").exists()
    resumed, after = _run(tmp_path, data, work_dir, f"{name}_2", resume=True, exact=exact)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    return work_dir, before, after, resumed.stdout


def _tensors(path):
    """Every tensor of an mmengine checkpoint by its path of keys, read with the project's safe loader."""
    import resnest_backbone.mm  # noqa: F401  (installs the loader)
    from mmengine.runner.checkpoint import CheckpointLoader

    checkpoint = CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    return tensors_of({k: checkpoint[k] for k in ("state_dict", "optimizer", "param_schedulers")}), checkpoint


@pytest.mark.slow
def test_mmengine_sigkill_and_resume_is_bit_identical_to_an_uninterrupted_run(tiny_det, tmp_path):
    uninterrupted, rows_a = _run(tmp_path, tiny_det, tmp_path / "a", "a")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    work_dir, before, after, log = _killed_and_resumed(tmp_path, tiny_det, "b")

    # Killed at the start of iteration 10, after the checkpoint at 8 (meta iter 8): the resumed run starts
    # at iteration 8 (0-based), after replaying the first 8 batches, and ends at ITERS.
    assert [r["iter"] for r in before] == list(range(KILL_AT))
    assert "resumed epoch: 0, iter: 8" in log and "Advance dataloader 8 steps" in log
    # Each iteration exactly once, on the same images (file, flip, scale) and with the same loss as the
    # uninterrupted run.
    history = [r for r in before if r["iter"] < 8] + after
    assert [r["iter"] for r in history] == list(range(ITERS)) == [r["iter"] for r in rows_a]
    assert [r["iter"] for r in after] == list(range(8, ITERS))

    final_a, ckpt_a = _tensors(tmp_path / "a" / f"iter_{ITERS}.pth")
    final_b, ckpt_b = _tensors(work_dir / f"iter_{ITERS}.pth")
    assert ckpt_a["meta"]["iter"] == ckpt_b["meta"]["iter"] == ITERS and ckpt_a["meta"]["seed"] == 0
    assert final_a.keys() == final_b.keys()
    assert any("running_var" in k for k in final_a) and any(k.startswith("/optimizer/state/") for k in final_a)
    different = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not different, (f"{len(different)} tensors differ, e.g. {different[:5]}; max |a - b| = "
                           f"{max((final_a[k] - final_b[k]).abs().max().item() for k in different):.3g}")
    assert ckpt_a["param_schedulers"] == ckpt_b["param_schedulers"]
    assert [r["images"] for r in history] == [r["images"] for r in rows_a]
    assert [r["loss"] for r in history] == [r["loss"] for r in rows_a]
