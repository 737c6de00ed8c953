"""Exact resume (resnest_backbone.d2.resume) either is exact or says, once and before training starts, what it
will not reproduce: a changed batch size, a checkpoint without the data stream state, a changed number of
processes, CUDA's non-deterministic kernels. A trainer whose own loader cannot be resumed is refused at start.
A mapper that keeps returning None fails naming the sample, instead of retrying forever."""
import logging
import os

import pytest
import torch

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.BASE_LR", "0.01", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "DATASETS.TEST", "()", "SEED", "1"]


def _cfg(out, *opts):
    from resnest_backbone.d2.train import get_resnest_cfg, merge_config

    cfg = get_resnest_cfg()
    merge_config(cfg, "demo_faster_rcnn_resnest.yaml", TINY + ["OUTPUT_DIR", str(out)] + [str(o) for o in opts])
    cfg.freeze()
    return cfg


def _train(trainer_class, cfg, resume=False):
    """Train; returns the resume module's warnings, each with the iteration count the run had reached then."""
    from detectron2.engine import HookBase

    steps, said = [], []

    class Count(HookBase):
        def before_step(self):
            steps.append(self.trainer.iter)

    handler = logging.Handler()
    handler.emit = lambda record: said.append((len(steps), record.getMessage()))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("resnest_backbone.d2.resume")
    logger.addHandler(handler)
    try:
        trainer = trainer_class(cfg)
        trainer.register_hooks([Count()])
        trainer.resume_or_load(resume=resume)
        trainer.train()
    finally:
        logger.removeHandler(handler)
    return said


def test_what_a_resume_will_not_reproduce_is_said_once_before_training(tmp_path):
    from resnest_backbone.d2.compat import TRAINER_SAVES_OPTIMIZER
    from resnest_backbone.d2.train import Trainer

    assert _train(Trainer, _cfg(tmp_path / "a", "SOLVER.MAX_ITER", 2)) == []  # a fresh CPU run: exact, silent

    # another batch size
    said = _train(Trainer, _cfg(tmp_path / "a", "SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", 4), resume=True)
    assert len(said) == 1 and said[0][0] == 0, said  # one warning, before the first step
    assert said[0][1].startswith("Exact resume: this run will not be bit-identical to an uninterrupted run:")
    assert "continues with 4 images per batch per process (the checkpoint's run used 2)" in said[0][1]

    # the checkpoint of two processes, resumed by one
    state = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)
    state["trainer"]["exact_resume"]["data"] *= 2
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / "model_final.pth")
    (tmp_path / "b" / "last_checkpoint").write_text("model_final.pth")
    said = _train(Trainer, _cfg(tmp_path / "b", "SOLVER.MAX_ITER", 4, "SOLVER.IMS_PER_BATCH", 4), resume=True)
    assert len(said) == 1 and said[0][0] == 0, said
    assert "data stream positions of 2 process(es), this run has 1" in said[0][1]

    # a checkpoint written without exact resume
    class Stock(Trainer):
        exact_resume = False

    assert _train(Stock, _cfg(tmp_path / "c", "SOLVER.MAX_ITER", 1)) == []
    said = _train(Trainer, _cfg(tmp_path / "c", "SOLVER.MAX_ITER", 2), resume=True)
    assert len(said) == 1 and said[0][0] == 0 and "has no data stream position or seed" in said[0][1], said
    # detectron2 v0.6's DefaultTrainer checkpoints no optimizer state (main does)
    assert ("has no optimizer state" in said[0][1]) == (not TRAINER_SAVES_OPTIMIZER)


def test_on_cuda_exact_resume_says_it_is_not_bit_exact():
    from resnest_backbone.d2.resume import exactness_notes

    assert exactness_notes("cpu", []) == []
    notes = exactness_notes("cuda:0", ["a restored difference"])
    assert notes[0] == "a restored difference" and len(notes) == 2
    assert "cuDNN's algorithm choice" in notes[1] and "roi_align" in notes[1] and "not bit-identical" in notes[1]


def test_a_trainer_with_a_loader_that_cannot_resume_is_refused_at_start(tmp_path):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer

    from resnest_backbone.d2 import ExactResumeMixin

    class UserTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg)

    class Exact(ExactResumeMixin, UserTrainer):
        pass

    with pytest.raises(TypeError, match="build_train_loader returned a .*build_resumable_train_loader"):
        _train(Exact, _cfg(tmp_path, "SOLVER.MAX_ITER", 1))
    assert not (tmp_path / "model_final.pth").exists()


def test_a_mapper_that_keeps_returning_none_fails_naming_the_sample():
    import itertools

    from detectron2.data.samplers import TrainingSampler

    from resnest_backbone.d2.resume import MAPPER_ATTEMPTS, ResumableTrainLoader

    dicts = [{"file_name": f"img_{i}.jpg", "width": 4, "height": 3} for i in range(6)]
    calls = []

    def skip_image_2(d):  # a mapper may skip a sample: another one takes its place
        calls.append(d["file_name"])
        return None if d["file_name"] == "img_2.jpg" else d

    batches = list(itertools.islice(ResumableTrainLoader(dicts, skip_image_2, TrainingSampler(6, seed=0), 2), 6))
    assert "img_2.jpg" in calls and all(d["file_name"] != "img_2.jpg" for b in batches for d in b)

    def broken(d):
        calls.append(d)
        assert len(calls) < 10_000, "retried forever"
        return None

    calls.clear()
    with pytest.raises(RuntimeError, match=r"returned None for dataset index \d+ \(file_name img_\d\.jpg\) and for "
                                           r"each of the \d+ samples drawn in its place \(stream position 0\)"):
        next(iter(ResumableTrainLoader(dicts, broken, TrainingSampler(6, seed=0), 2)))
    assert len(calls) == MAPPER_ATTEMPTS
