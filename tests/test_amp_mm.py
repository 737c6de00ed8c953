"""mmengine mixed-precision training on the CPU: `AnyDeviceAmpOptimWrapper` (resnest_backbone.mm.amp), mmengine's
AmpOptimWrapper where it runs (accelerators) and bfloat16 autocast without loss scaling on the CPU, with the mmdet
demo Faster R-CNN (ResNeSt-14d FPN) through mmengine's Runner."""
import os

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.optim import AmpOptimWrapper  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from torch import nn  # noqa: E402

import resnest_backbone.mm  # noqa: E402,F401  (registers AnyDeviceAmpOptimWrapper)
from resnest_backbone.data.demo import ensure_demo_data  # noqa: E402
from resnest_backbone.mm.amp import AnyDeviceAmpOptimWrapper  # noqa: E402
from test_bf16 import OpRecorder  # noqa: E402
from test_mm_runner import TINY, _short_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wrapper_on_cpu_choices():
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the wrapper is mmengine's AmpOptimWrapper")
    model = nn.Linear(2, 2)
    wrapper = AnyDeviceAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="bfloat16")
    assert isinstance(wrapper, AmpOptimWrapper) and wrapper.cast_dtype == torch.bfloat16
    with wrapper.optim_context(model):
        out = model(torch.randn(3, 2))
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().sum())  # backward + step (no loss scaling)
    assert wrapper.state_dict()["loss_scaler"] == {}
    with pytest.raises(ValueError, match="dtype=torch.float16 on the CPU"):
        AnyDeviceAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="float16")
    with pytest.raises(ValueError, match="dtype='half'"):
        AnyDeviceAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype="half")


class RecordOps(Hook):
    """The aten ops' dtypes during each training iteration (forward, backward and step)."""

    def __init__(self):
        self.recorder, self.losses, self.conv_calls = OpRecorder(), [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.counting = nn.modules.module.register_module_forward_hook(
            lambda module, args, out: self.conv_calls.append(module) if isinstance(module, nn.Conv2d) else None)
        self.recorder.__enter__()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.recorder.__exit__(None, None, None)
        self.counting.remove()
        self.losses.append(float(outputs["loss"].detach()))


@pytest.mark.slow
def test_faster_rcnn_amp_bf16_runner(tmp_path):
    """3 iterations of the mmdet demo Faster R-CNN with optim_wrapper AnyDeviceAmpOptimWrapper(dtype='bfloat16')
    on the CPU: finite losses; every convolution (one per Conv2d call) and its backward ran in bf16 but the RPN's
    two predictors (fp32), every radix softmax in fp32 (one per block and image batch), every BN on fp32
    statistics; the parameters stay fp32, finite and were updated."""
    data = ensure_demo_data(str(tmp_path / "data"), spec=TINY)
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "mmdet", "faster-rcnn_resnest14d_fpn_demo.py"))
    det = os.path.join(data, "det") + os.sep
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = det
    cfg = _short_run(cfg, tmp_path / "work", 3)
    cfg.optim_wrapper.type = "AnyDeviceAmpOptimWrapper"
    cfg.optim_wrapper.dtype = "bfloat16"
    # A visualizer of its own: mmengine hands out one instance per name (mmdet's configs say 'visualizer'), and
    # a later runner would get this one, writing into this test's tmp_path, which is removed when it passes.
    cfg.visualizer.name = f"amp_bf16_visualizer_{os.getpid()}"
    record = RecordOps()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(record)
    before = {k: v.detach().clone() for k, v in runner.model.named_parameters()}
    runner.train()
    assert isinstance(runner.optim_wrapper, AnyDeviceAmpOptimWrapper)
    assert len(record.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in record.losses)
    backbone = runner.model.backbone
    blocks = sum(len(getattr(backbone, s)) for s in ("layer1", "layer2", "layer3", "layer4"))
    assert record.recorder.softmax == [torch.float32] * (3 * blocks)
    # every convolution (one per Conv2d call: trunk, FPN, RPN, box head) ran in bf16, but the RPN's two
    # predictors, kept in fp32 (core.precision.FP32_HEADS); the backward likewise
    names = {id(m): n for n, m in runner.model.named_modules()}
    assert len(record.recorder.convolution) == len(record.conv_calls) > 3 * blocks
    dtypes = {}
    for module, ran in zip(record.conv_calls, record.recorder.convolution):
        dtypes.setdefault(names[id(module)], set()).add(ran)
    fp32, bf16 = torch.float32, torch.bfloat16
    fp32_heads = {"rpn_head.rpn_cls", "rpn_head.rpn_reg"}
    assert {n for n, d in dtypes.items() if d != {(bf16, bf16)}} == fp32_heads, dtypes
    assert all(dtypes[n] == {(fp32, fp32)} for n in fp32_heads)
    assert {(bf16,) * 3, (fp32,) * 3} == set(record.recorder.convolution_backward)
    assert {s for _, s in record.recorder.batch_norm} == {torch.float32}
    assert torch.bfloat16 in {i for i, _ in record.recorder.batch_norm}
    params = dict(runner.model.named_parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    changed = [n for n, p in params.items() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("backbone.layer4") for n in changed) and any(n.startswith("roi_head") for n in changed)


def demo_faster_rcnn(seed: int = 0) -> nn.Module:
    """The mmdet demo Faster R-CNN ResNeSt-14d FPN (configs/mmdet), random weights with test_fuse's
    well-conditioned random norms, in eval mode."""
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from test_fuse import randomize_norms

    torch.manual_seed(seed)
    cfg = Config.fromfile(os.path.join(ROOT, "configs", "mmdet", "faster-rcnn_resnest14d_fpn_demo.py"))
    init_default_scope(cfg.get("default_scope"))
    model = MODELS.build(cfg.model)
    model.init_weights()
    return randomize_norms(model).eval()


def test_mmdet_detector_bf16_inference():
    """The mmdet route of the bf16 inference path: deploy(mmdet Faster R-CNN ResNeSt-14d FPN, dtype=bf16)
    (random weights, test_fuse's well-conditioned random norms) against float32 on two 128-px images:
    backbone + FPN features per level within BF16_REL (relative) of fp32's; `predict` gives float32 boxes and
    scores (the RoI extractor, RPN and box predictors run in fp32), in the image, finite."""
    from mmdet.structures import DetDataSample

    from resnest_backbone.core.fuse import deploy
    from test_bf16 import BF16_MIN, BF16_REL, rel_err

    model = demo_faster_rcnn()
    fp32, bf16 = deploy(model), deploy(model, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    samples = [DetDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128), scale_factor=(1.0, 1.0),
                                           pad_shape=(128, 128), batch_input_shape=(128, 128))) for _ in range(2)]
    inputs = [torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g) for _ in range(2)]
    with torch.no_grad():
        batch = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=False)
        ref = model.extract_feat(batch["inputs"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = bf16.extract_feat(batch["inputs"])
        errors = [rel_err(a, b) for a, b in zip(feats, ref)]
        assert all(f.dtype == torch.bfloat16 for f in feats)
        assert all(BF16_MIN < e < BF16_REL for e in errors), errors
        results = bf16(**batch, mode="predict")
        ref_results = fp32(**batch, mode="predict")
    for result, ref_result in zip(results, ref_results):
        pred = result.pred_instances
        assert len(pred) > 0 and len(ref_result.pred_instances) > 0
        assert pred.bboxes.dtype == pred.scores.dtype == torch.float32
        assert torch.isfinite(pred.bboxes).all() and pred.bboxes.min() >= 0 and pred.bboxes.max() <= 128
