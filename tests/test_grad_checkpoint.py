"""Gradient checkpointing (ResNeSt grad_checkpoint, detectron2 MODEL.RESNEST.GRAD_CHECKPOINT, mmdet/mmseg
with_cp): the same gradients, running statistics and DropBlock masks as the plain model (also resnest50 with
SyncBN across two processes), less memory, and the plain path wherever no backward follows (eval, no_grad,
frozen blocks, TorchScript, tracing, fused)."""
import copy
import os

import pytest
import torch

from conftest import require
import resnest_backbone.core.trunk as trunk_module
from benchmarks.measure import PeakTensorMemory
from resnest_backbone.core import Bottleneck, DropBlock2D, build_resnest

TOL = 1e-6  # measured here: 0.0 for every case below (the recomputation is the same arithmetic)


def _train_steps(model, x, steps=2, seed=1):
    """`steps` SGD steps on a loss touching every output; returns the last step's parameter gradients (by
    name), the input's gradient, and the random state after the steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        out = model(inp)
        outs = out.values() if isinstance(out, dict) else out
        loss = sum((o * torch.linspace(-1, 1, o.shape[1]).view(1, -1, 1, 1)).square().mean() for o in outs)
        loss.backward()
        opt.step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return grads, inp.grad.clone(), torch.get_rng_state()


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


def _compare(plain, checkpointed, x, steps=2):
    """Train both for `steps` steps from the same weights and seed: gradients (every parameter, the input)
    within TOL, and then parameters and every buffer (BN running_mean / running_var / num_batches_tracked)
    equal. Returns the largest gradient difference."""
    g1, x1, rng1 = _train_steps(plain, x, steps)
    g2, x2, rng2 = _train_steps(checkpointed, x, steps)
    diff = max(_max_diff(g1, g2), (x1 - x2).abs().max().item())
    assert diff <= TOL, diff
    assert g1 and len(g1) == len([p for p in plain.parameters() if p.requires_grad])
    for (name, a), (_, b) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        assert torch.equal(a, b), name  # parameters after the steps, running stats, num_batches_tracked
    assert torch.equal(rng1, rng2)  # the recomputation gives the random state back as it found it
    return diff


def _pair(variant, **kwargs):
    torch.manual_seed(0)
    plain = build_resnest(variant, **kwargs).train()
    checkpointed = copy.deepcopy(plain).set_grad_checkpointing(True)
    return plain, checkpointed


@pytest.mark.parametrize("variant,kwargs", [
    ("resnest14d", {}),
    ("resnest14d", dict(dropblock_prob=0.3)),  # DropBlock in res4/res5: the same masks when recomputed
    ("resnest26d", dict(norm="SyncBN", dropblock_prob=0.2, output_stride=16)),  # SyncBN (one process: BN)
    ("resnest50_fast_1s1x64d", dict(layers=(1, 1, 2, 1))),  # radix 1 (sigmoid gate), avd_first
    ("resnest14d", dict(radix=0, norm="GN")),  # plain grouped conv, GroupNorm (no running stats)
    ("resnest14d", dict(norm=lambda c: torch.nn.BatchNorm2d(c, momentum=None))),  # cumulative average
    ("resnest14d", dict(deform_on_per_stage=(False, True, True, True), deform_modulated=True,
                        deform_num_groups=2)),  # DCNv2 split attention: the offset branch recomputed too
])
def test_gradients_and_running_stats_equal_plain(one_thread, variant, kwargs):
    plain, checkpointed = _pair(variant, **kwargs)
    assert checkpointed.grad_checkpoint and all(b.grad_checkpoint for b in checkpointed.modules()
                                                if isinstance(b, Bottleneck))
    _compare(plain, checkpointed, torch.randn(2, 3, 64, 64))


def _syncbn_worker(rank, world, init_method, out_dir):
    """resnest50 with SyncBN and DropBlock, plain and checkpointed, trained on this process's images (1 and 2:
    unequal batches); what each gave, to out_dir/rank{rank}.pt."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    plain, checkpointed = _pair("resnest50", norm="SyncBN", dropblock_prob=0.1)
    x = torch.randn(1 + rank, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        grads, x_grad, rng = _train_steps(model, x)
        results[name] = dict(grads=grads, x_grad=x_grad, rng=rng, state=model.state_dict())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_resnest50_with_syncbn_in_two_processes(tmp_path):
    """What the README claims, as claimed: the real resnest50, SyncBN synchronising two gloo processes with
    unequal batches (1 + 2 images), DropBlock on, two SGD steps: the checkpointed model's gradients (every
    parameter's, the input's) within TOL of the plain model's in each process, then parameters and BN
    statistics equal; and the statistics are the global batch's (equal in both processes)."""
    import torch.multiprocessing as mp

    mp.spawn(_syncbn_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        plain, checkpointed = got["plain"], got["checkpointed"]
        assert len(plain["grads"]) == len([p for p in build_resnest("resnest50").parameters()])
        diff = max(_max_diff(plain["grads"], checkpointed["grads"]),
                   (plain["x_grad"] - checkpointed["x_grad"]).abs().max().item())
        assert diff <= TOL, diff
        assert all(torch.equal(v, checkpointed["state"][k]) for k, v in plain["state"].items())
        assert torch.equal(plain["rng"], checkpointed["rng"])
    stats = [k for k in ranks[0]["plain"]["state"] if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(ranks[0]["plain"]["state"][k], ranks[1]["plain"]["state"][k]) for k in stats)


def test_recomputation_runs_and_dropblock_drops(one_thread, monkeypatch):
    """The checkpoint really recomputes (each block's norms run twice per step, and the buffers still equal
    the plain model's because the second run's updates are undone), and DropBlock is active in the step."""
    plain, checkpointed = _pair("resnest14d", dropblock_prob=0.3)
    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.layer3[0].bn3.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
    drops = []
    checkpointed.layer3[0].dropblock3.register_forward_hook(lambda m, i, o: drops.append((o == 0).float().mean()))
    _compare(plain, checkpointed, torch.randn(2, 3, 64, 64), steps=1)
    assert calls == {"plain": 1, "checkpointed": 2}
    assert len(drops) == 2 and drops[0] > 0 and torch.equal(drops[0], drops[1])  # same mask, recomputed

    # Without undoing the recomputation's buffer updates, the statistics would be updated twice.
    monkeypatch.setattr(trunk_module, "_undo_buffer_updates", lambda module: torch.enable_grad())
    again = copy.deepcopy(checkpointed)
    _train_steps(again, torch.randn(2, 3, 64, 64), steps=1)
    assert int(again.layer3[0].bn3.num_batches_tracked) == int(checkpointed.layer3[0].bn3.num_batches_tracked) + 2


def _train_memory_mib(model, x):
    """(MiB held between forward and backward: what is saved for the backward, outputs included;
    peak MiB of the whole step) of tensors, by the benchmark's tracker."""
    with PeakTensorMemory() as tracker:
        loss = sum(o.mean() for o in model(x).values())
        held = tracker.current
        loss.backward()
    model.zero_grad(set_to_none=True)
    return held / 2**20, tracker.peak / 2**20


def test_checkpointing_lowers_memory(one_thread):
    """Measured here (resnest26d, 2x3x128x128): 52.6 -> 16.8 MiB held after the forward, peak 101.7 -> 84.3
    MiB (the peak includes the stem, which is not checkpointed, and the weight gradients)."""
    plain, checkpointed = _pair("resnest26d")
    x = torch.randn(2, 3, 128, 128)
    (held_cp, peak_cp), (held, peak) = _train_memory_mib(checkpointed, x), _train_memory_mib(plain, x)
    assert held_cp < 0.4 * held, (held_cp, held)
    assert peak_cp < 0.9 * peak, (peak_cp, peak)


def test_plain_path_without_backward(one_thread, monkeypatch):
    """eval, no_grad, and blocks with nothing to differentiate (frozen, input without grad) never enter
    torch.utils.checkpoint; frozen stages are skipped while the trainable ones are checkpointed."""
    used = []
    real = trunk_module.checkpoint
    monkeypatch.setattr(trunk_module, "checkpoint", lambda fn, *a, **k: used.append(fn) or real(fn, *a, **k))
    model = build_resnest("resnest14d", grad_checkpoint=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    assert used == []
    model.freeze(3)  # stem, res2, res3 frozen: their blocks have nothing to differentiate
    model.train()(x)
    assert [fn.__self__ for fn in used] == [model.layer3[0], model.layer4[0]]
    model.set_grad_checkpointing(False)
    used.clear()
    model(x)
    assert used == []


def test_state_dict_script_trace_and_fuse_unchanged(one_thread, tmp_path):
    """Same state_dict keys; TorchScript scripting and tracing (also in training mode) record the plain
    forward; the fused inference form converts as before."""
    plain, checkpointed = _pair("resnest14d")
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    scripted = torch.jit.script(checkpointed)
    with torch.no_grad():
        ref = plain.eval()(x)
        for out in (scripted.eval()(x), torch.jit.trace(checkpointed.eval(), x, strict=False)(x)):
            assert all(torch.allclose(out[k], ref[k], atol=1e-5) for k in ref)
    # training mode: the scripted module runs (its forward holds no checkpoint) and traces need no backward
    plain.train(), checkpointed.train(), scripted.train()
    torch.manual_seed(3)
    a = plain(x)
    torch.manual_seed(3)
    b = scripted(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    traced = torch.jit.trace(checkpointed, x.clone().requires_grad_(), strict=False, check_trace=False)
    assert "checkpoint" not in str(traced.inlined_graph)
    checkpointed.eval()  # (the training-mode runs above moved its running statistics)
    fused = copy.deepcopy(checkpointed).fuse()
    with torch.no_grad():
        ref, out = checkpointed(x), fused(x)
    assert all(torch.allclose(out[k], ref[k], atol=1e-4) for k in ref)


def test_bad_value_is_refused():
    with pytest.raises(ValueError, match="grad_checkpoint"):
        build_resnest("resnest14d", grad_checkpoint="yes")


# ------------------------------------------------------------------------------------------- detectron2
@pytest.mark.d2
def test_d2_config_key_builds_and_trains_equal(one_thread):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from conftest import d2_cfg
    from test_d2_model import SMALL, _batch

    models = []
    for flag in (False, True):
        cfg = d2_cfg(**SMALL, **{"MODEL.RESNEST.GRAD_CHECKPOINT": flag, "MODEL.RESNEST.DROPBLOCK_PROB": 0.1})
        torch.manual_seed(0)
        models.append(build_model(cfg).train())
    plain, checkpointed = models
    assert checkpointed.backbone.bottom_up.grad_checkpoint and not plain.backbone.bottom_up.grad_checkpoint
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in models:
        torch.manual_seed(5)
        with EventStorage():
            sum(model(_batch()).values()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[1]) > 0 and _max_diff(*grads) <= TOL
    for (name, a), (_, b) in zip(plain.state_dict().items(), checkpointed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.d2
def test_lazyconfig_backbone_kwarg():
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    from resnest_backbone.d2 import ResNeStBackbone

    backbone = instantiate(L(ResNeStBackbone)(variant="resnest14d", norm="BN", freeze_at=2, grad_checkpoint=True))
    assert backbone.grad_checkpoint and backbone.layer4[0].grad_checkpoint


# ------------------------------------------------------------------------------------------ mmdet / mmseg
def test_mm_with_cp_builds_and_trains_equal(one_thread):
    require("mmengine", "make env installs the OpenMMLab stack")
    require("mmdet", "make env installs mmdet==3.3.0")
    require("mmseg", "make env installs mmsegmentation==1.2.2")
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    import resnest_backbone.mm  # noqa: F401  registers ResNeStSA

    cfg = dict(type="ResNeStSA", variant="resnest14d", frozen_stages=1, dropblock_prob=0.2,
               norm_cfg=dict(type="SyncBN", requires_grad=True))
    torch.manual_seed(0)
    plain = MMDET_MODELS.build(cfg).train()
    checkpointed = MMDET_MODELS.build(dict(cfg, with_cp=True))
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.grad_checkpoint and not plain.grad_checkpoint
    checkpointed.train()
    _compare(plain, checkpointed, torch.randn(2, 3, 64, 64))
    assert plain.layer1[0].conv1.weight.grad is None  # frozen_stages=1: still frozen
    seg = MMSEG_MODELS.build(dict(type="ResNeStSA", variant="resnest14d", output_stride=8, with_cp=True))
    assert seg.grad_checkpoint and seg.layer4[0].grad_checkpoint
