"""The two classic-mistake warnings (resnest_backbone.guards): random heads (evaluating a detector whose load
filled only the ResNeSt trunk) and input format (ResNeSt weights with BGR input or Caffe's mean/std). Present
when they should be, absent when they should not (training from an ImageNet trunk, a trained checkpoint, a
correct RGB config), through every entry point: tools/train_net.py in real processes, the checkpointer with a
yacs and a LazyConfig config, mmengine's load into an mmdet model, and a static check that every
SafeDetectionCheckpointer the project builds is given its run's config."""
import ast
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import require
from resnest_backbone import build_resnest
from resnest_backbone.convert import convert_checkpoint
from resnest_backbone.guards import RESNEST_INPUT, input_problems

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml")
# The demo detector with a standard ResNeSt-14 trunk (the published resnest14d shapes), on tiny images.
R14 = ["MODEL.RESNEST.STEM_WIDTH", "32", "MODEL.RESNEST.BOTTLENECK_WIDTH", "64"]
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "('resnest_demo_det_val_mini',)"]
HEADS, INPUT = "!!! RANDOM HEADS", "!!! INPUT FORMAT"
CAFFE_MEAN, CAFFE_STD = [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]  # detectron2's defaults


@pytest.fixture(scope="module")
def trunk_pkl(tmp_path_factory):
    """An ImageNet-style ResNeSt-14 trunk (official names, published file name) converted for detectron2."""
    folder = tmp_path_factory.mktemp("trunk")
    torch.manual_seed(0)
    torch.save(build_resnest("resnest14d").state_dict(), folder / "resnest14d-00000000.pth")
    convert_checkpoint(str(folder / "resnest14d-00000000.pth"), str(folder / "resnest14d.pkl"), fmt="d2")
    return str(folder / "resnest14d.pkl")


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def text(self):
        return "\n".join(self.messages)


@pytest.fixture
def d2_log():
    logger = logging.getLogger("detectron2.resnest_backbone")
    handler = Captured()
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_input_problems_name_the_key_and_the_value_to_set():
    ok = [("INPUT.FORMAT", "RGB", "RGB"), ("MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], RESNEST_INPUT["pixel_mean"]),
          ("MODEL.PIXEL_STD", [58.395, 57.12, 57.375], RESNEST_INPUT["pixel_std"])]  # torchvision's: within 1.0
    assert input_problems(ok) == []
    bad = input_problems([("INPUT.FORMAT", "BGR", "RGB"), ("MODEL.PIXEL_MEAN", CAFFE_MEAN, RESNEST_INPUT["pixel_mean"]),
                          ("MODEL.PIXEL_STD", CAFFE_STD, RESNEST_INPUT["pixel_std"]), ("x.bgr_to_rgb", False, True)])
    assert bad == ["INPUT.FORMAT is 'BGR': set 'RGB'",
                   "MODEL.PIXEL_MEAN is [103.53, 116.28, 123.675]: set [123.68, 116.779, 103.939]",
                   "MODEL.PIXEL_STD is [1, 1, 1]: set [58.393, 57.12, 57.375]", "x.bgr_to_rgb is False: set True"]


# ------------------------------------------------------------------------------------ detectron2, in-process
def _d2_model(*opts):
    from resnest_backbone.d2.train import Trainer, get_resnest_cfg

    cfg = get_resnest_cfg()
    cfg.merge_from_file(DEMO)
    cfg.merge_from_list(R14 + list(opts))
    return cfg, Trainer.build_model(cfg)


def _infer(model):
    model.eval()
    with torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64)}])


@pytest.mark.d2
def test_d2_checkpointer_warns_for_a_trunk_evaluated_and_not_for_a_full_detector(trunk_pkl, d2_log, tmp_path,
                                                                                 monkeypatch):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    cfg, model = _d2_model("INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", str(CAFFE_MEAN), "MODEL.PIXEL_STD",
                           str(CAFFE_STD))
    SafeDetectionCheckpointer(model, config=cfg).load(trunk_pkl)
    assert INPUT in d2_log.text() and HEADS not in d2_log.text()  # input: at the load; heads: at inference
    for line in ("INPUT.FORMAT is 'BGR': set 'RGB'", "MODEL.PIXEL_MEAN is [103.53, 116.28, 123.675]: set "
                 "[123.68, 116.779, 103.939]", "MODEL.PIXEL_STD is [1, 1, 1]: set [58.393, 57.12, 57.375]"):
        assert line in d2_log.text()
    _infer(model)
    heads = [m for m in d2_log.messages if HEADS in m]
    assert len(heads) == 1 and "filled only the ResNeSt trunk" in heads[0]
    for part in ("proposal_generator", "roi_heads", "backbone.fpn_lateral2"):
        assert part in heads[0]
    _infer(model)
    assert len([m for m in d2_log.messages if HEADS in m]) == 1  # once per load

    # A whole detector (saved by the checkpointer: it records its RGB input) into an RGB config: silent.
    d2_log.messages.clear()
    SafeDetectionCheckpointer(model, save_dir=str(tmp_path), config=cfg).save("full")
    cfg2, fresh = _d2_model()
    SafeDetectionCheckpointer(fresh, config=cfg2).load(str(tmp_path / "full.pth"))
    _infer(fresh)
    # ... but saved from a BGR/Caffe run, that run's input is what the weights expect: RGB now is the mistake.
    assert INPUT in d2_log.text() and "the input its training recorded (BGR" in d2_log.text()
    assert HEADS not in d2_log.text()

    # The environment switch silences both.
    d2_log.messages.clear()
    monkeypatch.setenv("RESNEST_SILENCE", "random_heads,input_format")
    cfg3, model3 = _d2_model("INPUT.FORMAT", "BGR")
    SafeDetectionCheckpointer(model3, config=cfg3).load(trunk_pkl)
    _infer(model3)
    assert d2_log.messages == []


@pytest.mark.d2
def test_d2_training_from_a_trunk_does_not_warn(trunk_pkl, d2_log):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    cfg, model = _d2_model()  # RGB, ImageNet mean/std: the project's configs
    SafeDetectionCheckpointer(model, config=cfg).load(trunk_pkl)
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage():
        model([{"image": torch.zeros(3, 64, 64), "instances": _instances()}])  # a training step's forward first
    _infer(model)
    assert d2_log.messages == []


def _instances():
    from detectron2.structures import Boxes, Instances

    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    return inst


@pytest.mark.d2
def test_d2_lazyconfig_keys_are_named(trunk_pkl, d2_log):
    from detectron2.config import instantiate

    from resnest_backbone.d2 import SafeDetectionCheckpointer
    from resnest_backbone.d2.lazy import load_lazy_config

    cfg = load_lazy_config(os.path.join(REPO, "configs", "lazy", "faster_rcnn_resnest50_fpn.py"), [
        "model.backbone.bottom_up.variant=resnest14d", "model.backbone.bottom_up.norm=BN",
        "model.backbone.norm=", "model.roi_heads.box_head.conv_norm=", "dataloader.train.mapper.image_format=BGR"])
    model = instantiate(cfg.model)
    SafeDetectionCheckpointer(model, config=cfg).load(trunk_pkl)
    text = d2_log.text()
    assert "dataloader.train.mapper.image_format is 'BGR': set 'RGB'" in text
    assert "dataloader.test.mapper.image_format is 'BGR'" in text  # the test mapper follows the train one
    assert "model.pixel_mean" not in text and "model.input_format" not in text  # those are right
    _infer(model)
    assert HEADS in d2_log.text()


def _checkpointer_calls(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "SafeDetectionCheckpointer", "DetectionCheckpointer"):
            yield node


def test_every_checkpointer_the_project_builds_gets_the_config():
    """The warnings live in SafeDetectionCheckpointer; every one built by the package and the tools is given
    its run's config (so the input warning names that config's keys); upstream's tools get it through
    resnest_backbone.d2.run (tested in test_upstream_tools), ResNeStSA's loads arm it in mmdet/mmseg."""
    files = [os.path.join(root, name) for folder in ("resnest_backbone", "tools")
             for root, _, names in os.walk(os.path.join(REPO, folder)) for name in names if name.endswith(".py")]
    calls = [(path, node) for path in files for node in _checkpointer_calls(path)]
    assert len(calls) >= 4  # yaml Trainer, train_net --eval-only, LazyConfig train and eval
    for path, node in calls:
        assert any(k.arg == "config" for k in node.keywords), f"{path}:{node.lineno}: no config="


# ------------------------------------------------------------------------------------ detectron2, processes
def _train_net(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    env.pop("RESNEST_SILENCE", None)
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", DEMO,
                           *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.d2
def test_train_net_warns_for_an_imagenet_trunk_evaluated_and_not_when_trained(trunk_pkl, tmp_path):
    # Training from the trunk (RGB): no warning, also not at the evaluation after training.
    out = _train_net(*R14, *TINY, "SOLVER.MAX_ITER", "2", "MODEL.WEIGHTS", trunk_pkl, "OUTPUT_DIR",
                     str(tmp_path / "train"))
    assert "Evaluation results for bbox" in out and HEADS not in out and INPUT not in out
    # --eval-only of the trained detector: no warning.
    out = _train_net("--eval-only", *R14, *TINY, "MODEL.WEIGHTS", str(tmp_path / "train" / "model_final.pth"),
                     "OUTPUT_DIR", str(tmp_path / "eval"))
    assert "Evaluation results for bbox" in out and HEADS not in out and INPUT not in out
    # --eval-only of the ImageNet trunk, BGR: both warnings.
    out = _train_net("--eval-only", *R14, *TINY, "INPUT.FORMAT", "BGR", "MODEL.WEIGHTS", trunk_pkl, "OUTPUT_DIR",
                     str(tmp_path / "trunk"))
    assert out.count(HEADS) == 1 and "filled only the ResNeSt trunk" in out, out[-4000:]
    assert "INPUT.FORMAT is 'BGR': set 'RGB'" in out
    assert _box_ap(out) < 1.0  # what the warning says: random heads, AP about 0


def _box_ap(output):
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if "copypaste: Task: bbox" in line)
    return float(lines[at + 2].split("copypaste:")[1].split(",")[0])


# ---------------------------------------------------------------------------------------- mmdet, in-process
@pytest.fixture
def mm_model():
    require("mmdet", "make env installs mmdet==3.3.0")
    from mmengine.config import Config
    from mmengine.logging import MMLogger

    import resnest_backbone.mm  # noqa: F401
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(os.path.join(REPO, "configs", "mmdet", "faster-rcnn_resnest14d_fpn_demo.py"))
    cfg.model.backbone.norm_cfg = dict(type="BN", requires_grad=True)
    handler = Captured()
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    yield MODELS.build(cfg.model), handler
    logger.removeHandler(handler)


def _mm_infer(model, train=False):
    model.train(train)
    with torch.no_grad():
        model.backbone(torch.zeros(1, 3, 64, 64))


def test_mm_whole_model_load_of_a_trunk_warns_at_evaluation(mm_model):
    from mmengine.runner.checkpoint import load_state_dict

    model, log = mm_model
    trunk = {"backbone." + k: v for k, v in model.backbone.state_dict().items()}
    load_state_dict(model, dict(trunk))  # what load_from does with a trunk under 'backbone.'
    _mm_infer(model)
    assert HEADS in log.text() and "filled only the ResNeSt trunk" in log.text()
    assert "neck, rpn_head, roi_head" in log.text()

    log.messages.clear()
    load_state_dict(model, {k[len("backbone."):]: v for k, v in trunk.items()})  # a bare trunk: fills nothing
    _mm_infer(model)
    assert "did not fill these parts, which kept their random initialisation: backbone, neck" in log.text()

    log.messages.clear()
    load_state_dict(model, dict(trunk))
    _mm_infer(model, train=True)  # training first (from the trunk): no warning after it
    _mm_infer(model)
    load_state_dict(model, model.state_dict())  # a whole detector: no warning
    _mm_infer(model)
    assert HEADS not in log.text()


def test_mm_input_check_names_the_data_preprocessor_keys(mm_model):
    from resnest_backbone.mm import ResNeStInputCheckHook, check_mm_input

    model, log = mm_model
    assert not check_mm_input(model, pretrained=True)  # the project's config: RGB, ImageNet mean/std
    assert not check_mm_input(model, pretrained=False)  # no ResNeSt weights: nothing to check
    model.data_preprocessor._channel_conversion = False
    model.data_preprocessor.mean.copy_(torch.tensor(CAFFE_MEAN).view(3, 1, 1))
    model.data_preprocessor.std.fill_(1.0)

    class Runner:  # what the hook reads of mmengine's Runner
        _load_from = "work_dirs/epoch_12.pth"

    Runner.model = model
    ResNeStInputCheckHook().before_run(Runner)
    text = log.text()
    assert INPUT in text
    for line in ("model.data_preprocessor.mean is [103.53, 116.28, 123.675]: set [123.68, 116.779, 103.939]",
                 "model.data_preprocessor.std is [1, 1, 1]: set [58.393, 57.12, 57.375]",
                 "model.data_preprocessor.bgr_to_rgb is False: set True"):
        assert line in text
