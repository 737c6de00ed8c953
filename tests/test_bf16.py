"""Reduced precision: the bfloat16 inference path (core.fuse.deploy(dtype=torch.bfloat16)) against float32, and
mixed-precision training steps under autocast (what detectron2's SOLVER.AMP and mmengine's AmpOptimWrapper
run): the radix softmax and the BatchNorm statistics stay float32.

Error measure: per-stage relative error ||f_bf16 - f_fp32|| / ||f_fp32|| (Frobenius norm over the whole feature
map). bfloat16 keeps 8 significant bits: one rounding is off by at most 2^-9 (~2e-3) relative, 2^-8 = 3.9e-3
between neighbours. How much a net amplifies such roundings depends on the net (no pretrained weights here),
so two models (measured 2026-11-23, torch 2.14.1 CPU, oneDNN):
  - well conditioned (the residual stream dominates, as in trained nets): 3.0e-3..3.7e-3 per stage, about one
    rounding, not growing with depth. Bound BF16_REL = 1e-2 (about 2.5 roundings); a lower bound (> 5e-4)
    checks that the run was really in bfloat16;
  - sensitive (random init, calibrated BN): the error is bounded relative to what rounding the weights to
    bf16 alone costs in fp32 (ROUNDING_FACTOR = 2; measured 1.3..1.5).
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from resnest_backbone.core import build_resnest
from resnest_backbone.core import fuse, precision
from resnest_backbone.core.fuse import deploy
from resnest_backbone.core.precision import (autocast_device, autocast_forward, autocast_inference, fp32_heads,
                                             register_fp32_heads, slower_than_fp32)
from test_fuse import randomize_norms

BF16_REL = 1e-2
BF16_MIN = 5e-4  # below this, the "bf16" run was not in bf16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def calibrated(name="resnest50", seed=0, batches=3, size=(96, 128)) -> nn.Module:
    """Random init with BN running statistics measured on image-like data (cumulative average over a few
    batches in train mode)."""
    torch.manual_seed(seed)
    model = build_resnest(name)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(images(8, size, g))
    return model.eval()


def images(n: int, size, generator) -> torch.Tensor:
    """Image-like inputs: smooth random structure (upsampled coarse noise), a brightness and contrast per
    image, a little pixel noise. Pure white noise would make every image's pooled features alike, and the
    split attention's norm (over one pooled value per image) would calibrate to a near-zero variance."""
    coarse = torch.randn(n, 3, max(size[0] // 16, 2), max(size[1] // 16, 2), generator=generator)
    x = nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    contrast = torch.rand(n, 1, 1, 1, generator=generator) * 1.5 + 0.25
    brightness = torch.randn(n, 1, 1, 1, generator=generator) * 0.5
    return x * contrast + brightness + 0.1 * torch.randn(n, 3, *size, generator=generator)


class OpRecorder(TorchDispatchMode):
    """The dtypes the aten ops really ran in (after autocast's casts): softmax inputs, batch-norm inputs
    and running statistics, convolutions (input, weight) and their backward (grad_output, input, weight)."""

    def __init__(self):
        super().__init__()
        self.softmax, self.batch_norm, self.convolution, self.convolution_backward = [], [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_softmax":
            self.softmax.append(args[0].dtype)
        elif name == "convolution":
            self.convolution.append((args[0].dtype, args[1].dtype))
        elif name == "convolution_backward":
            self.convolution_backward.append((args[0].dtype, args[1].dtype, args[2].dtype))
        elif name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                      "_batch_norm_with_update"):
            self.batch_norm.append((args[0].dtype, args[3].dtype if args[3] is not None else None))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def resnest50():
    return calibrated()


@pytest.fixture(scope="module")
def stable50():
    torch.manual_seed(0)
    return randomize_norms(build_resnest("resnest50")).eval()


def bf16_features(model, x):
    with torch.no_grad():
        fast = deploy(model, channels_last=True, dtype=torch.bfloat16)
        recorder = OpRecorder()
        with recorder:
            out = fast(x.contiguous(memory_format=torch.channels_last))
    assert fast is not model and fast.autocast_dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in out.values()), {k: v.dtype for k, v in out.items()}
    # the radix softmax of each of the 16 split-attention blocks ran in float32
    assert recorder.softmax == [torch.float32] * 16
    return out


def test_deploy_bf16_per_stage_error(stable50):
    """A well-conditioned ResNeSt-50 (test_fuse's random norms: last norm of each residual branch small, as
    in trained nets): every stage within BF16_REL of float32 (measured 3.0e-3..3.7e-3 here and at 800x1216)."""
    x = images(2, (128, 160), torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = stable50(x)
    out = bf16_features(stable50, x)
    errors = {k: rel_err(out[k], ref[k]) for k in ref}
    assert all(BF16_MIN < e < BF16_REL for e in errors.values()), errors
    with torch.no_grad():  # the fp32 model is untouched (no autocast hooks): its outputs stay float32
        assert all(v.dtype == torch.float32 for v in stable50(x[:1, :, :64, :64]).values())


def test_deploy_bf16_error_within_weight_rounding(resnest50):
    """A sensitive net (random init, BN statistics calibrated on image-like data, all gammas 1: perturbations
    grow with depth, even fp32 rounding differences 1e-6 -> 2e-5, and rounding only the input image to
    bf16 moves res5 by 9%): the bf16 path's error per stage is at most ROUNDING_FACTOR x the error of the
    same net computed in fp32 with its weights rounded to bf16, the rounding that storing bf16 weights
    already costs (measured ratio 1.27..1.46; res5: 0.22 vs 0.17)."""
    ROUNDING_FACTOR = 2.0
    x = images(2, (128, 160), torch.Generator().manual_seed(5))
    rounded = deploy(resnest50, channels_last=False)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
        ref, ref_rounded = resnest50(x), rounded(x)
    out = bf16_features(resnest50, x)
    errors = {k: rel_err(out[k], ref[k]) for k in ref}
    floor = {k: rel_err(ref_rounded[k], ref[k]) for k in ref}
    assert all(errors[k] < ROUNDING_FACTOR * floor[k] for k in ref), (errors, floor)


def test_deploy_fp32_unchanged_and_bad_dtype(resnest50):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = deploy(resnest50)(x), deploy(resnest50, dtype=torch.float32)(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        deploy(resnest50, dtype=torch.int8)
    with pytest.raises(ValueError, match="keep_fp32 names"):
        autocast_inference(copy.deepcopy(resnest50), keep_fp32=["no.such.module"])


def test_autocast_model_copies_and_reconfigures(resnest50):
    fast = deploy(resnest50, dtype=torch.bfloat16)
    clone = copy.deepcopy(fast)  # the hooks travel with copies, rebuilt (no shared state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert clone(x)["res5"].dtype == torch.bfloat16
        autocast_inference(clone, torch.float16)  # replaces, does not stack
        assert len(clone._forward_pre_hooks) == 1 and len(fast._forward_pre_hooks) == 1
        assert clone(x)["res5"].dtype == torch.float16
        assert fast(x)["res5"].dtype == torch.bfloat16
    assert fp32_heads(resnest50) == []  # a trunk has no score / box predictor


def test_predictor_kept_fp32(monkeypatch):
    """A module registered as an fp32 head (register_fp32_heads: by class, or by class name with submodule
    names, as the adapters do) runs without autocast on fp32 inputs: its outputs are float32, the rest of the
    model's bf16. The core itself names no head (a fresh process: nothing registered until an adapter is
    imported)."""
    code = "import resnest_backbone.core.fuse, resnest_backbone.core.precision as p; print(p.FP32_HEADS)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "{}"

    class Predictor(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_score = nn.Linear(8, 3)

        def forward(self, x):
            return self.cls_score(x)

    class Head(Predictor):  # a subclass of a class registered by name, and a submodule
        pass

    monkeypatch.setattr(precision, "FP32_HEADS", {})
    model = nn.Sequential(nn.Linear(4, 8), Predictor())
    assert fp32_heads(model) == [] and fp32_heads(nn.Sequential(Head())) == []
    register_fp32_heads({Predictor: ("",)})
    assert fp32_heads(model) == ["1"]
    register_fp32_heads({"Predictor": ("cls_score", "no_such_layer")})
    register_fp32_heads({"Predictor": ("other_frameworks_layer",)})  # a shared class name adds, not replaces
    assert fp32_heads(nn.Sequential(Head())) == ["0", "0.cls_score"]
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = model(x)
        autocast_inference(model, torch.bfloat16)
        out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model[0](x)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.allclose(out, model[1](hidden.float()))  # fp32 linear on the bf16-rounded features
    assert BF16_MIN / 10 < rel_err(out, ref) < BF16_REL


def test_autocast_training_step_keeps_fp32_softmax_and_bn():
    """One training step of ResNeSt-50 with the forward under bf16 autocast (autocast_forward: what the
    detectron2 AutocastTrainer runs; mmengine's AmpOptimWrapper enters the same torch.autocast), against the
    same step in float32 from the same weights and input: loss and gradients finite and float32, the loss
    within BF16_REL of fp32's, the radix softmax computed in float32, BatchNorm normalising bf16 activations
    with float32 statistics. The running statistics (here: exactly this batch's statistics) are checked
    against a float64 recomputation from the bf16 activations each BN layer received, within BN_STATS_REL
    (relative, per layer): the statistics are accumulated in fp32, not rounded to bf16 (which would be off by
    ~2e-3). (Against the fp32 model's own statistics they differ more, up to 0.2 in res5, because a random-init
    net in train mode amplifies the forward's bf16 roundings with depth; median 5e-3.)"""
    BN_STATS_REL = 1e-5  # measured 1.8e-7 (fp32 accumulation); bf16 rounding would be ~2e-3
    torch.manual_seed(0)
    model = randomize_norms(build_resnest("resnest50")).train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for m in bns.values():  # running statistics = this step's batch statistics (cumulative average)
        m.momentum = None
        m.reset_running_stats()
    reference = copy.deepcopy(model)
    seen = {}

    def keep_input(name):
        def hook(module, args):
            x = args[0].detach()
            seen[name] = (x.dtype, x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=True))
        return hook

    handles = [m.register_forward_pre_hook(keep_input(n)) for n, m in bns.items()]
    x = images(2, (96, 128), torch.Generator().manual_seed(3))
    recorder = OpRecorder()
    with recorder, autocast_forward(model, "cpu", torch.bfloat16):
        out = model(x)
        loss = sum(v.float().square().mean() for v in out.values())
    for h in handles:
        h.remove()
    loss.backward()
    ref_loss = sum(v.square().mean() for v in reference(x).values())

    assert out["res5"].dtype == torch.bfloat16  # it did run in bf16
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < BF16_REL * ref_loss.item()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert recorder.softmax == [torch.float32] * 16
    assert len(recorder.batch_norm) == len(bns)  # every BN: fp32 running statistics, and it got bf16 inputs
    assert {stats for _, stats in recorder.batch_norm} == {torch.float32}
    assert {inp for inp, _ in recorder.batch_norm} == {torch.bfloat16}
    errs = {}
    for name, bn in bns.items():
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        dtype, mean, var = seen[name]
        assert dtype == torch.bfloat16, name
        errs[name] = max(rel_err(bn.running_mean, mean), rel_err(bn.running_var, var))
    assert max(errs.values()) < BN_STATS_REL, max(errs.items(), key=lambda kv: kv[1])


def test_autocast_device_is_the_weights_device_at_call_time():
    """The autocast device type is decided at each call from where the weights are then (autocast_device),
    not when deploy() ran: a model deployed on `meta` (standing for a GPU: the same decision) and then moved
    to the CPU runs in bf16 there. A module without weights takes its input's device."""
    torch.manual_seed(0)
    model = build_resnest("resnest14d", out_features=("res5",)).eval()
    on_cpu = deploy(model)
    fast = deploy(copy.deepcopy(model).to("meta"), dtype=torch.bfloat16)
    assert autocast_device(fast) == "meta"
    fast.to_empty(device="cpu").load_state_dict(on_cpu.state_dict())
    assert autocast_device(fast) == "cpu"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = fast(x)["res5"], on_cpu(x)["res5"]
    assert out.dtype == torch.bfloat16 and BF16_MIN < rel_err(out, ref) < BF16_REL
    assert autocast_device(nn.ReLU(), (torch.empty(1, device="meta"),)) == "meta"
    assert autocast_device(nn.ReLU(), ([torch.empty(1, device="meta")],)) == "cpu"  # no tensor argument


AVX2 = {"cpu_name": "AMD EPYC", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


def test_slower_than_fp32_from_the_cpu_flags():
    """bf16 without native bf16 instructions (neither AMX nor AVX-512 BF16), fp16 without native fp16 ones, is
    named slower than fp32, with the CPU's flags; with them, or for float32, nothing is said."""
    said = slower_than_fp32(torch.bfloat16, AVX2)
    assert said and "(AMD EPYC: avx2) is slower than float32" in said and "8.1x on an AVX2 AMD EPYC" in said
    xeon = {**AVX2, "avx2": False, "avx512_f": True, "avx512_vnni": True, "cpu_name": "Xeon"}
    assert "(Xeon: avx512_f avx512_vnni) is slower" in slower_than_fp32(torch.bfloat16, xeon)
    assert "torch.float16 on this CPU (AMD EPYC: avx2)" in slower_than_fp32(torch.float16, AVX2)
    for dtype, native in ((torch.bfloat16, "avx512_bf16"), (torch.bfloat16, "amx_bf16"),
                          (torch.float16, "avx512_fp16"), (torch.float16, "amx_fp16")):
        assert slower_than_fp32(dtype, {**AVX2, native: True}) is None
    assert slower_than_fp32(None, AVX2) is None and slower_than_fp32(torch.float32, AVX2) is None


def test_deploy_warns_where_bf16_is_slower(monkeypatch):
    """deploy(dtype=torch.bfloat16) of a CPU model says so where bf16 is slower here; not where the CPU has
    native bf16, and not for float32."""
    model = build_resnest("resnest14d", layers=(1, 1, 1, 1)).eval()
    monkeypatch.setattr(fuse, "cpu_flags", lambda: AVX2)
    with pytest.warns(UserWarning, match=r"deploy: torch.bfloat16 on this CPU \(AMD EPYC: avx2\) is slower"):
        deploy(model, dtype=torch.bfloat16)
    monkeypatch.setattr(fuse, "cpu_flags", lambda: {**AVX2, "amx_bf16": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy(model, dtype=torch.bfloat16)
        monkeypatch.setattr(fuse, "cpu_flags", lambda: AVX2)
        deploy(model)
