"""DropBlock as Ghiasi et al. 2018 define it (seeds only where a whole block fits, gamma of eq. 1, per-batch
rescaling), its placement in the trunk, and its linear ramp: DropBlockScheduler, the detectron2 hook (driven by
a real detectron2 training loop, resumed) and the mmengine hook (registry, minimal runner, real Runner run
and resume).

Statistics: the masks of different (sample, channel) maps are independent, so the standard error of a dropped
fraction is the standard deviation of the per-map fractions / sqrt(number of maps); the tests allow 5 of
them. The measured fraction is compared with the exact expectation 1 - (1 - gamma)^(seeds covering a unit),
which is below drop_prob by the overlap of blocks (gamma ignores it); against drop_prob the tests allow
5 SE + that overlap bias (reported per case in the parameter list)."""
import os
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import require
from resnest_backbone.core import (DropBlock2D, DropBlockScheduler, build_resnest, dropblock_gamma,
                                   expected_drop_fraction)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dropped(module, shape, seed):
    """0/1 map of the dropped units for a positive input (an output is 0 exactly where dropped)."""
    torch.manual_seed(seed)
    x = torch.rand(shape) + 0.5
    return (module(x) == 0).float()


def _whole_blocks(zero, block):
    """The union of all block x block windows, inside the map, that are entirely in `zero`."""
    inside = -F.max_pool2d(-zero, block, stride=1)  # (H-b+1) x (W-b+1): window entirely dropped
    return F.max_pool2d(F.pad(inside, [block - 1] * 4), block, stride=1)


# (maps, H, W, block_size, drop_prob). Exact expectation / overlap bias (drop_prob - expectation):
# 8x8: 0.0947 / 0.0053, 14x14: 0.0951 / 0.0049, 9x11 bs5: 0.1358 / 0.0142, 3x3 (one block fits): 0.2 / 0,
# 32x32: 0.0954 / 0.0046. The old implementation (seeds everywhere, blocks cropped at the borders) measured
# 0.139, 0.683, 0.279 and 0.104 on the 8x8, 3x3, 9x11 and 32x32 cases.
FRACTION_CASES = [(16384, 8, 8, 3, 0.1), (8192, 14, 14, 3, 0.1), (16384, 9, 11, 5, 0.15),
                  (65536, 3, 3, 3, 0.2), (2048, 32, 32, 3, 0.1)]


@pytest.mark.parametrize("maps,height,width,block,prob", FRACTION_CASES)
def test_dropped_fraction(maps, height, width, block, prob):
    dropped = _dropped(DropBlock2D(prob, block).train(), (maps // 64, 64, height, width), seed=maps + height)
    per_map = dropped.mean(dim=(2, 3)).flatten()
    measured = per_map.mean().item()
    se = per_map.std().item() / per_map.numel() ** 0.5
    expected = expected_drop_fraction(prob, block, height, width)
    assert se < 0.002  # the test can tell
    assert abs(measured - expected) < 5 * se, (measured, expected, se)
    overlap_bias = max(prob - expected, 0.0)
    assert -1e-12 < prob - expected < 0.1 * prob
    assert abs(measured - prob) < 5 * se + overlap_bias, (measured, prob, se, overlap_bias)


def test_gamma_is_eq1_of_the_paper():
    assert dropblock_gamma(0.1, 3, 8, 8) == pytest.approx(0.1 / 9 * 64 / 36)
    assert dropblock_gamma(0.15, 5, 9, 11) == pytest.approx(0.15 / 25 * 99 / (5 * 7))
    assert dropblock_gamma(0.2, 7, 3, 3) == pytest.approx(0.2)  # clamped: block 3, one seed position
    # without overlaps the paper's gamma gives drop_prob exactly: a 1-unit block is dropout
    assert expected_drop_fraction(0.1, 1, 8, 8) == pytest.approx(0.1)


@pytest.mark.parametrize("height,width,block,prob", [
    (3, 3, 3, 0.3),    # one block fits: a map is dropped whole or not at all
    (3, 7, 3, 0.3),    # one row of seed positions
    (5, 5, 5, 0.3),
    (7, 9, 3, 0.2),
    (11, 11, 5, 0.2),
    (4, 6, 5, 0.3),    # block larger than the map: clamped to 4
    (2, 2, 3, 0.3),    # clamped to the whole map
])
def test_only_whole_blocks_inside_the_map(height, width, block, prob):
    dropped = _dropped(DropBlock2D(prob, block).train(), (32, 32, height, width), seed=height * width)
    clamped = min(block, height, width)
    assert dropped.sum() > 0
    # every dropped unit lies in a whole clamped x clamped block of dropped units inside the map
    assert torch.equal(_whole_blocks(dropped, clamped), dropped)
    if (height - clamped + 1) * (width - clamped + 1) == 1:
        per_map = dropped.mean(dim=(2, 3))
        assert torch.all((per_map == 0) | (per_map == 1))


@pytest.mark.parametrize("corner", ["first", "last"])
def test_single_seed_drops_one_square(monkeypatch, corner):
    """One seed (forced through torch.rand) at the first / last valid position: exactly one 3x3 square of
    zeros, at the top-left / bottom-right corner, whole (the old code cropped corner blocks to 2x2)."""
    height, width, block = 7, 9, 3
    real_rand = torch.rand
    calls = []

    def one_seed(size, **kwargs):
        calls.append(tuple(size))
        noise = torch.ones(size, **kwargs)
        noise[0, 0, 0 if corner == "first" else -1, 0 if corner == "first" else -1] = 0.0
        return noise

    monkeypatch.setattr(torch, "rand", one_seed)
    x = real_rand(1, 1, height, width) + 0.5
    out = DropBlock2D(0.1, block).train()(x)
    assert calls == [(1, 1, height - block + 1, width - block + 1)]  # seeds on the valid region only
    zero = out[0, 0] == 0
    expected = torch.zeros(height, width, dtype=torch.bool)
    if corner == "first":
        expected[:block, :block] = True
    else:
        expected[-block:, -block:] = True
    assert torch.equal(zero, expected)
    # the kept units are rescaled by numel / kept
    kept = height * width - block * block
    torch.testing.assert_close(out[0, 0][~zero], x[0, 0][~zero] * (height * width / kept))


def test_random_single_blocks_are_squares():
    dropped = _dropped(DropBlock2D(0.02, 3).train(), (64, 64, 7, 9), seed=3)
    single = dropped.sum(dim=(2, 3)) == 9
    assert single.sum() > 50
    for n, c in single.nonzero().tolist():
        rows, cols = dropped[n, c].nonzero(as_tuple=True)
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2


@pytest.mark.parametrize("block", [0, 2, 4, -1])
def test_even_or_nonpositive_block_size_raises(block):
    with pytest.raises(ValueError, match="odd"):
        DropBlock2D(0.1, block)


@pytest.mark.parametrize("prob", [-0.1, 1.0])
def test_bad_drop_prob_raises(prob):
    with pytest.raises(ValueError, match="drop_prob"):
        DropBlock2D(prob, 3)


def test_eval_and_zero_prob_are_identity():
    x = torch.randn(4, 8, 9, 9)
    module = DropBlock2D(0.3, 3).eval()
    out = module(x)
    assert out is x or torch.equal(out, x)
    module = DropBlock2D(0.0, 3).train()
    out = module(x)
    assert out is x or torch.equal(out, x)
    module = DropBlock2D(0.3, 3).train()
    module.drop_prob = 0.0  # as a schedule at its start
    assert torch.equal(module(x), x)


def test_expectation_preserved():
    module = DropBlock2D(0.2, 3).train()
    torch.manual_seed(0)
    # per batch: numel / kept over the whole batch, so a constant input keeps its batch mean exactly
    ones = torch.ones(16, 32, 10, 10)
    assert module(ones).mean().item() == pytest.approx(1.0, abs=1e-5)
    # a varying input: mean(out) / mean(in) ~ 1 over many batches
    ratios = []
    for _ in range(40):
        x = torch.rand(16, 32, 10, 10) * 2
        ratios.append((module(x).mean() / x.mean()).item())
    ratios = torch.tensor(ratios)
    se = ratios.std().item() / len(ratios) ** 0.5
    assert se < 0.002 and abs(ratios.mean().item() - 1.0) < 5 * se + 1e-4


def test_half_precision_and_scripting():
    module = DropBlock2D(0.2, 3).train()
    x = torch.rand(64, 64, 16, 16).half() + 0.5  # 1M units: a half-precision mask sum would overflow
    out = module(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float().mean() / x.float().mean()).item() == pytest.approx(1.0, abs=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.x
        scripted = torch.jit.script(DropBlock2D(0.2, 3).train())
    dropped = (scripted(torch.rand(8, 8, 5, 5) + 0.5) == 0).float()
    assert torch.equal(_whole_blocks(dropped, 3), dropped)


# ------------------------------------------------------------------------------------------------ placement
def _tiny(prob):
    return build_resnest("resnest14d", stem_width=8, bottleneck_width=16, dropblock_prob=prob)


def test_official_placement():
    model = _tiny(0.1)
    names = [name for name, m in model.named_modules() if isinstance(m, DropBlock2D)]
    # official resnest: dropblock1, the split-attention conv's (after bn0) and dropblock3, in layer3 and layer4
    assert names == ["layer3.0.dropblock1", "layer3.0.conv2.dropblock", "layer3.0.dropblock3",
                     "layer4.0.dropblock1", "layer4.0.conv2.dropblock", "layer4.0.dropblock3"]
    assert all(m.block_size == 3 and m.drop_prob == 0.1 == m.target_prob
               for m in model.modules() if isinstance(m, DropBlock2D))
    radix0 = build_resnest("resnest14d", radix=0, dropblock_prob=0.1)
    assert isinstance(radix0.layer3[0].dropblock2, DropBlock2D)
    assert not any(isinstance(m, DropBlock2D) for m in _tiny(0.0).modules())  # prob 0: nothing added


# ------------------------------------------------------------------------------------------------ scheduler
def _values(model):
    return sorted({m.drop_prob for m in model.modules() if isinstance(m, DropBlock2D)})


def test_scheduler_ramps_to_the_final_value():
    model = _tiny(0.1)
    scheduler = DropBlockScheduler(model, 0.1, 10)
    assert _values(model) == [0.0] and len(scheduler.blocks) == 6
    seen = []
    for _ in range(12):
        scheduler.step()
        seen.append(_values(model)[0])
    assert seen == pytest.approx([0.01 * k for k in range(1, 11)] + [0.1, 0.1])
    scheduler.set_progress(5)
    assert _values(model) == pytest.approx([0.05])
    # stop=None: each block ramps to its own configured value; a start value
    own = DropBlockScheduler(model, None, 4, start=0.02)
    assert _values(model) == pytest.approx([0.02])
    own.set_progress(4)
    assert _values(model) == pytest.approx([0.1])
    with pytest.raises(ValueError, match="steps"):
        DropBlockScheduler(model, 0.1, 0)
    with pytest.raises(ValueError, match="stop"):
        DropBlockScheduler(model, 1.0, 10)


# -------------------------------------------------------------------------------------------- detectron2 hook
def _d2_hooks():
    require("detectron2", "make env installs detectron2")
    import resnest_backbone.d2.hooks as hooks

    return hooks


@pytest.mark.d2
def test_d2_hook_follows_trainer_iter():
    d2_hooks = _d2_hooks()
    model = _tiny(0.1)
    trainer = types.SimpleNamespace(iter=0, max_iter=100, model=nn.parallel.DataParallel(model))
    hook = d2_hooks.ResNeStDropBlockHook(drop_prob=0.1)
    hook.trainer = trainer
    hook.before_train()
    assert _values(model) == pytest.approx([0.001])
    for it in range(100):
        trainer.iter = it
        hook.before_step()
        assert _values(model) == pytest.approx([0.1 * (it + 1) / 100])
    assert _values(model) == pytest.approx([0.1])
    # a resumed trainer (iter = 37): the value for iteration 37, from the trainer, not from a counter
    model2 = _tiny(0.1)
    resumed = d2_hooks.ResNeStDropBlockHook(drop_prob=0.1)
    resumed.trainer = types.SimpleNamespace(iter=37, max_iter=100, model=model2)
    resumed.before_train()
    assert _values(model2) == pytest.approx([0.038])
    # a ramp shorter than the training
    short = d2_hooks.ResNeStDropBlockHook(drop_prob=0.1, ramp_iters=10)
    short.trainer = types.SimpleNamespace(iter=9, max_iter=100, model=model2)
    short.before_step()
    assert _values(model2) == pytest.approx([0.1])
    short.trainer.iter = 60
    short.before_step()
    assert _values(model2) == pytest.approx([0.1])


@pytest.mark.d2
def test_d2_hook_in_a_detectron2_training_loop():
    d2_hooks = _d2_hooks()
    from detectron2.engine import SimpleTrainer

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _tiny(0.1)
            self.seen = []

        def forward(self, data):
            self.seen.append(self.backbone.layer4[0].conv2.dropblock.drop_prob)
            return {"loss": self.backbone(data)["res5"].pow(2).mean()}

    def loader():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(2, 3, 64, 64, generator=g)

    model = Loss()
    trainer = SimpleTrainer(model, loader(), torch.optim.SGD(model.parameters(), lr=1e-3))
    trainer.register_hooks([d2_hooks.ResNeStDropBlockHook(drop_prob=0.1)])
    trainer.train(0, 5)
    assert model.seen == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    # resume (as DefaultTrainer.resume_or_load: start_iter = checkpoint iteration + 1) with a fresh hook
    model2 = Loss()
    again = SimpleTrainer(model2, loader(), torch.optim.SGD(model2.parameters(), lr=1e-3))
    again.register_hooks([d2_hooks.ResNeStDropBlockHook(drop_prob=0.1)])
    again.train(3, 5)
    assert model2.seen == pytest.approx([0.08, 0.1])


@pytest.mark.d2
def test_d2_hook_on_a_model_without_dropblock_is_an_error_naming_the_fix():
    d2_hooks = _d2_hooks()
    from detectron2.engine import SimpleTrainer

    model = _tiny(0.0)  # built without DropBlock
    trainer = SimpleTrainer(model, iter([]), torch.optim.SGD(model.parameters(), lr=1e-3))
    trainer.register_hooks([d2_hooks.ResNeStDropBlockHook(drop_prob=0.1)])
    with pytest.raises(ValueError, match="the model has no DropBlock2D.*MODEL.RESNEST.DROPBLOCK_PROB > 0"):
        trainer.train(0, 5)


@pytest.mark.d2
def test_d2_trainer_adds_the_hook(monkeypatch):
    d2_hooks = _d2_hooks()
    from detectron2.engine import DefaultTrainer

    from resnest_backbone.d2.train import Trainer, get_resnest_cfg

    cfg = get_resnest_cfg()
    assert cfg.MODEL.RESNEST.DROPBLOCK_PROB == 0.0 and cfg.MODEL.RESNEST.DROPBLOCK_RAMP_ITERS == 0
    monkeypatch.setattr(DefaultTrainer, "build_hooks", lambda self: ["default hooks"])
    trainer = Trainer.__new__(Trainer)  # build_hooks alone, without a model and data
    trainer.cfg = cfg
    assert trainer.build_hooks() == ["default hooks"]
    cfg.MODEL.RESNEST.DROPBLOCK_PROB = 0.1
    cfg.MODEL.RESNEST.DROPBLOCK_RAMP_ITERS = 500
    hooks = trainer.build_hooks()
    assert isinstance(hooks[0], d2_hooks.ResNeStDropBlockHook) and hooks[1:] == ["default hooks"]
    assert hooks[0].drop_prob == 0.1 and hooks[0].ramp_iters == 500


@pytest.mark.d2
def test_d2_trainer_run_and_resume(tmp_path):
    """A real (tiny) detectron2 run of the project's Trainer with DROPBLOCK_PROB 0.1: 4 iterations, then a
    --resume to 8 iterations from the last checkpoint. The value each iteration trains with is recorded."""
    d2_hooks = _d2_hooks()
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import HookBase

    from resnest_backbone.d2.train import Trainer, adapt_cfg_to_device, get_resnest_cfg
    from resnest_backbone.data.demo import DET_CLASSES, ensure_demo_data

    data = ensure_demo_data(str(tmp_path / "data"), spec={
        "version": 1, "seed": 7, "size": 128, "det": {"train": 4, "val": 1}, "seg": {"train": 1, "val": 1},
        "min_object": 20, "max_object": 56, "max_objects": 3})
    name = "dropblock_test_det_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": list(DET_CLASSES)},
                            f"{data}/det/annotations/instances_train.json", f"{data}/det/train")

    class Record(HookBase):
        def __init__(self):
            self.seen = []

        def before_step(self):
            model = self.trainer.model
            self.seen.append(sorted({m.drop_prob for m in model.modules() if isinstance(m, DropBlock2D)}))

    def run(max_iter, resume):
        cfg = get_resnest_cfg()
        cfg.merge_from_file(os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml"))
        cfg.merge_from_list([
            "MODEL.RESNEST.DROPBLOCK_PROB", 0.1, "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", 4,
            "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "OUTPUT_DIR", str(tmp_path / "out"),
            "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 128, "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.WARMUP_ITERS", 2, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32])
        adapt_cfg_to_device(cfg)
        trainer = Trainer(cfg)
        assert isinstance(trainer._hooks[0], d2_hooks.ResNeStDropBlockHook)
        record = Record()
        trainer.register_hooks([record])
        trainer.resume_or_load(resume=resume)
        trainer.train()
        return trainer.start_iter, record.seen

    start, seen = run(4, resume=False)
    assert start == 0 and seen == [[pytest.approx(0.025 * k)] for k in (1, 2, 3, 4)]
    start, seen = run(8, resume=True)
    assert start == 4 and seen == [[pytest.approx(0.0125 * k)] for k in (5, 6, 7, 8)]


# ---------------------------------------------------------------------------------------------- mmengine hook
def _mm():
    require("mmengine", "make env installs the OpenMMLab stack")
    return require("resnest_backbone.mm", "needs mmdet or mmseg: make env installs them")


def test_mm_hook_registered():
    mm = _mm()
    from mmengine.registry import HOOKS

    hook = HOOKS.build(dict(type="ResNeStDropBlockHook", drop_prob=0.1, ramp_iters=7))
    assert isinstance(hook, mm.ResNeStDropBlockHook) and hook.ramp_iters == 7
    assert "mmengine" in mm.HOOKS_REGISTERED_IN
    for package in ("mmdet", "mmseg"):
        registry = require(f"{package}.registry", "make env installs the OpenMMLab stack").HOOKS
        assert package in mm.REGISTERED_IN
        assert registry.get("ResNeStDropBlockHook") is mm.ResNeStDropBlockHook
        assert isinstance(registry.build(dict(type="ResNeStDropBlockHook")), mm.ResNeStDropBlockHook)


def test_mm_hook_follows_runner_iter():
    mm = _mm()
    model = _tiny(0.1)
    runner = types.SimpleNamespace(iter=0, max_iters=50, model=nn.parallel.DataParallel(model), logger=None)
    hook = mm.ResNeStDropBlockHook()  # drop_prob None: the backbone's configured dropblock_prob
    hook.before_train(runner)
    assert _values(model) == pytest.approx([0.002])
    for it in range(50):
        runner.iter = it
        hook.before_train_iter(runner, batch_idx=it)
    assert _values(model) == pytest.approx([0.1])
    model2 = _tiny(0.1)
    resumed = mm.ResNeStDropBlockHook(drop_prob=0.05, ramp_iters=20)
    resumed.before_train(types.SimpleNamespace(iter=9, max_iters=50, model=model2, logger=None))
    assert _values(model2) == pytest.approx([0.025])


def test_mm_hook_in_a_runner_with_resume(tmp_path):
    _mm()
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = _tiny(0.1)
            self.seen = []

        def forward(self, inputs, data_samples=None, mode="tensor"):
            self.seen.append(self.backbone.layer3[0].dropblock1.drop_prob)
            out = self.backbone(inputs)["res5"]
            return {"loss": out.pow(2).mean()} if mode == "loss" else out

    data = [dict(inputs=torch.randn(3, 64, 64)) for _ in range(4)]

    def run(max_iters, **kwargs):
        runner = Runner(
            model=Tiny(), work_dir=str(tmp_path), experiment_name=f"run{max_iters}",
            train_dataloader=dict(dataset=data, batch_size=2, sampler=dict(type="InfiniteSampler", shuffle=False),
                                  collate_fn=dict(type="default_collate")),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=1e-3)),
            train_cfg=dict(by_epoch=False, max_iters=max_iters),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4),
                               logger=dict(type="LoggerHook", interval=100)),
            custom_hooks=[dict(type="ResNeStDropBlockHook")], default_scope="mmengine", **kwargs)
        runner.train()
        return runner.model.seen

    # (a Runner makes its default scope the current one; conftest's autouse fixture restores it afterwards)
    assert run(4) == pytest.approx([0.025, 0.05, 0.075, 0.1])
    resumed = run(8, resume=True, load_from=str(tmp_path / "iter_4.pth"))
    assert resumed == pytest.approx([0.1 * k / 8 for k in (5, 6, 7, 8)])
