"""The run of tools/benchmark.py: which implementations x treatments x workloads are measured, into one
plain dict (JSON as it is) that the report is rendered from (render.py) and nothing else.

For each workload, every (implementation, treatment) pair is built afresh from the same seed (the same
weights), treated, called once (this first call also checks it runs: a treatment that raises, at treatment
time or at the first call, is recorded with its message, never fatal), then all the pairs that run are timed
interleaved: `warmup` untimed rounds then `repeats` timed ones (`repeats_large` at detection size, and
`repeats_train` for training steps when given: a step at detection size varies by 10% from round to round); the
report gives the median. Eval entries also record the largest output difference to the same implementation
run eagerly, relative to that output's largest magnitude ("rel_err": what a bf16 or int8 treatment costs in
precision, with random weights), and, unless memory=False, the peak tensor memory of one more call
(compile treatments excluded).

Result layout (run_benchmark):
  env, args                     what and where (measure.environment; the options)
  peak                          matmul and convolution GFLOP/s per dtype (measure.matmul_peak)
  treatments                    {name: {"dtype", "description"}} every treatment that appears
  backbone                      {"implementations": [{"role", "name", "arch", "own"}], "gmacs": {workload:
                                {"resnest", "resnet"}}, "conv_bound": {"resnest", "resnet": measure.conv_bound
                                at the key eval workload}, "eval" / "train": {workload: {role: {treatment:
                                entry}}}, "key_eval", "key_train"}
  detector                      {"workload", "implementations", "eval": {role: {treatment: entry}}}
  grad_checkpoint               {"workload", "rows": [...]} (with --grad-checkpoint)
An entry is {"ms", "runs" (ms per timed round), "cpu_ms", "cpu_runs" (CPU ms of the process, all threads, per
round; CPU runs only), "first_s", "rel_err", "peak_mib", and for training steps on CPU "breakdown"
(measure.op_breakdown of one more step: conv / norm / other ms)} or {"error": message}.

The run first calls measure.steady_allocator (unless steady_allocator_=False): without it, a training step's
page faults vary from round to round by more than the differences being measured. It is recorded in
env["allocator"].
"""
import copy
import gc
import logging
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from resnest_backbone.core import build_resnest
from .candidates import (Implementation, Stages, Workload, backbone_implementations, detector_implementations,
                         torchvision_resnet)
from .measure import (conv_bound, count_gmacs, environment, eval_step, interleaved, load_average, matmul_peak,
                      measure_peak, median, op_breakdown, steady_allocator, TRAIN_LOSS, train_step,
                      try_call)
from .treatments import DETECTOR_MENU, Treatment, menu

logger = logging.getLogger("resnest.benchmark")

__all__ = ["rel_err", "run_backbones", "run_benchmark", "run_detectors", "run_grad_checkpoint", "run_pairs"]


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def rel_err(out, ref) -> Optional[float]:
    """max |out - ref| / max |ref| over all output tensors (in order; dicts by key), or None when the
    outputs do not line up (count or shapes)."""
    a, b = _tensors(out), _tensors(ref)
    if not b or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    scale = max(y.float().abs().max().item() for y in b)
    return diff / scale if scale else diff


def _round(v: float, digits: int = 3) -> float:
    return float(round(v, digits))


def run_pairs(pairs: Sequence[tuple], mode: str, x_of: Callable[[Treatment], object], warmup: int, repeats: int,
              memory: bool, device: torch.device) -> Dict[str, Dict[str, dict]]:
    """Measure (Implementation, Treatment) pairs on one workload: {role: {treatment name: entry}} (see the
    module docstring). `x_of(treatment)` gives the input in the treatment's memory format; mode "eval" or
    "train"."""
    results: Dict[str, Dict[str, dict]] = {}
    fns, steps, refs = {}, {}, {}
    for impl, t in pairs:
        entry = results.setdefault(impl.role, {}).setdefault(t.name, {})
        x = x_of(t)
        torch.manual_seed(0)
        model, err = try_call(lambda: impl.build().to(device))
        if err:
            entry["error"] = f"build: {err}"
            continue
        model.train(mode == "train")
        start = time.perf_counter()
        step, err = try_call(lambda: t.apply(model, x))
        if err:
            entry["error"] = err
            logger.info("  %s / %s fails: %s", impl.name, t.name, err)
            continue
        if mode == "eval":
            fn = (lambda step=step, x=x: eval_step(step, x))
        else:
            fn = (lambda step=step, x=x, model=model: (train_step(step, x), model.zero_grad(set_to_none=True)))
        out, err = try_call(fn)  # also the compile / oneDNN first-call warm-up
        entry["first_s"] = _round(time.perf_counter() - start, 2)
        if err:
            del entry["first_s"]
            entry["error"] = err
            logger.info("  %s / %s fails: %s", impl.name, t.name, err)
            continue
        if mode == "eval":
            if t.name == "eager":  # the reference: the implementation as built (menus list eager first)
                refs[impl.role] = out
            entry["rel_err"] = rel_err(out, refs[impl.role]) if impl.role in refs else None
        del out
        logger.info("  %-40s %-22s ready (treatment + first call %.1f s)", impl.name, t.name, entry["first_s"])
        key = f"{impl.role}|{t.name}"
        fns[key], steps[key] = fn, (impl, t, step, model, x)
    cpu: Dict[str, List[float]] = {}
    times = interleaved(fns, warmup, repeats, device, cpu=cpu if device.type == "cpu" else None)
    for key, runs in times.items():
        impl, t, step, model, x = steps[key]
        entry = results[impl.role][t.name]
        entry["ms"] = median(runs)
        entry["runs"] = [_round(r) for r in runs]
        if key in cpu:
            entry["cpu_ms"] = median(cpu[key])
            entry["cpu_runs"] = [_round(r) for r in cpu[key]]
        if memory and not t.needs_compile:
            if mode == "eval":
                entry["peak_mib"] = measure_peak(lambda: eval_step(step, x), device)
            else:
                entry["peak_mib"] = measure_peak(lambda: train_step(step, x), device)
                model.zero_grad(set_to_none=True)
        if mode == "train" and not t.needs_compile and device.type == "cpu":  # CPU operators run synchronously
            entry["breakdown"] = {k: (_round(v, 1) if isinstance(v, float) else v)
                                  for k, v in op_breakdown(fns[key], device).items()}
        logger.info("  %-40s %-22s %9.1f ms", impl.name, t.name, entry["ms"])
    del fns, steps, refs
    gc.collect()
    return results


def _input_for(w: Workload, device: torch.device) -> Callable[[Treatment], torch.Tensor]:
    x = w.input().to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return lambda t: x_cl if t.channels_last else x


def run_backbones(variant: str, eval_loads: Sequence[Workload], train_loads: Sequence[Workload], *,
                  compile_: bool = False, warmup: int = 1, repeats: int = 7, repeats_large: int = 3,
                  repeats_train: Optional[int] = None,
                  memory: bool = True, device="cpu", dtypes: Optional[Sequence[str]] = None,
                  implementations: Optional[List[Implementation]] = None) -> dict:
    """Every implementation under every treatment of the menu (and its own), on every workload; only the
    treatments of `dtypes` (e.g. ("fp32", "int8")) when given."""
    device = torch.device(device)
    impls = implementations if implementations is not None else backbone_implementations(variant, compile_)
    res: dict = {"implementations": [{"role": i.role, "name": i.name, "arch": i.arch, "own": [t.name for t in i.own]}
                                     for i in impls],
                 "gmacs": {}, "eval": {}, "train": {}, "train_loss": TRAIN_LOSS,
                 "key_eval": eval_loads[-1].label if eval_loads else None,
                 "key_train": train_loads[-1].label if train_loads else None}
    # Multiply-adds: one count per architecture and eval workload (the implementations do the same arithmetic).
    ref = {"resnest": build_resnest(variant).eval(), "resnet": Stages(torchvision_resnet(variant)).eval()}
    for w in eval_loads:
        res["gmacs"][w.label] = {arch: count_gmacs(m, w.input()) for arch, m in ref.items()}
    if eval_loads:  # the convolutions alone at the key workload: the ceiling of each architecture's throughput
        x = eval_loads[-1].input().to(device)
        res["conv_bound"] = {arch: conv_bound(m.to(device), x, device=device) for arch, m in ref.items()}
        logger.info("convolutions alone: %s", res["conv_bound"])
    del ref
    for mode, loads in (("eval", eval_loads), ("train", train_loads)):
        for w in loads:
            logger.info("%s %s", mode, w.label)
            pairs = [(i, t) for i in impls for t in menu(mode, compile_) + (list(i.own) if mode == "eval" else [])
                     if dtypes is None or t.dtype in dtypes]
            res[mode][w.label] = run_pairs(pairs, mode, _input_for(w, device), warmup,
                                           repeats_train if mode == "train" and repeats_train
                                           else repeats_large if w.large else repeats, memory, device)
    return res


def run_detectors(variant: str, workload: Workload, warmup: int = 1, repeats: int = 7, repeats_large: int = 3,
                  device="cpu") -> dict:
    """Faster R-CNN ResNeSt-FPN and R-50-FPN, eval latency, under the detector treatments."""
    device = torch.device(device)
    impls = detector_implementations(variant, device=str(device))
    image = torch.rand(3, workload.height, workload.width, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image.to(device)}]
    logger.info("detector eval %s", workload.label)
    pairs = [(i, t) for i in impls for t in DETECTOR_MENU]
    results = run_pairs(pairs, "eval", lambda t: inputs, warmup, repeats_large if workload.large else repeats,
                        False, device)
    return {"workload": workload.label, "implementations": [{"role": i.role, "name": i.name} for i in impls],
            "eval": results}


def run_grad_checkpoint(variants: Sequence[str], workload: Workload, warmup: int = 1, repeats: int = 3,
                        memory: bool = True, device="cpu") -> dict:
    """Training step (forward + backward, as train_step) of our trunk without and with gradient
    checkpointing (grad_checkpoint=True, the same weights), interleaved, per variant: {"workload",
    "rows": [{"variant", "plain_ms", "checkpoint_ms", "plain_peak", "checkpoint_peak"}]} (ms medians,
    peak tensor MiB)."""
    device = torch.device(device)
    rows = []
    for variant in variants:
        logger.info("grad checkpoint %s %s", variant, workload.label)
        torch.manual_seed(0)
        plain = build_resnest(variant).to(device).train()
        checkpointed = copy.deepcopy(plain).set_grad_checkpointing(True)
        x = workload.input().to(device)
        fns = {name: (lambda m=m: (train_step(m, x), m.zero_grad(set_to_none=True)))
               for name, m in (("plain", plain), ("checkpoint", checkpointed))}
        for fn in fns.values():
            fn()  # first call: allocations, oneDNN primitives
        times = interleaved(fns, warmup, repeats, device)
        row = {"variant": variant, "plain_ms": median(times["plain"]), "checkpoint_ms": median(times["checkpoint"])}
        if memory:
            for name, m in (("plain", plain), ("checkpoint", checkpointed)):
                row[f"{name}_peak"] = measure_peak(lambda m=m: train_step(m, x), device)
                m.zero_grad(set_to_none=True)
        logger.info("  %s", row)
        rows.append(row)
        del plain, checkpointed
    return {"workload": workload.label, "rows": rows}


def run_benchmark(*, variant: str, eval_loads: Sequence[Workload], train_loads: Sequence[Workload],
                  detector_load: Optional[Workload], grad_checkpoint_variants: Sequence[str] = (),
                  grad_checkpoint_load: Optional[Workload] = None, backbone: bool = True, compile_: bool = False,
                  warmup: int = 1, repeats: int = 7, repeats_large: int = 3, repeats_train: Optional[int] = None,
                  memory: bool = True, dtypes: Optional[Sequence[str]] = None,
                  peak_sizes: Sequence[int] = (1024, 2048, 4096), peak_convs: Optional[dict] = None, device="cpu",
                  args: Optional[dict] = None, argv: Optional[Sequence[str]] = None,
                  steady_allocator_: bool = True) -> dict:
    """The whole run, in the current torch threads: machine peak, backbones, detectors (when detectron2 is
    installed and detector_load is given), gradient checkpointing (when variants are given)."""
    start = time.perf_counter()
    env = environment(device)
    env["allocator"] = (steady_allocator() if steady_allocator_ else None) or "default"
    logger.info("torch %s, threads %s (interop %s), %s", env["torch"], env["threads"], env["interop_threads"],
                env["device"])
    res: dict = {"schema": 2, "env": env, "args": dict(args or {})}
    rounds = dict(warmup=warmup, repeats=repeats, repeats_large=repeats_large, device=device)
    if backbone:
        res["peak"] = matmul_peak(peak_sizes, device=device, conv_shapes=peak_convs, dtypes=dtypes)  # None: CONV_SHAPES
        res["backbone"] = run_backbones(variant, eval_loads, train_loads, compile_=compile_, memory=memory,
                                        repeats_train=repeats_train, dtypes=dtypes, **rounds)
        if detector_load is not None:
            try:
                import detectron2  # noqa: F401
            except ImportError:
                logger.info("detectron2 is not installed: no detector benchmark")
            else:
                res["detector"] = run_detectors(variant, detector_load, **rounds)
        seen = {t.name: t for mode in ("eval", "train") for t in menu(mode, compile_)}
        seen.update({t.name: t for i in backbone_implementations(variant, compile_) for t in i.own})
        seen.update({t.name: t for t in DETECTOR_MENU})
        res["treatments"] = {n: {"dtype": t.dtype, "description": t.description} for n, t in seen.items()}
    if grad_checkpoint_variants:
        res["grad_checkpoint"] = run_grad_checkpoint(grad_checkpoint_variants, grad_checkpoint_load,
                                                     warmup=warmup, repeats=repeats_large, memory=memory,
                                                     device=device)  # a heavy step: the detection-size count
    env["load_after"] = load_average()
    env["argv"] = list(argv) if argv is not None else sys.argv[1:]
    env["duration_s"] = round(time.perf_counter() - start)
    return res
