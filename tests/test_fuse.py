"""The inference fast path (core/fuse.py) equals the training-form trunk it was made from."""
import copy
import os

import pytest
import torch
from torch import nn

from conftest import require
from resnest_backbone.core import VARIANTS, FrozenBatchNorm2d, ResNeSt, build_resnest, onednn
from resnest_backbone.core.fuse import (FusedBottleneck, FusedSplitAttention, deploy, fold_conv_norm, fuse_model,
                                        fuse_resnest)
from resnest_backbone.core.radix import fused_split_sum, softmax_split_sum
from resnest_backbone.core.split_attention import SplitAttentionConv2d

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (what folding must get right), scaled so that the
    activations stay O(1) through hundreds of layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) or \
                    type(m).__name__ == "FrozenBatchNorm2d":
                n = m.num_features
                m.running_mean.copy_(torch.empty(n).uniform_(-0.3, 0.3, generator=g))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                last = name.endswith("bn3") or name.endswith("downsample.2")
                low, high = (0.05, 0.3) if last else (0.5, 1.5)
                m.weight.copy_(torch.empty(n).uniform_(low, high, generator=g))
                m.bias.copy_(torch.empty(n).uniform_(-0.2, 0.2, generator=g))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-0.2, 0.2, generator=g))
    return model


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_equal(model: nn.Module, x: torch.Tensor, **fuse_kwargs) -> nn.Module:
    model.eval()
    with torch.no_grad():
        ref = model(x)
        fused = fuse_resnest(model, **fuse_kwargs)
        if fuse_kwargs.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        out = fused(x)
    assert max(v.abs().max().item() for v in ref.values()) > 0.05  # a real signal, not all zeros
    assert max_diff(ref, out) < ATOL
    return fused


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_fused_equals_unfused(name):
    torch.manual_seed(0)
    model = randomize_norms(build_resnest(name))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        ref = model(x)
        keys_before = list(model.state_dict())
        fused = fuse_resnest(model, inplace=True)  # in place: the big variants are not copied
        out = fused(x)
    assert fused is model and keys_before[0] == "conv1.0.weight"
    assert max_diff(ref, out) < ATOL
    # every BN went into a conv: no norm layer is left, and every block is the fused form
    assert not [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    blocks = [b for stage in (fused.layer1, fused.layer2, fused.layer3, fused.layer4) for b in stage]
    assert len(blocks) == sum(VARIANTS[name].layers)
    assert all(isinstance(b, FusedBottleneck) for b in blocks)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(radix=4, cardinality=2, bottleneck_width=40, avd_first=True),  # fc2 rows reordered across groups
    dict(radix=1, cardinality=4, bottleneck_width=24),  # sigmoid gate
    dict(radix=0),  # plain grouped conv (ResNeXt block)
    dict(deep_stem=False),  # 7x7 stem
    dict(output_stride=8),  # dilated res4/res5
])
def test_fused_equals_unfused_channels_last_and_knobs(overrides):
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest14d", **overrides))
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    fused = check_equal(model, x, channels_last=True)
    outs = fused(x.contiguous(memory_format=torch.channels_last))
    # channels_last is kept end to end: no silent conversion back to NCHW
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in outs.values())


def test_fuse_copies_by_default_and_method_fuses_in_place():
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest14d")).eval()
    before = copy.deepcopy(model.state_dict())
    fused = fuse_resnest(model)
    assert fused is not model
    after = model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.layer1[0].conv2, SplitAttentionConv2d)  # original untouched, still trainable
    same = model.fuse()
    assert same is model and isinstance(model.layer1[0].conv2, FusedSplitAttention)
    assert model.fuse() is model  # idempotent
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(fused(x), model(x)) < 1e-6
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("norm", ["FrozenBN", "GN", "SyncBN"])
def test_other_norms(norm):
    """FrozenBN and SyncBN (eval: running statistics) fold; GroupNorm cannot and is kept."""
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest14d", norm=norm))
    fused = check_equal(model, torch.randn(2, 3, 32, 32))
    kept = [m for m in fused.modules() if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                                                          FrozenBatchNorm2d))]
    assert bool(kept) == (norm == "GN")


@pytest.mark.d2
def test_frozen_trunk_and_detectron2_backbone():
    d2 = require("resnest_backbone.d2", "needs detectron2: make env installs it")
    from resnest_backbone.core import get_variant

    torch.manual_seed(0)
    backbone = d2.ResNeStBackbone(**get_variant("resnest14d").arch(), norm="BN")
    randomize_norms(backbone).freeze(3)  # stem + res2 + res3 -> detectron2 FrozenBatchNorm2d
    assert any(type(m).__module__.startswith("detectron2") for m in backbone.modules())
    shapes = backbone.output_shape()
    fused = check_equal(backbone, torch.randn(1, 3, 64, 64))
    assert isinstance(fused, d2.ResNeStBackbone) and fused.output_shape() == shapes


def test_fold_conv_norm_and_weighted_sum_units():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=True)
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    folded, rest = fold_conv_norm(conv, bn)
    x = torch.randn(2, 8, 5, 7)
    assert isinstance(rest, nn.Identity)
    torch.testing.assert_close(folded(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    gn = nn.GroupNorm(2, 6)
    assert fold_conv_norm(conv, gn) == (conv, gn)  # not foldable: unchanged
    for radix in (2, 3, 4):
        for channels_last in (False, True):
            x = torch.randn(2, radix * 5, 4, 6)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            a = torch.rand(2, radix, 5, 1, 1)
            ref = sum(x[:, r * 5:(r + 1) * 5] * a[:, r] for r in range(radix))
            out = fused_split_sum(x, a, radix)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
            assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def _ops(fn):
    """The aten operators fn() runs, in order: (name, shape of the first argument, None if not a tensor)."""
    ops = []

    class Ops(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args else None
            ops.append((func.overloadpacket.__name__, tuple(first.shape) if isinstance(first, torch.Tensor) else None))
            return func(*args, **(kwargs or {}))

    with Ops():
        fn()
    return ops


def _op_names(fn):
    """The aten operators fn() runs, by name, in order."""
    return [name for name, _ in _ops(fn)]


def test_softmax_split_sum_is_the_weighted_sum_in_one_lerp():
    """Radix 2 with softmax weights (w0 + w1 = 1): one torch.lerp into an output in x's layout, equal to the
    weighted sum within float rounding; autograd, tracing and mixed dtypes take fused_split_sum."""
    torch.manual_seed(0)
    for batch in (1, 2):
        for channels_last in (False, True):
            for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
                x = torch.randn(batch, 2 * 6, 5, 7).relu()
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                w = torch.softmax(torch.randn(batch, 2, 6, 1, 1), 1)
                ref = (x[:, :6].double() * w[:, 0].double() + x[:, 6:].double() * w[:, 1].double())
                x, w = x.to(dtype), w.to(dtype)
                out = softmax_split_sum(x, w)
                assert out.dtype == dtype and out.shape == (batch, 6, 5, 7)
                assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                         else torch.contiguous_format)
                torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    x = torch.randn(1, 12, 5, 7).contiguous(memory_format=torch.channels_last)
    w = torch.softmax(torch.randn(1, 2, 6, 1, 1), 1)
    ops = _op_names(lambda: softmax_split_sum(x, w))
    assert "lerp" in ops and "mul" not in ops
    # autograd: the functional fused_split_sum, gradients as for any weights
    assert "lerp" not in _op_names(lambda: softmax_split_sum(x.clone().requires_grad_(), w))
    assert softmax_split_sum(x.clone().requires_grad_(), w).requires_grad
    # weights in another dtype than x (lerp needs one dtype): fused_split_sum
    assert "lerp" not in _op_names(lambda: softmax_split_sum(x, w.double()))
    traced = torch.jit.trace(lambda a, b: softmax_split_sum(a, b), (x, w))
    assert "lerp" not in str(traced.graph)
    torch.testing.assert_close(traced(x, w), softmax_split_sum(x, w), atol=1e-6, rtol=1e-6)


def test_fused_radix2_attention_runs_one_lerp():
    """The fused radix-2 split attention (deploy's eager inference) takes softmax_split_sum."""
    torch.manual_seed(0)
    trunk = randomize_norms(build_resnest("resnest14d")).eval()
    fused = fuse_resnest(trunk)
    with torch.no_grad():
        names = _op_names(lambda: fused(torch.randn(1, 3, 64, 64)))
    assert names.count("lerp") == 4 and "addcmul_" not in names  # one per block of resnest14d


def test_fused_avd_pool_runs_before_the_weighted_sum():
    """In the oneDNN path, a stride-2 block's avd average pool runs on the splits, before the weighted sum
    (forward_pooled), which then works at the pooled size; the output equals the plain order's within float
    rounding, for fp32 and bf16, NCHW and channels_last."""
    torch.manual_seed(0)
    trunk = randomize_norms(build_resnest("resnest14d")).eval()
    fused = fuse_resnest(trunk)
    pooled = [b for layer in (fused.layer2, fused.layer3, fused.layer4) for b in layer if b.pool_after is not None]
    assert len(pooled) == 3 and all(b.conv2.pools_before_sum(b.pool_after) for b in pooled)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = trunk(x)
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = fused.to(memory_format=fmt)
        outs = []
        with torch.no_grad():
            ops = _ops(lambda: outs.append(model(x.contiguous(memory_format=fmt))))
        out = outs[0]
        # layer1 (stride 1) at 16x24; layer2..4's sums at their pooled size (the plain order: 16x24, 16x24,
        # 8x12, 4x6)
        assert [shape[2:] for name, shape in ops if name == "lerp"] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        for name in ref:
            assert (out[name] - ref[name]).abs().max().item() <= 1e-5 * ref[name].abs().max().item(), name
        for block in pooled:  # the pooled order against the plain one, block by block
            # small: bf16 NCHW grouped convolutions are emulated, and very slow, on CPUs without native bf16
            mid = torch.relu(block.conv1(torch.randn(2, block.conv1.in_channels, 8, 12).contiguous(memory_format=fmt)))
            for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    a = block.conv2.forward_pooled(mid, block.pool_after)
                    b = block.pool_after(block.conv2(mid))
                assert a.dtype == b.dtype == dtype and a.shape == b.shape == (2, block.conv2.channels, 4, 6)
                assert a.is_contiguous(memory_format=fmt)
                assert (a.float() - b.float()).abs().max().item() <= tol * b.float().abs().max().item()


def test_fuse_model_on_a_container():
    torch.manual_seed(0)
    trunk = randomize_norms(build_resnest("resnest14d", out_features=("res5",)))
    model = nn.Sequential()
    model.add_module("trunk", trunk)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)["res5"]
        fused = fuse_model(model)
        out = fused(x)["res5"]
    assert isinstance(fused.trunk, ResNeSt) and fused.trunk.is_fused
    assert (out - ref).abs().max().item() < ATOL
    with pytest.raises(TypeError, match="ResNeSt trunk"):
        fuse_resnest(model)


def test_training_form_is_unchanged_by_the_fast_path_edits():
    """The trunk keeps the official key names and the batch-1 training fallback of attention_norm."""
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest14d"))
    keys = set(model.state_dict())
    assert {"conv1.0.weight", "bn1.running_mean", "layer1.0.conv2.conv.weight", "layer1.0.conv2.bn0.weight",
            "layer1.0.conv2.fc1.bias", "layer1.0.conv2.bn1.running_var", "layer1.0.conv2.fc2.weight",
            "layer1.0.downsample.1.weight", "layer4.0.downsample.2.bias"} <= keys
    bn1 = model.layer2[0].conv2.bn1
    stats = bn1.running_mean.clone()
    model.train()
    out = model(torch.randn(1, 3, 64, 64))  # batch 1 in training: running statistics, no crash
    assert torch.equal(bn1.running_mean, stats)
    sum(v.mean() for v in out.values()).backward()
    assert model.layer1[0].conv2.fc1.weight.grad is not None


@pytest.mark.parametrize("name", ["resnest50_fast_2s2x40d", "resnest50_fast_4s2x40d", "resnest50d_4s2x40d"])
def test_deploy_keeps_the_model_on_its_device(name):
    """Fusing builds every new tensor (the cardinality > 1 blocks' permuted fc2, the fused convs) on the
    weights' device and in their dtype: deploy on the `meta` device (as on a GPU) leaves no tensor elsewhere,
    and a forward on that device runs. The variant's structure with one block per stage."""
    model = build_resnest(name, layers=(1, 1, 1, 1)).eval().to("meta")
    fast = deploy(model)
    assert {t.device.type for t in [*fast.parameters(), *fast.buffers()]} == {"meta"}
    assert all(isinstance(b, FusedBottleneck) for b in (fast.layer1[0], fast.layer4[0]))
    with torch.no_grad():
        out = fast(torch.randn(2, 3, 64, 96, device="meta").contiguous(memory_format=torch.channels_last))
    assert {k: (v.device.type, tuple(v.shape)) for k, v in out.items()} == {
        k: ("meta", (2, c, 64 // s, 96 // s)) for (k, c), s in zip(model.output_channels().items(),
                                                                 model.output_strides().values())}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["resnest50_fast_2s2x40d", "resnest50_fast_4s2x40d", "resnest50d_4s2x40d"])
def test_deploy_on_cuda(name, no_tf32):
    """A model already on the GPU deploys and equals its CPU self (TF32 off); deploy(dtype=torch.float16) made
    on the CPU and moved to the GPU afterwards runs in float16 there (the autocast device is decided per call)."""
    torch.manual_seed(0)
    model = randomize_norms(build_resnest(name, layers=(1, 1, 1, 1))).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        out = deploy(copy.deepcopy(model).cuda())(x.cuda().contiguous(memory_format=torch.channels_last))
        half = deploy(model, dtype=torch.float16).cuda()(x.cuda())
    assert rel_diff({k: v.cpu() for k, v in out.items()}, ref) < 1e-5
    assert all(v.dtype == torch.float16 for v in half.values())
    assert rel_diff({k: v.float().cpu() for k, v in half.items()}, ref) < 1e-2


def test_fuse_model_refuses_a_model_without_a_trunk():
    """A model with no ResNeSt trunk is refused by name, with the call that folds its norms instead (which
    works: no BatchNorm left in a torchvision ResNet-18), rather than returned unchanged."""
    import torchvision
    resnet = torchvision.models.resnet18().eval()
    for fuse in (fuse_model, deploy):
        with pytest.raises(ValueError, match=r"ResNet contains no ResNeSt trunk.*torch\.fx\.experimental"):
            fuse(resnet)
    from torch.fx.experimental.optimization import fuse as fx_fuse
    assert sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()) == 20
    assert not [m for m in fx_fuse(resnet).modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.d2
def test_fuse_model_on_faster_rcnn():
    """A whole detectron2 Faster R-CNN ResNeSt-FPN: trunk fused, FPN / head norms folded, channels_last."""
    require("resnest_backbone.d2", "needs detectron2: make env installs it")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from resnest_backbone.d2 import add_resnest_config

    cfg = get_cfg()
    add_resnest_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "faster_rcnn_resnest50_fpn.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNEST.VARIANT", "resnest14d",
                         "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    model = randomize_norms(build_model(cfg)).eval()
    fused = fuse_model(model, channels_last=True)
    assert fused.backbone.bottom_up.is_fused and not [
        m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # FPN + head folded too
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        ref = model([{"image": image}])[0]["instances"]
        out = fused([{"image": image}])[0]["instances"]
    assert len(ref) == len(out) > 0
    torch.testing.assert_close(out.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ oneDNN fused convolutions (CPU)
needs_onednn = pytest.mark.skipif(onednn._ONEDNN is None, reason="this torch has no oneDNN")


def count_onednn_calls(monkeypatch) -> dict:
    """Wrap the fast path's oneDNN ops so that each call is counted (and still computed)."""
    calls = {"conv+relu": 0, "conv+add+relu": 0, "conv+add+relu in place": 0}

    def counting(op, name):
        def call(*args):
            calls[name] += 1
            return op(*args)
        return call

    monkeypatch.setattr(onednn, "_ONEDNN", tuple(counting(op, name) for op, name in
                                                     zip(onednn._ONEDNN, calls)))
    return calls


def plain_ops(fused: nn.Module, x: torch.Tensor) -> dict:
    """The fused model's output through the plain PyTorch ops (use_onednn off)."""
    onednn.use_onednn = False
    try:
        return fused(x.clone())
    finally:
        onednn.use_onednn = True


def rel_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)


@needs_onednn
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(radix=4, cardinality=2, bottleneck_width=40, avd_first=True),
    dict(radix=1, cardinality=4, bottleneck_width=24),
    dict(radix=0),
    dict(deep_stem=False),
    dict(output_stride=8),
    dict(out_features=("stem", "res2", "res3", "res4", "res5")),  # every stage output is returned
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_onednn_path_equals_the_plain_ops(overrides, channels_last, monkeypatch):
    """Every fused block runs conv1 + ReLU, conv2 + ReLU and conv3 + add + ReLU as oneDNN calls (the stem's
    conv + ReLU pairs too), the residual sum written in place into a tensor of the block's own (never the
    trunk's input or a returned feature), and the result equals the same model through the plain ops."""
    torch.manual_seed(0)
    fused = fuse_resnest(randomize_norms(build_resnest("resnest14d", **overrides)), channels_last=channels_last)
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    with torch.no_grad():
        ref = plain_ops(fused, x)
        calls = count_onednn_calls(monkeypatch)
        out = fused(x)
        again = {k: v.clone() for k, v in out.items()}
        out2 = fused(x)
    blocks = [b for stage in (fused.layer1, fused.layer2, fused.layer3, fused.layer4) for b in stage]
    stem_convs = 3 if overrides.get("deep_stem", True) else 1
    assert calls["conv+relu"] == 2 * (stem_convs + 2 * len(blocks))  # two forwards
    assert calls["conv+add+relu in place"] == 2 * len(blocks) and calls["conv+add+relu"] == 0
    assert torch.equal(x, x_before)  # the input is never written
    assert rel_diff(out, ref) < 1e-5
    assert all(torch.equal(out2[k], again[k]) for k in out)  # deterministic, nothing left overwritten
    assert all(v.is_contiguous(memory_format=torch.channels_last) == channels_last for v in out.values())


@needs_onednn
def test_onednn_block_overwrites_only_a_stage_internal_input():
    """The identity-shortcut block writes its sum into its input only when fuse_resnest marked that input
    stage-internal (not the first block of a stage); otherwise into a new tensor."""
    torch.manual_seed(0)
    fused = fuse_resnest(randomize_norms(build_resnest("resnest14d", layers=(1, 2, 1, 1))), channels_last=True)
    assert [b.overwrite_input for b in fused.layer2] == [False, True]
    block = fused.layer2[1]
    assert block.downsample is None
    x = torch.randn(1, block.out_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        onednn.use_onednn = False
        try:
            ref = block(x.clone())
        finally:
            onednn.use_onednn = True
        kept = x.clone()
        block.overwrite_input = False
        out = block(x)
        assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
        block.overwrite_input = True
        out_in_place = block(x)
        assert out_in_place.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_in_place, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_path_is_not_taken_where_it_must_not_be(monkeypatch):
    """Autograd, fp16 autocast, tracing, scripting, GroupNorm (not folded) and deformable blocks use the plain
    ops: a trace or a TorchScript graph holds no oneDNN-only op, gradients flow, fp16 stays fp16."""
    torch.manual_seed(0)
    fused = fuse_resnest(randomize_norms(build_resnest("resnest14d")), channels_last=True)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    calls = count_onednn_calls(monkeypatch)
    # autograd: an input that needs a gradient gets one
    xg = x.clone().requires_grad_(True)
    sum(v.sum() for v in fused(xg).values()).backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):  # only bf16 autocast has a oneDNN form
            assert fused(x)["res5"].dtype == torch.float16
        traced = torch.jit.trace(fused, x, strict=False, check_trace=False)
    scripted = torch.jit.script(fused)
    assert calls == {"conv+relu": 0, "conv+add+relu": 0, "conv+add+relu in place": 0}
    for graph in (traced.inlined_graph, scripted.inlined_graph):
        assert "mkldnn::" not in str(graph)
    with torch.no_grad():
        ref = plain_ops(fused, x)
        assert rel_diff(traced(x), ref) < 1e-5 and rel_diff(scripted(x), ref) < 1e-5
        gn = fuse_resnest(randomize_norms(build_resnest("resnest14d", norm="GN")))
        gn(x)
        assert calls["conv+relu"] == 0 and calls["conv+add+relu in place"] == 0  # GroupNorm kept: plain
        dcn = fuse_resnest(randomize_norms(build_resnest("resnest14d", deform_on_per_stage=(False, True, True, True))))
        dcn(x)
    assert calls["conv+add+relu in place"] == len(dcn.layer1)  # only res2: res3-res5 are deformable


@needs_onednn
@pytest.mark.skipif(not onednn._ONEDNN_BF16, reason="this CPU has no oneDNN bf16")
def test_onednn_bf16_under_autocast(monkeypatch):
    """deploy(dtype=torch.bfloat16): the blocks run the oneDNN ops in bf16 on bf16 copies of the weights (made
    once, remade when a weight changes); the result is as close to fp32 as autocast's plain ops are."""
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest14d")).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)).contiguous(
        memory_format=torch.channels_last)
    fast = deploy(model, channels_last=True, dtype=torch.bfloat16)
    with torch.no_grad():
        ref32 = model(x)
        plain = plain_ops(fast, x)
        calls = count_onednn_calls(monkeypatch)
        out = fast(x)
    blocks = sum(len(getattr(fast, f"layer{i}")) for i in (1, 2, 3, 4))
    assert calls["conv+add+relu in place"] == blocks and calls["conv+relu"] == 3 + 2 * blocks
    assert all(v.dtype == torch.bfloat16 for v in out.values())

    def err(a):
        return max(((a[k].float() - ref32[k]).norm() / ref32[k].norm()).item() for k in ref32)
    assert 5e-4 < err(out) < 1e-2 and err(out) < 1.5 * err(plain)
    conv = fast.layer1[0].conv1
    first = conv.__dict__["_onednn_weights"][1]
    assert first.dtype == torch.bfloat16 and "_onednn_weights" not in str(list(fast.state_dict()))
    with torch.no_grad():
        fast(x)
        assert conv.__dict__["_onednn_weights"][1] is first  # kept between calls
        conv.weight.mul_(0)  # a changed weight is seen: res2 then differs
        changed = fast(x)
    assert conv.__dict__["_onednn_weights"][1] is not first
    assert not torch.equal(changed["res2"], out["res2"])
