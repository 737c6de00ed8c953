"""Short real training runs through mmengine's Runner with the demo configs, on a tiny dataset written by the
test (the project's demo-shapes generator, a few images): train, save a checkpoint, reload it (load_from and
resume) and evaluate; for the other demo configs (Mask R-CNN, Cascade Mask R-CNN, DeepLabV3+) one training
step and one evaluation with the real metrics (box and mask AP from COCO's evaluator, mIoU)."""
import os

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")
require("mmseg", "make env installs mmsegmentation==1.2.2")

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from resnest_backbone.data.demo import ensure_demo_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"version": 1, "seed": 7, "size": 128, "det": {"train": 4, "val": 2}, "seg": {"train": 4, "val": 2},
        "min_object": 20, "max_object": 56, "max_objects": 3}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return ensure_demo_data(str(tmp_path_factory.mktemp("data")), spec=TINY)


def _demo_cfg(name, tiny_data):
    """A demo config (path under configs/) reading the tiny data set."""
    cfg = Config.fromfile(os.path.join(ROOT, "configs", name))
    if cfg.default_scope == "mmdet":
        root = os.path.join(tiny_data, "det") + os.sep
        cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = root + "annotations/instances_val.json"
    else:
        root = os.path.join(tiny_data, "ADEChallengeData2016")
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
    return cfg


def _short_run(cfg, work_dir, iters):
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=iters)]
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=iters)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.train_dataloader.batch_size = 2
    cfg.randomness = dict(seed=0)
    # mmengine keeps one visualizer per name and class for the process: a fresh one writes into this work_dir
    # (a later runner would otherwise log into an earlier test's deleted folder)
    cfg.visualizer.name = f"visualizer:{work_dir}"
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # evaluation: runner.test() after reloading
    return cfg


def _train_then_reload(cfg, work_dir, iters=2):
    runner = Runner.from_cfg(_short_run(cfg.copy(), work_dir, iters))
    runner.train()
    checkpoint = os.path.join(work_dir, f"iter_{iters}.pth")
    assert os.path.isfile(checkpoint)
    trained = {k: v.clone() for k, v in runner.model.state_dict().items()}
    assert any(k.startswith("backbone.layer1.0.conv2.fc1") for k in trained)  # official names in the model
    log = runner.message_hub.get_scalar("train/loss").data[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in log)

    # load_from: a fresh runner gets exactly the trained weights back
    reload_cfg = _short_run(cfg.copy(), os.path.join(work_dir, "reload"), iters)
    reload_cfg.load_from = checkpoint
    reloaded = Runner.from_cfg(reload_cfg)
    reloaded.load_or_resume()
    for key, value in reloaded.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    metrics = reloaded.test()

    # resume: training continues from the saved iteration
    resumed_cfg = _short_run(cfg.copy(), os.path.join(work_dir, "resume"), iters + 1)
    resumed_cfg.load_from, resumed_cfg.resume = checkpoint, True
    resumed = Runner.from_cfg(resumed_cfg)
    resumed.train()
    assert resumed.iter == iters + 1
    return metrics


@pytest.mark.slow
def test_faster_rcnn_runner_trains_saves_and_reloads(tiny_data, tmp_path):
    cfg = _demo_cfg("mmdet/faster-rcnn_resnest14d_fpn_demo.py", tiny_data)
    metrics = _train_then_reload(cfg, tmp_path / "det")
    assert "coco/bbox_mAP" in metrics and metrics["coco/bbox_mAP"] >= 0


@pytest.mark.slow
def test_deeplabv3_runner_trains_saves_and_reloads(tiny_data, tmp_path):
    cfg = _demo_cfg("mmseg/deeplabv3_resnest14d-d8_demo.py", tiny_data)
    metrics = _train_then_reload(cfg, tmp_path / "seg")
    assert 0 <= metrics["mIoU"] <= 100


def _train_one_step_and_evaluate(cfg, work_dir, loss_keys):
    runner = Runner.from_cfg(_short_run(cfg.copy(), work_dir, 1))
    runner.train()
    assert runner.iter == 1
    logged = runner.message_hub.log_scalars
    for key in ("train/loss",) + tuple(f"train/{k}" for k in loss_keys):
        assert key in logged, (key, sorted(logged))
        assert all(torch.isfinite(torch.tensor(v)) for v in logged[key].data[0]), key
    # the optimizer took its step: SGD momentum for the backbone's split attention and in every part of the
    # model that trains (backbone, neck, rpn_head, roi_head.bbox_head, roi_head.mask_head, decode_head, ...)
    optimizer = runner.optim_wrapper.optimizer
    params = dict(runner.model.named_parameters())
    stepped = {name for name, p in params.items() if "momentum_buffer" in optimizer.state.get(p, {})}
    assert "backbone.layer3.0.conv2.fc1.weight" in stepped

    def part(name):
        return ".".join(name.split(".")[:2 if name.startswith("roi_head.") else 1])

    trainable = {part(name) for name, p in params.items() if p.requires_grad}
    assert len(trainable) >= 3 and trainable == {part(name) for name in stepped}, trainable
    return runner.test()


@pytest.mark.parametrize("name,cascade", [("mask-rcnn_resnest14d_fpn_demo.py", False),
                                          ("cascade-mask-rcnn_resnest14d_fpn_demo.py", True)])
@pytest.mark.slow
def test_mask_models_train_one_step_and_evaluate_box_and_mask_ap(tiny_data, tmp_path, name, cascade):
    cfg = _demo_cfg(f"mmdet/{name}", tiny_data)
    stages = ("s0.", "s1.", "s2.") if cascade else ("",)  # a cascade logs each stage's losses
    losses = ("loss_rpn_cls", "loss_rpn_bbox") + tuple(f"{s}{k}" for s in stages for k in ("loss_bbox", "loss_mask"))
    metrics = _train_one_step_and_evaluate(cfg, tmp_path, losses)
    # COCO's evaluator (pycocotools) on the val annotations, boxes and masks
    for key in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50"):
        assert 0 <= metrics[key] <= 1, (key, metrics)


def test_deeplabv3plus_trains_one_step_and_evaluates_miou(tiny_data, tmp_path):
    cfg = _demo_cfg("mmseg/deeplabv3plus_resnest14d-d8_demo.py", tiny_data)
    metrics = _train_one_step_and_evaluate(cfg, tmp_path, ("decode.loss_ce", "aux.loss_ce"))
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}
    assert all(0 <= v <= 100 for v in metrics.values()), metrics


def test_mmengine_checkpoint_loader_stays_weights_only(tmp_path):
    # resnest_backbone.mm lets mmengine read its own checkpoints (HistoryBuffer, numpy) under torch's
    # weights_only loading; anything else is still refused.
    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    from resnest_backbone.mm.compat import load_from_local

    assert CheckpointLoader._get_checkpoint_loader(str(tmp_path / "x.pth")) is load_from_local
    buffer = HistoryBuffer()
    buffer.update(1.5)
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"loss": buffer},
                "meta": {"seed": np.int64(3), "arr": np.arange(3.0)}}, good)
    loaded = CheckpointLoader.load_checkpoint(str(good), map_location="cpu")
    assert loaded["message_hub"]["loss"].mean() == 1.5 and loaded["meta"]["arr"].tolist() == [0.0, 1.0, 2.0]

    class Gadget:
        def __init__(self, target, name):
            self.target, self.name = target, name

        def __reduce__(self):
            return (getattr, (self.target, self.name))

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    for i, bad in enumerate([Gadget(HistoryBuffer, "_statistics_methods"), Gadget(np.ndarray, "tofile"),
                             Payload()]):
        path = tmp_path / f"bad{i}.pth"
        torch.save({"state_dict": {}, "x": bad}, path)
        with pytest.raises(Exception, match="getattr|Unsupported global|print"):
            CheckpointLoader.load_checkpoint(str(path), map_location="cpu")


@pytest.mark.parametrize("name", ["mmdet/mask-rcnn_resnest14d_fpn_demo.py", "mmseg/deeplabv3plus_resnest14d-d8_demo.py"])
def test_shipped_configs_check_the_input_format_before_the_run(tiny_data, tmp_path, name):
    """The configs carry ResNeStInputCheckHook: a Runner built from one, given ResNeSt weights (load_from) and
    BGR input, warns before the run naming the data_preprocessor key; with the shipped RGB settings it does not."""
    import logging

    from mmengine.logging import MMLogger

    from resnest_backbone.mm import ResNeStInputCheckHook

    class Captured(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    texts = []
    for bgr_to_rgb in (True, False):
        cfg = _short_run(_demo_cfg(name, tiny_data), tmp_path / str(bgr_to_rgb), 1)
        cfg.model.data_preprocessor.bgr_to_rgb = bgr_to_rgb
        cfg.load_from = str(tmp_path / "resnest14d_trained.pth")  # read only after before_run
        runner = Runner.from_cfg(cfg)
        assert any(isinstance(h, ResNeStInputCheckHook) for h in runner.hooks)
        handler = Captured()
        MMLogger.get_current_instance().addHandler(handler)
        try:
            runner.call_hook("before_run")
        finally:
            MMLogger.get_current_instance().removeHandler(handler)
        texts.append("\n".join(handler.lines))
    assert "INPUT FORMAT" not in texts[0]
    assert "model.data_preprocessor.bgr_to_rgb is False: set True" in texts[1]
