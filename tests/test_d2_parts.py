"""The training parts work in upstream detectron2's own tools/train_net.py (the unmodified file shipped with the
detectron2 line under test, as tests/test_upstream_tools.py finds it), added from outside the way a user adds
them: a subclass of its Trainer with the mixins, and its `setup` / `Trainer` / `DetectionCheckpointer` names
assigned in the test; then the tool's own `main(args)` runs.

- exact resume (ExactResumeMixin alone): 3 iterations, a checkpoint, `--resume` to 6 ends with the weights,
  optimizer and data position of an uninterrupted 6-iteration run, bit for bit (control: without the mixin
  they differ);
- the DropBlock ramp (ResNeStHooksMixin, from MODEL.RESNEST.DROPBLOCK_PROB) gives each iteration its value,
  across the resume;
- the guards (DeviceTrainerMixin's checkpointer for training, SafeDetectionCheckpointer under the tool's
  DetectionCheckpointer name for --eval-only): an ImageNet trunk on a BGR config warns about the input format
  at load; evaluated, it warns about random heads; trained from, it does not."""
import argparse
import contextlib
import logging
import os
import sys

import pytest
import torch

from conftest import load_file, tensors_of

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(sys.prefix, "detectron2-tools", "train_net.py")
TINY = ["MODEL.RESNEST.VARIANT", "resnest14d", "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.01", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "DATASETS.TEST", "()", "SEED", "3"]
N = 3  # iterations before the checkpoint; the whole run has 2N

if not os.path.isfile(TOOL):
    pytest.skip(f"upstream detectron2's tools are not kept beside this environment ({TOOL}): "
                "tools/env/setup_env.sh puts them there", allow_module_level=True)


def upstream_train_net():
    """A fresh module object of the unmodified tools/train_net.py (its names are the test's to assign)."""
    return load_file(TOOL, "upstream_train_net")


def config(*opts):
    """The demo config at test scale, seeded as default_setup seeds a run (the tool's `setup`, replaced)."""
    from detectron2.utils.env import seed_all_rng

    from resnest_backbone.d2.train import get_resnest_cfg, merge_config

    cfg = get_resnest_cfg()
    merge_config(cfg, "demo_faster_rcnn_resnest.yaml", TINY + [str(o) for o in opts])
    cfg.freeze()
    seed_all_rng(cfg.SEED)
    return cfg


def run_main(trainer_class, cfg, **args):
    """The tool's own main(args), with its Trainer and setup assigned."""
    tool = upstream_train_net()
    tool.Trainer = trainer_class
    tool.setup = lambda _: cfg
    return tool.main(argparse.Namespace(**{"eval_only": False, "resume": False, **args}))


def recording(base):
    """`base` with a hook appended that records, per iteration, the DropBlock values and the total loss."""
    from detectron2.engine import HookBase

    from resnest_backbone.core.dropblock import DropBlock2D

    rows = []

    class Record(HookBase):
        def before_step(self):
            rows.append({"iter": self.trainer.iter, "drop": sorted(
                {m.drop_prob for m in self.trainer.model.modules() if isinstance(m, DropBlock2D)})})

        def after_step(self):
            rows[-1]["loss"] = self.trainer.storage.history("total_loss").latest()

    class Recorded(base):
        def build_hooks(self):
            return super().build_hooks() + [Record()]

    return Recorded, rows


def final_tensors(out):
    return tensors_of(torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True))


def test_exact_resume_and_dropblock_in_upstream_train_net(tmp_path):
    from resnest_backbone.d2 import ExactResumeMixin, ResNeStHooksMixin

    tool = upstream_train_net()

    class Trainer(ExactResumeMixin, ResNeStHooksMixin, tool.Trainer):
        pass

    dropblock = ["MODEL.RESNEST.DROPBLOCK_PROB", 0.1, "MODEL.RESNEST.DROPBLOCK_RAMP_ITERS", 4]
    whole, rows_a = recording(Trainer)
    run_main(whole, config(*dropblock, "SOLVER.MAX_ITER", 2 * N, "OUTPUT_DIR", tmp_path / "a"))
    out = tmp_path / "b"
    first, rows_b = recording(Trainer)
    run_main(first, config(*dropblock, "SOLVER.MAX_ITER", N, "OUTPUT_DIR", out))
    resumed, rows_c = recording(Trainer)
    run_main(resumed, config(*dropblock, "SOLVER.MAX_ITER", 2 * N, "OUTPUT_DIR", out), resume=True)

    # the ramp: iteration i trains with 0.1 * min((i + 1) / 4, 1), resumed or not
    assert [r["iter"] for r in rows_a] == list(range(2 * N)) == [r["iter"] for r in rows_b + rows_c]
    assert [r["drop"] for r in rows_a] == [[pytest.approx(0.1 * min((i + 1) / 4, 1))] for i in range(2 * N)]
    assert [r["drop"] for r in rows_b + rows_c] == [r["drop"] for r in rows_a]
    # exact resume: every loss, and the final weights, BN statistics, optimizer state, LR scheduler and data
    # stream position, bit for bit
    assert [r["loss"] for r in rows_b + rows_c] == [r["loss"] for r in rows_a]
    a, b = final_tensors(tmp_path / "a"), final_tensors(out)
    assert a.keys() == b.keys() and any(k.startswith("/trainer/_trainer/optimizer/state/") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    state_a, state_b = (torch.load(os.path.join(o, "model_final.pth"), weights_only=True)["trainer"]
                        for o in (tmp_path / "a", out))
    assert state_a["exact_resume"] == state_b["exact_resume"] and state_a["hooks"] == state_b["hooks"]

    # control: the tool's Trainer without ExactResumeMixin does not resume exactly (the comparison can fail)
    plain = tmp_path / "plain"

    class Plain(ResNeStHooksMixin, tool.Trainer):
        pass

    run_main(Plain, config(*dropblock, "SOLVER.MAX_ITER", N, "OUTPUT_DIR", plain))
    run_main(Plain, config(*dropblock, "SOLVER.MAX_ITER", 2 * N, "OUTPUT_DIR", plain), resume=True)
    c = final_tensors(plain)
    assert [k for k in a if k.startswith("/model/") and not torch.equal(a[k], c[k])]


@contextlib.contextmanager
def guard_messages():
    """The guards' warnings (detectron2's logger, which does not propagate to the root once set up)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("detectron2.resnest_backbone")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_guards_in_upstream_train_net(tmp_path):
    from detectron2.modeling import build_model

    from resnest_backbone.d2 import DeviceTrainerMixin, SafeDetectionCheckpointer

    # an ImageNet-style file: the bare trunk in official names
    trunk = tmp_path / "trunk.pth"
    torch.save(build_model(config()).backbone.bottom_up.state_dict(), trunk)
    bgr = ["INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[103.53, 116.28, 123.675]", "MODEL.PIXEL_STD", "[1, 1, 1]",
           "MODEL.WEIGHTS", trunk]
    tool = upstream_train_net()

    class Trainer(DeviceTrainerMixin, tool.Trainer):
        pass

    with guard_messages() as trained:  # training from the trunk: the input warning, no random-heads warning
        run_main(Trainer, config(*bgr, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", tmp_path / "train"))
    assert any("INPUT FORMAT" in m and "INPUT.FORMAT is 'BGR': set 'RGB'" in m for m in trained), trained
    assert not any("RANDOM HEADS" in m for m in trained)

    # --eval-only: the tool's own eval path, with SafeDetectionCheckpointer under its DetectionCheckpointer name
    tool = upstream_train_net()
    tool.DetectionCheckpointer = SafeDetectionCheckpointer
    tool.setup = lambda _: config(*bgr, "DATASETS.TEST", "('resnest_demo_det_val_mini',)",
                                  "OUTPUT_DIR", tmp_path / "eval")
    with guard_messages() as evaluated:
        tool.main(argparse.Namespace(eval_only=True, resume=False))
    assert any("INPUT FORMAT" in m for m in evaluated), evaluated
    assert any("RANDOM HEADS" in m and "roi_heads" in m for m in evaluated), evaluated
