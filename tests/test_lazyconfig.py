"""LazyConfig (python) configs, configs/lazy/: Faster / Mask / Cascade (Mask) R-CNN and RetinaNet on ResNeSt-50/101-FPN.

Each builds the model of its yaml recipe (same parameters, norms, frozen set and, with the same weights, the
same detections); freeze_at of L(ResNeStBackbone) means what MODEL.BACKBONE.FREEZE_AT means; LazyConfig.save
/ load round-trips them (plain values only) to the same model; tools/train_net.py trains one iteration and
evaluates them on the generated demo data (and evaluates a saved run again with --eval-only)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.registry import locate
from conftest import require
from resnest_backbone.core import get_variant
from resnest_backbone.d2 import ResNeStBackbone, build_resnest_backbone, get_config, get_config_file, list_configs
from resnest_backbone.d2.lazy import adapt_lazy_cfg_to_device, is_lazy_config, lazy_dataset_names
from resnest_backbone.d2.train import get_resnest_cfg

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = os.path.join(REPO, "configs", "lazy")
RECIPES = ["faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn", "retinanet"]
CONFIGS = [f"{recipe}_resnest{depth}_fpn" for recipe in RECIPES for depth in (50, 101)]


def lazy_cfg(name):
    return get_config(f"lazy/{name}")


def yaml_cfg(name, *opts):
    """The yaml config of the same recipe (the 101 variants: the 50's yaml with VARIANT resnest101)."""
    recipe, variant = name.replace("resnest101", "resnest50"), "resnest101" if "resnest101" in name else "resnest50"
    cfg = get_resnest_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", recipe + ".yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNEST.VARIANT", variant, *opts])
    return cfg


def kind(module):
    """A module's type, where every SyncBatchNorm (torch's, detectron2's "SyncBN", the core's) is one kind."""
    return "SyncBN" if isinstance(module, nn.SyncBatchNorm) else f"{type(module).__module__}.{type(module).__name__}"


def structure(model):
    return ({k: tuple(v.shape) for k, v in model.state_dict().items()},
            {k: kind(m) for k, m in model.named_modules()},
            {k for k, p in model.named_parameters() if not p.requires_grad})


def detections(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, 64, 96), generator=g).float()
    with torch.no_grad():
        return model.eval()([{"image": image, "height": 64, "width": 96}])[0]["instances"].get_fields()


def test_configs_are_listed_and_resolve_by_name():
    files = sorted(f[:-len(".py")] for f in os.listdir(LAZY) if f.endswith(".py"))
    assert set(CONFIGS) < set(files)
    names = list_configs()
    for name in files:
        assert f"lazy/{name}.py" in names
        for spelling in (f"lazy/{name}", f"lazy/{name}.py", f"configs/lazy/{name}.py"):
            assert os.path.realpath(get_config_file(spelling)) == os.path.realpath(os.path.join(LAZY, name + ".py"))
        assert is_lazy_config(get_config_file(f"lazy/{name}"))
    assert not is_lazy_config(get_config_file("faster_rcnn_resnest50_fpn"))  # the yaml of the same name
    assert get_config_file("faster_rcnn_resnest50_fpn").endswith(".yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_yaml_recipes_model(name):
    cfg = lazy_cfg(name)
    depth = 101 if "101" in name else 50
    assert cfg.model.backbone.bottom_up.variant == f"resnest{depth}"
    assert cfg.model.input_format == "RGB" and cfg.dataloader.train.mapper.image_format == "RGB"
    assert cfg.dataloader.train.mapper.use_instance_mask == ("mask_rcnn" in name)
    assert lazy_dataset_names(cfg) == ["coco_2017_train", "coco_2017_val"]
    model = instantiate(cfg.model)
    trunk = model.backbone.bottom_up
    assert isinstance(trunk, ResNeStBackbone) and trunk.arch["layers"] == get_variant(f"resnest{depth}").layers

    # freeze_at=2: stem and res2 frozen (no gradients, detectron2's FrozenBatchNorm2d), res3.. trainable SyncBN
    frozen = {k for k, p in trunk.named_parameters() if not p.requires_grad}
    assert frozen and all(k.startswith(("conv1.", "bn1.", "layer1.")) for k in frozen)
    assert all(p.requires_grad for k, p in trunk.named_parameters() if k.startswith(("layer2.", "layer3.", "layer4.")))
    for prefix, frozen_norms in [("conv1", True), ("bn1", True), ("layer1", True), ("layer2", False),
                                 ("layer4", False)]:
        norms = [m for k, m in trunk.named_modules() if k.startswith(prefix) and
                 isinstance(m, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen_norms for m in norms), prefix
        if not frozen_norms:
            assert all(isinstance(m, nn.SyncBatchNorm) for m in norms)

    # the yaml recipe's model: same parameters and buffers, norm kinds and frozen set ...
    reference = build_model(yaml_cfg(name))
    ours, theirs = structure(model), structure(reference)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    assert ours[2] == theirs[2] and {k.split(".bottom_up.")[1] for k in ours[2]} == frozen
    if name.startswith("cascade"):
        assert len(model.roi_heads.box_predictor) == 3
    # ... and, with the same (random) weights, the same detections: one class and no score threshold, so that
    # an untrained model detects something; 50 proposals for speed
    if name.startswith("retinanet"):
        cfg.model.num_classes, cfg.model.test_score_thresh = 1, 0.0
        opts = ["MODEL.RETINANET.NUM_CLASSES", "1", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    else:
        cfg.model.roi_heads.num_classes, cfg.model.proposal_generator.post_nms_topk = 1, (1000, 50)
        predictors = cfg.model.roi_heads.get("box_predictors") or [cfg.model.roi_heads.box_predictor]
        for predictor in predictors:
            predictor.test_score_thresh = 0.0
        opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "1", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    model, reference = instantiate(cfg.model), build_model(yaml_cfg(name, *opts))
    model.load_state_dict(reference.state_dict(), strict=True)
    ours, theirs = detections(model), detections(reference)
    assert len(ours["pred_boxes"]) > 0
    assert set(ours) == set(theirs)
    for key in ours:
        a, b = ours[key], theirs[key]
        a, b = (a.tensor, b.tensor) if hasattr(a, "tensor") else (a, b)
        assert torch.equal(a, b), key


def normalized(value):
    """A config container with every `_target_` as the object it names (a class or a saved dotted path)."""
    if isinstance(value, dict):
        return {k: (locate(v) if k == "_target_" and isinstance(v, str) else normalized(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    return value


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_round_trip(name, tmp_path):
    from omegaconf import OmegaConf

    cfg = lazy_cfg(name)
    first, second = str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")
    LazyConfig.save(cfg, first)
    assert not os.path.exists(first + ".pkl")  # no fallback to pickle: the yaml is complete
    with open(first) as f:
        text = f.read()
    assert isinstance(yaml.safe_load(text), dict)  # plain values only: no python object tags
    loaded = LazyConfig.load(first)
    assert normalized(OmegaConf.to_container(loaded, resolve=False)) == \
        normalized(OmegaConf.to_container(cfg, resolve=False))
    LazyConfig.save(loaded, second)
    with open(second) as f:
        assert f.read() == text
    assert is_lazy_config(first)  # a saved LazyConfig yaml is recognised (tools/train_net.py, get_config)
    assert get_config(first).model.backbone.bottom_up.variant == cfg.model.backbone.bottom_up.variant

    a, b = instantiate(cfg.model), instantiate(loaded.model)
    assert type(a) is type(b)
    sa, sb = structure(a), structure(b)
    assert sa[0] == sb[0] and sa[2] == sb[2] and sa[2]
    assert {k: type(m) for k, m in a.named_modules()} == {k: type(m) for k, m in b.named_modules()}


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at_is_the_yaml_freeze_at(freeze_at, one_thread):
    lazy = ResNeStBackbone(variant="resnest14d", norm="BN", freeze_at=freeze_at, out_features=["res2", "res5"])
    cfg = get_resnest_cfg()
    cfg.merge_from_list(["MODEL.RESNEST.VARIANT", "resnest14d", "MODEL.RESNETS.NORM", "BN",
                         "MODEL.BACKBONE.FREEZE_AT", str(freeze_at), "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res5']"])
    from detectron2.layers import ShapeSpec

    built = build_resnest_backbone(cfg, ShapeSpec(channels=3))
    assert structure(lazy) == structure(built)
    assert {k: type(m) for k, m in lazy.named_modules()} == {k: type(m) for k, m in built.named_modules()}
    frozen = structure(lazy)[2]
    stem = {k for k, _ in lazy.named_parameters() if k.startswith(("conv1.", "bn1."))}
    assert (stem <= frozen) == (freeze_at >= 1) and bool(frozen) == (freeze_at >= 1)
    assert all(not p.requires_grad for p in lazy.parameters()) == (freeze_at == 5)
    # one SGD step: frozen parameters and frozen norms' statistics stay, the others move
    before = {k: v.clone() for k, v in lazy.state_dict().items()}
    trainable = [p for p in lazy.parameters() if p.requires_grad]
    lazy.train()
    out = lazy(torch.randn(2, 3, 64, 64))
    if trainable:
        opt = torch.optim.SGD(trainable, lr=0.1)
        sum(v.square().mean() for v in out.values()).backward()
        opt.step()
    after = lazy.state_dict()
    for k, p in lazy.named_parameters():
        assert torch.equal(before[k], after[k]) == (not p.requires_grad), k
    for k, m in lazy.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            assert torch.equal(before[k + ".running_mean"], after[k + ".running_mean"])


def test_freeze_at_override_and_device_adaptation():
    cfg = LazyConfig.apply_overrides(lazy_cfg("mask_rcnn_resnest50_fpn"),
                                     ["model.backbone.bottom_up.freeze_at=0", "train.device=cpu"])
    adapt_lazy_cfg_to_device(cfg)
    trunk = instantiate(cfg.model.backbone.bottom_up)
    assert all(p.requires_grad for p in trunk.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules())
    # on the CPU detectron2's SyncBN (torch's, no CPU process groups) becomes naiveSyncBN; the trunk's stays
    assert cfg.model.backbone.bottom_up.norm == "SyncBN"
    assert cfg.model.backbone.norm == cfg.model.roi_heads.box_head.conv_norm == "naiveSyncBN"
    assert cfg.model.roi_heads.mask_head.conv_norm == "naiveSyncBN"
    cascade = LazyConfig.apply_overrides(lazy_cfg("cascade_rcnn_resnest50_fpn"), ["train.device=cpu"])
    adapt_lazy_cfg_to_device(cascade)
    assert [h.conv_norm for h in cascade.model.roi_heads.box_heads] == ["naiveSyncBN"] * 3
    assert cascade.model.backbone.bottom_up.norm == "SyncBN"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the recipe's device is there")
def test_a_cuda_recipe_without_cuda_is_an_error_naming_the_fix():
    from resnest_backbone.d2.train import DeviceError

    cfg = lazy_cfg("faster_rcnn_resnest50_fpn")
    assert cfg.train.device == "cuda"
    with pytest.raises(DeviceError, match="train.device is 'cuda', but CUDA is not available.*`train.device=cpu`"):
        adapt_lazy_cfg_to_device(cfg)
    assert cfg.train.device == "cuda"  # not switched behind the user's back


# --------------------------------------------------------------------------- tools/train_net.py, real processes
DEMO = ["dataloader.train.dataset.names=resnest_demo_det_train",
        "dataloader.test.dataset.names=resnest_demo_det_val_mini",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.sample_style=choice",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "train.max_iter=1", "train.precise_bn.enabled=false", "train.seed=0"]


SMALL_TRUNK = "model.backbone.bottom_up.variant=resnest14d"


def demo_opts(name, output_dir):
    classes = "model.num_classes=3" if name.startswith("retinanet") else "model.roi_heads.num_classes=3"
    fewer = [] if name.startswith("retinanet") else ["model.proposal_generator.post_nms_topk=[1000,50]",
                                                     "model.roi_heads.batch_size_per_image=32"]
    device = [] if torch.cuda.is_available() else ["train.device=cpu"]  # the recipes ask for CUDA
    return [*DEMO, classes, *fewer, *device, f"train.output_dir={output_dir}"]


def train_net(*args, cwd):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def ap_lines(log):
    """{task: "AP,AP50,..." values} from the `copypaste:` lines of detectron2's print_csv_format."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    return {line[len("Task: "):]: lines[i + 2] for i, line in enumerate(lines) if line.startswith("Task: ")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_train_net_trains_and_evaluates_on_the_demo_data(recipe, tmp_path):
    name = f"{recipe}_resnest50_fpn"
    out = tmp_path / "run"
    # by name, from another working directory; the recipe with a small trunk (its size is not what this tests)
    log = train_net("--config", f"lazy/{name}", *demo_opts(name, out), SMALL_TRUNK, cwd=tmp_path)
    with open(out / "metrics.json") as f:
        steps = [json.loads(line) for line in f if '"total_loss"' in line]
    assert [s["iteration"] for s in steps] == [0] and math.isfinite(steps[0]["total_loss"])
    assert (out / "model_final.pth").exists() and (out / "last_checkpoint").read_text() == "model_final.pth"
    results = ap_lines(log)
    assert list(results) == (["bbox", "segm"] if "mask_rcnn" in recipe else ["bbox"]), log[-3000:]
    for values in results.values():  # AP, AP50, AP75, APs, APm, APl (nan: no object of that size)
        values = [float(v) for v in values.split(",")]
        assert len(values) == 6 and all(0 <= v <= 100 or math.isnan(v) for v in values), results
    # the run's config: saved by default_setup as LazyConfig yaml, adapted to the device
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.model.backbone.bottom_up.variant == "resnest14d" and saved.model.backbone.bottom_up.freeze_at == 2
    if not torch.cuda.is_available():  # as asked (train.device=cpu), heads' SyncBN adapted to the CPU
        assert saved.train.device == "cpu" and saved.model.backbone.norm == "naiveSyncBN"
    assert saved.model.backbone.bottom_up.norm == "SyncBN"

    if recipe == "faster_rcnn":  # --eval-only of the saved run (its config.yaml, its final weights): same AP
        again = train_net("--config-file", str(out / "config.yaml"), "--eval-only",
                          f"train.init_checkpoint={out / 'model_final.pth'}", f"train.output_dir={tmp_path / 'eval'}",
                          cwd=tmp_path)
        assert "model_final.pth" in again and ap_lines(again) == results
        assert "Starting training" not in again  # evaluated only


@pytest.mark.slow
def test_train_net_amp_bf16_on_cpu(tmp_path):
    """train.amp.enabled=True on the CPU: tools/train_net.py trains a LazyConfig Faster R-CNN in bf16 mixed
    precision (build_trainer: AutocastTrainer) with a finite loss, then evaluates."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the float16 default runs detectron2's AMPTrainer")
    name, out = "faster_rcnn_resnest50_fpn", tmp_path / "run"
    log = train_net("--config", f"lazy/{name}", *demo_opts(name, out), SMALL_TRUNK, "train.amp.enabled=True",
                    cwd=tmp_path)
    assert "mixed precision: bfloat16 autocast on cpu (AutocastTrainer)" in log
    with open(out / "metrics.json") as f:
        steps = [json.loads(line) for line in f if '"total_loss"' in line]
    assert [s["iteration"] for s in steps] == [0] and math.isfinite(steps[0]["total_loss"])
    assert list(ap_lines(log)) == ["bbox"]


UPSTREAM_TOOL = os.path.join(sys.prefix, "detectron2-tools", "lazyconfig_train_net.py")


@pytest.mark.slow
def test_upstream_lazyconfig_train_net_runs_the_configs_unmodified(tmp_path):
    """detectron2's own tools/lazyconfig_train_net.py, run directly: the config imports the plugin itself."""
    require(UPSTREAM_TOOL, "upstream detectron2's tool, kept beside the environment: tools/env/setup_env.sh puts it there")
    name, out = "retinanet_resnest101_fpn", tmp_path / "run"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    proc = subprocess.run([sys.executable, UPSTREAM_TOOL, "--config-file", os.path.join(LAZY, name + ".py"),
                           *demo_opts(name, out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "ResNeStBackbone" in proc.stdout and list(ap_lines(proc.stdout)) == ["bbox"]
    assert (out / "model_final.pth").exists()
    assert LazyConfig.load(str(out / "config.yaml")).model.backbone.bottom_up.variant == "resnest101"


def test_periodic_checkpoints_go_through_the_safe_checkpointer(tmp_path):
    """detectron2's PeriodicCheckpointer hook, as do_train registers it: saves through SafeDetectionCheckpointer
    (each file verified and renamed into place), keeps the newest max_to_keep and the final one."""
    from types import SimpleNamespace

    from detectron2.engine import hooks

    from resnest_backbone.d2 import SafeDetectionCheckpointer

    checkpointer = SafeDetectionCheckpointer(nn.Linear(2, 2), str(tmp_path))
    saved = []
    save = checkpointer.save
    checkpointer.save = lambda name, **extra: (saved.append(name), save(name, **extra))
    hook = hooks.PeriodicCheckpointer(checkpointer, period=2, max_to_keep=2)
    hook.trainer = SimpleNamespace(iter=0, max_iter=7)
    hook.before_train()
    for i in range(7):
        hook.trainer.iter = i
        hook.after_step()
    assert saved == ["model_0000001", "model_0000003", "model_0000005", "model_final"]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth", "model_0000005.pth",
                                            "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"


def test_dropblock_ramp_hook_follows_the_model():
    from omegaconf import OmegaConf

    from resnest_backbone.d2.hooks import ResNeStDropBlockHook
    from resnest_backbone.d2.lazy import _dropblock_hook

    cfg = OmegaConf.create({"train": {"dropblock_ramp_iters": 7}})
    with_drop = ResNeStBackbone(variant="resnest14d", dropblock_prob=0.1)
    hook = _dropblock_hook(cfg, with_drop)
    assert isinstance(hook, ResNeStDropBlockHook) and hook.ramp_iters == 7 and hook.drop_prob is None
    assert _dropblock_hook(cfg, ResNeStBackbone(variant="resnest14d")) is None
