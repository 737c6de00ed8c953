#!/usr/bin/env python
"""Side-by-side speed of ResNeSt backbones: ours (training form and inference fast path), the official code
(resnest==0.0.5), timm, and a ResNet baseline of the same depth; plus Faster R-CNN ResNeSt-FPN vs R-FPN.

    python tools/benchmark.py                         # full run; writes docs/benchmark.md + docs/benchmark.png
    python tools/benchmark.py --threads 2 --repeats 7 --compile
    python tools/benchmark.py --smoke --out /tmp/b.md --png /tmp/b.png   # tiny sizes, one repeat (tests)

Method: every model runs in this one process, interleaved (A B C A B C ...) so that drifts in machine load
hit all of them alike, after warm-up rounds; each number is the median over the repeats. The torch thread
count is fixed (--threads) and printed. Measured per workload (batch x height x width):
  eval   latency of one forward pass in eval mode under torch.no_grad()
  train  one training step: forward in train mode + backward of the sum of the outputs' means
  peak   peak memory of the tensors allocated during the step (on CPU, counted by a dispatch-mode tracker
         over tensor storages; on CUDA, torch.cuda.max_memory_allocated), above what existed before it
  GMAC   multiply-adds of the architecture (fvcore; it reports a multiply-add as one "flop"), and the
         achieved rate = GMAC / eval latency.
The backbone models all return the four stage outputs (res2..res5); the classifier is not run.
"""
import os

if __name__ == "__main__":
    # OpenMP threads that spin while waiting (the default) slow everything down many times over when other
    # processes share the CPUs; sleeping waiters cost little on an idle machine. It must be set before torch
    # loads, so only when run as a script. Override it by setting OMP_WAIT_POLICY yourself.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime
import json
import logging
import platform
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resnest_backbone.core import build_resnest, get_variant  # noqa: E402
from resnest_backbone.core.fuse import deploy  # noqa: E402

logger = logging.getLogger("resnest.benchmark")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    batch: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} b{self.batch}"

    @property
    def large(self) -> bool:  # detection-size work: fewer timed rounds (--repeats-large)
        return self.batch * self.height * self.width >= 800 * 1216

    def input(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(self.batch, 3, self.height, self.width, generator=torch.Generator().manual_seed(seed))


FULL_EVAL = (Workload(1, 224, 224), Workload(8, 224, 224), Workload(1, 800, 1216))
FULL_TRAIN = (Workload(1, 224, 224), Workload(8, 224, 224), Workload(1, 800, 1216), Workload(2, 800, 1216))
SMOKE_EVAL = (Workload(1, 64, 64), Workload(2, 64, 96))
SMOKE_TRAIN = (Workload(2, 64, 64),)


# -------------------------------------------------------------------------------------------- candidates
class Stages(nn.Module):
    """Run an ImageNet ResNet-style model (official ResNeSt, timm, torchvision) up to its four stages and
    return their outputs, like our trunk (no pooling / classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = model.conv1, model.bn1
        self.relu = model.relu if hasattr(model, "relu") else model.act1  # timm calls it act1
        self.maxpool = model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


@dataclass
class Candidate:
    name: str
    build: Callable[[], nn.Module]
    trains: bool = True  # has a training step (the fast path is inference only)
    channels_last: bool = False  # feed channels_last inputs
    arch: str = "resnest"  # which fvcore count applies ("resnest" / "resnet")
    module: Optional[nn.Module] = None
    error: Dict[str, str] = field(default_factory=dict)


def official_resnest(variant: str) -> nn.Module:
    from resnest.torch.resnet import Bottleneck, ResNet

    v = get_variant(variant)
    return ResNet(Bottleneck, list(v.layers), radix=v.radix, groups=v.cardinality,
                  bottleneck_width=v.bottleneck_width, deep_stem=v.deep_stem, stem_width=v.stem_width,
                  avg_down=v.avg_down, avd=v.avd, avd_first=v.avd_first)


def timm_resnest(variant: str) -> nn.Module:
    from timm.models.resnest import ResNestBottleneck
    from timm.models.resnet import ResNet

    v = get_variant(variant)
    return ResNet(block=ResNestBottleneck, layers=list(v.layers), stem_type="deep", stem_width=v.stem_width,
                  avg_down=v.avg_down, base_width=v.bottleneck_width, cardinality=v.cardinality,
                  block_args=dict(radix=v.radix, avd=v.avd, avd_first=v.avd_first))


def torchvision_resnet(variant: str) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, list(get_variant(variant).layers))


def fold_bn_fx(model: nn.Module) -> nn.Module:
    """The same inference treatment for a plain ResNet: conv+BN folding (torch.fx) and channels_last."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval()).to(memory_format=torch.channels_last)


def resnet_depth_name(variant: str) -> str:
    return f"ResNet-{sum(get_variant(variant).layers) * 3 + 2}"


def backbone_candidates(variant: str, compile_: bool) -> List[Candidate]:
    rn = resnet_depth_name(variant)
    cands = [
        Candidate(f"{variant} ours", lambda: build_resnest(variant)),
        Candidate(f"{variant} ours, channels_last", lambda: build_resnest(variant).to(
            memory_format=torch.channels_last), channels_last=True),
        Candidate(f"{variant} ours, fast path", lambda: deploy(build_resnest(variant).eval(), channels_last=True),
                  trains=False, channels_last=True),
        Candidate(f"{variant} official 0.0.5", lambda: Stages(official_resnest(variant))),
        Candidate(f"{variant} timm", lambda: Stages(timm_resnest(variant))),
        Candidate(f"{rn} torchvision", lambda: Stages(torchvision_resnet(variant)), arch="resnet"),
        Candidate(f"{rn} torchvision, BN folded + channels_last",
                  lambda: fold_bn_fx(Stages(torchvision_resnet(variant))), trains=False, channels_last=True,
                  arch="resnet"),
    ]
    if compile_:
        cands.append(Candidate(f"{variant} ours, fast path + torch.compile",
                               lambda: deploy(build_resnest(variant).eval(), channels_last=True, compile=True),
                               trains=False, channels_last=True))
        cands.append(Candidate(f"{rn} torchvision, BN folded + channels_last + torch.compile",
                               lambda: torch.compile(fold_bn_fx(Stages(torchvision_resnet(variant))),
                                                     options={"freezing": True}),
                               trains=False, channels_last=True, arch="resnet"))
    return cands


# ------------------------------------------------------------------------------------------- measuring
class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created while active (CPU or any device), freed ones subtracted.

    Tracks every storage an operator returns (outputs of forward and backward ops, gradients); views and
    in-place results share a storage and count once. Buffers internal to a kernel (e.g. oneDNN scratch)
    are not tensors and are not seen."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    storage = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def eval_step(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    loss = sum(o.float().mean() for o in _outputs(model(x)))
    loss.backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(fn: Callable[[], None], device: torch.device) -> float:
    """Peak MiB of tensors allocated by fn() above the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak / 2**20


def count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        analysis = FlopCountAnalysis(model.eval(), x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return analysis.total() / 1e9


def interleaved(fns: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                device: torch.device) -> Dict[str, Optional[float]]:
    """Median ms per callable, timed in interleaved rounds; a callable that raises is dropped (None)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    alive = dict(fns)
    for round_ in range(warmup + repeats):
        for name, fn in list(alive.items()):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def _try(fn: Callable[[], None]) -> Optional[str]:
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - a model that fails a workload is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {msg[:90]}"


# ---------------------------------------------------------------------------------------------- backbone
def run_backbone(args, device) -> dict:
    cands = backbone_candidates(args.variant, args.compile)
    torch.manual_seed(0)
    for c in cands:
        logger.info("building %s", c.name)
        c.module = c.build().to(device)
    eval_loads = SMOKE_EVAL if args.smoke else FULL_EVAL
    train_loads = SMOKE_TRAIN if args.smoke else FULL_TRAIN
    if args.no_train:
        train_loads = ()
    results: dict = {"eval": {}, "train": {}, "eval_peak": {}, "train_peak": {}, "gmacs": {}, "errors": {}}

    # FLOPs: one count per architecture and eval workload (the implementations do the same arithmetic).
    ref = {"resnest": build_resnest(args.variant).eval(), "resnet": Stages(torchvision_resnet(args.variant))}
    for w in eval_loads:
        x = w.input()
        results["gmacs"][w.label] = {arch: count_gmacs(m, x) for arch, m in ref.items()}

    def prepared(c: Candidate, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return x.contiguous(memory_format=torch.channels_last) if c.channels_last else x

    for kind, loads in (("eval", eval_loads), ("train", train_loads)):
        for w in loads:
            logger.info("%s %s", kind, w.label)
            fns = {}
            for c in cands:
                if kind == "train" and not c.trains:
                    continue
                x = prepared(c, w.input())
                m = c.module
                if kind == "eval":
                    m.eval()
                    fn = (lambda m=m, x=x: eval_step(m, x))
                else:
                    m.train()
                    fn = (lambda m=m, x=x: (train_step(m, x), m.zero_grad(set_to_none=True)))
                err = _try(fn)  # also the compile / first-call warm-up
                if err:
                    results["errors"].setdefault(kind, {}).setdefault(w.label, {})[c.name] = err
                    logger.info("  %s fails: %s", c.name, err)
                    continue
                fns[c.name] = fn
            times = interleaved(fns, args.warmup, args.repeats_large if w.large else args.repeats, device)
            results[kind][w.label] = times
            if not args.no_memory:
                peaks = {}
                for c in cands:
                    if c.name not in fns or "compile" in c.name:
                        continue
                    x = prepared(c, w.input())
                    m = c.module
                    if kind == "eval":
                        peaks[c.name] = measure_peak(lambda: eval_step(m, x), device)
                    else:
                        peaks[c.name] = measure_peak(lambda: train_step(m, x), device)
                        m.zero_grad(set_to_none=True)
                results[f"{kind}_peak"][w.label] = peaks
            for name, t in times.items():
                logger.info("  %-50s %9.1f ms", name, t)
    results["candidates"] = [{"name": c.name, "arch": c.arch, "trains": c.trains} for c in cands]
    return results


# ---------------------------------------------------------------------------------------------- detector
def detector_models(variant: str, fuse: bool):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from resnest_backbone.core.fuse import fuse_model
    from resnest_backbone.d2 import add_resnest_config

    models = {}
    for arch in ("resnest", "resnet"):
        cfg = get_cfg()
        add_resnest_config(cfg)
        cfg.merge_from_file(os.path.join(ROOT, "configs", "faster_rcnn_resnest50_fpn.yaml"))
        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
        cfg.MODEL.RESNEST.VARIANT = variant
        if arch == "resnet":  # same config (FPN, 4conv1fc head, norms), detectron2's ResNet-50 trunk
            cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
            cfg.MODEL.RESNETS.DEPTH = 50
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        name = (f"Faster R-CNN {variant}-FPN" if arch == "resnest" else "Faster R-CNN R-50-FPN")
        models[name] = model
        if fuse:  # the backbone fast path's treatment: norms folded (trunk, FPN, head) + channels_last
            models[name + ", fused + channels_last"] = fuse_model(model, channels_last=True)
    return models


def run_detector(args, device) -> dict:
    w = Workload(1, 64, 96) if args.smoke else Workload(1, 800, 1216)
    models = detector_models(args.variant, fuse=True)
    image = torch.rand(3, w.height, w.width, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image.to(device)}]
    fns = {name: (lambda m=m: eval_step(m, inputs)) for name, m in models.items()}
    errors = {}
    for name in list(fns):
        err = _try(fns[name])
        if err:
            errors[name] = err
            del fns[name]
    logger.info("detector eval %s", w.label)
    times = interleaved(fns, args.warmup, args.repeats_large if w.large else args.repeats, device)
    for name, t in times.items():
        logger.info("  %-50s %9.1f ms", name, t)
    return {"workload": w.label, "eval": times, "errors": errors}


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def render_markdown(res: dict, env: dict, args) -> str:
    bb = res["backbone"]
    names = [c["name"] for c in bb["candidates"]]
    arch_of = {c["name"]: c["arch"] for c in bb["candidates"]}
    v = args.variant
    official, fast, ours = f"{v} official 0.0.5", f"{v} ours, fast path", f"{v} ours"
    ours_cl = f"{v} ours, channels_last"
    rn = resnet_depth_name(v)
    rn_plain, rn_fast = f"{rn} torchvision", f"{rn} torchvision, BN folded + channels_last"
    lines = [f"# Benchmark: {v} backbone{' (SMOKE: tiny sizes, not meaningful)' if args.smoke else ''}", ""]
    lines.append(f"Measured {env['date']} on {env['device']}; torch {env['torch']}, {env['threads']} threads "
                 f"(interop {env['interop_threads']}"
                 + (f", OMP_WAIT_POLICY={env['omp_wait_policy']}" if env.get("omp_wait_policy") else "")
                 + f"); {args.warmup} warm-up + {args.repeats} timed rounds ({args.repeats_large} at detection "
                 "size), interleaved, medians; machine "
                 f"load average {env.get('load_before')} before, {env.get('load_after')} after "
                 "(other processes share the CPUs when it exceeds the thread count). "
                 f"Generated by `python tools/benchmark.py {' '.join(env.get('argv', []))}`.")
    lines.append("")
    # ---- eval
    eval_loads = list(bb["eval"])
    lines += ["## Eval latency (ms, lower is better)", "",
              "| model | " + " | ".join(eval_loads) + " | GMAC/s at " + eval_loads[-1] + " |",
              "|---|" + "---:|" * (len(eval_loads) + 1)]
    last = eval_loads[-1]
    for n in names:
        cells = [_fmt(bb["eval"][w].get(n)) for w in eval_loads]
        gm = bb["gmacs"][last][arch_of[n]]
        t = bb["eval"][last].get(n)
        cells.append(_fmt(gm / (t / 1e3) if t else None))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "GMACs (fvcore, multiply-adds): " + "; ".join(
        f"{w}: {v} {g['resnest']:.2f}, {rn} {g['resnet']:.2f}" for w, g in bb["gmacs"].items()), ""]
    # ---- ratios
    lines += ["## Ratios", "", "| workload | official / fast path | official / ours | timm / fast path | "
              f"fast path / {rn} | fast path / {rn} folded+CL | MAC ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in eval_loads:
        e = bb["eval"][w]
        g = bb["gmacs"][w]
        lines.append(f"| eval {w} | {_fmt(_ratio(e.get(official), e.get(fast)), 2)} | "
                     f"{_fmt(_ratio(e.get(official), e.get(ours)), 2)} | "
                     f"{_fmt(_ratio(e.get(f'{v} timm'), e.get(fast)), 2)} | "
                     f"{_fmt(_ratio(e.get(fast), e.get(rn_plain)), 2)} | "
                     f"{_fmt(_ratio(e.get(fast), e.get(rn_fast)), 2)} | {g['resnest'] / g['resnet']:.2f} |")
    lines.append("")
    # ---- train
    if bb["train"]:
        train_loads = list(bb["train"])
        lines += ["## Training step: forward + backward (ms; peak tensor MiB)", "",
                  "| model | " + " | ".join(train_loads) + " |", "|---|" + "---:|" * len(train_loads)]
        for n in names:
            if not any(n in bb["train"][w] for w in train_loads) and not any(
                    n in bb["errors"].get("train", {}).get(w, {}) for w in train_loads):
                continue
            cells = []
            for w in train_loads:
                t = bb["train"][w].get(n)
                err = bb["errors"].get("train", {}).get(w, {}).get(n)
                if t is None:
                    cells.append("fails" if err else "-")
                else:
                    peak = bb["train_peak"].get(w, {}).get(n)
                    cells.append(f"{t:.1f} ({_fmt(peak, 0)})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "| workload | official / ours | official / ours CL | ours peak / official peak | "
                      f"ours / {rn} |", "|---|---:|---:|---:|---:|"]
        for w in train_loads:
            t = bb["train"][w]
            p = bb["train_peak"].get(w, {})
            best = min((x for x in (t.get(ours), t.get(ours_cl)) if x is not None), default=None)
            lines.append(f"| train {w} | {_fmt(_ratio(t.get(official), t.get(ours)), 2)} | "
                         f"{_fmt(_ratio(t.get(official), t.get(ours_cl)), 2)} | "
                         f"{_fmt(_ratio(p.get(ours), p.get(official)), 2)} | "
                         f"{_fmt(_ratio(best, t.get(rn_plain)), 2)} |")
        errs = {(n, e) for w in train_loads for n, e in bb["errors"].get("train", {}).get(w, {}).items()}
        if errs:
            lines += ["", "Failures: " + "; ".join(f"{n}: {e}" for n, e in sorted(errs))]
        lines.append("")
    # ---- eval memory
    if bb["eval_peak"]:
        lines += ["## Eval peak tensor memory (MiB)", "", "| model | " + " | ".join(eval_loads) + " |",
                  "|---|" + "---:|" * len(eval_loads)]
        for n in names:
            if "compile" in n:
                continue
            lines.append(f"| {n} | " + " | ".join(_fmt(bb["eval_peak"][w].get(n), 0) for w in eval_loads) + " |")
        lines.append("")
    # ---- detector
    det = res.get("detector")
    if det:
        lines += [f"## Faster R-CNN (FPN, 4conv1fc head), eval {det['workload']} (ms)", "",
                  "| model | latency | vs R-50-FPN (same treatment) |", "|---|---:|---:|"]
        times = det["eval"]
        for n, t in times.items():
            suffix = ", fused + channels_last"
            base = "Faster R-CNN R-50-FPN" + (suffix if n.endswith(suffix) else "")
            lines.append(f"| {n} | {_fmt(t)} | {_fmt(_ratio(t, times.get(base)), 2)} |")
        for n, e in det["errors"].items():
            lines.append(f"| {n} | fails: {e} | - |")
        lines.append("")
    # ---- targets
    e_det = bb["eval"].get(last, {})
    g = bb["gmacs"][last]
    lines += ["## Targets (issue 5)", ""]
    r1 = _ratio(e_det.get(official), e_det.get(fast))
    lines.append(f"- eval {last}: fast path vs official: {_fmt(r1, 2)}x faster (target >= 1.5x)")
    r2 = _ratio(e_det.get(fast), e_det.get(rn_fast))
    r2b = _ratio(e_det.get(fast), e_det.get(rn_plain))
    lines.append(f"- eval {last}: fast path / {rn} time: {_fmt(r2, 2)} against {rn} with the same treatment "
                 f"(BN folded, channels_last), {_fmt(r2b, 2)} against eager {rn}; MAC ratio "
                 f"{g['resnest'] / g['resnet']:.2f} (target: time ratio <= MAC ratio)")
    comp, rn_comp = f"{fast} + torch.compile", f"{rn_fast} + torch.compile"
    if e_det.get(comp) is not None:
        lines.append(f"- eval {last}: with torch.compile: {_fmt(_ratio(e_det.get(official), e_det.get(comp)), 2)}x "
                     f"faster than official; time ratio to {rn} (also compiled) "
                     f"{_fmt(_ratio(e_det.get(comp), e_det.get(rn_comp)), 2)}")
    for w in bb["train"]:
        t, p = bb["train"][w], bb["train_peak"].get(w, {})
        if t.get(official) is None:
            continue
        best_name = min((n for n in (ours, ours_cl) if t.get(n) is not None), key=lambda n: t[n], default=None)
        lines.append(f"- train {w}: {best_name} vs official: {_fmt(_ratio(t.get(official), t.get(best_name)), 2)}x "
                     f"faster (target >= 1.1x), peak memory {_fmt(_ratio(p.get(best_name), p.get(official)), 2)}x "
                     "official's (target <= 1)")
    lines.append("")
    return "\n".join(lines)


def render_png(res: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bb = res["backbone"]
    names = [c["name"] for c in bb["candidates"]]
    official = f"{args.variant} official 0.0.5"
    panels = [("eval", "eval latency"), ("train", "training step")] if bb["train"] else [("eval", "eval latency")]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels):
        loads = [w for w in bb[kind] if bb[kind][w].get(official)]
        shown = [n for n in names if any(bb[kind][w].get(n) for w in loads)]
        width = 0.8 / max(len(shown), 1)
        for i, n in enumerate(shown):
            speed = [(bb[kind][w][official] / bb[kind][w][n]) if bb[kind][w].get(n) else 0 for w in loads]
            ax.bar([j + i * width for j in range(len(loads))], speed, width, label=n,
                   color=f"C{names.index(n) % 10}")  # one colour per model in every panel
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], loads)
        ax.set_ylabel("speed relative to official (higher is faster)")
        ax.set_title(f"{args.variant}: {title}")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = f"{models[0]} ({os.cpu_count()} CPUs visible)" if models else name
        except OSError:
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": name,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "load_before": _load(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def _load() -> Optional[float]:
    """1-minute load average: other processes on the machine distort CPU timings; reported with them."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=None, help="ResNeSt variant (default resnest50; smoke: resnest14d)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; smoke 0)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    parser.add_argument("--repeats-large", type=int, default=None,
                        help="timed rounds at detection size (default 3; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-detector", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmark.md"), help="markdown report")
    parser.add_argument("--png", default=None, help="bar chart (default: --out with .png)")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="measure nothing: rewrite --out / --png from a --json file of an earlier run")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        saved = argparse.Namespace(**res["args"])
        saved.png = args.png or os.path.splitext(args.out)[0] + ".png"
        md = render_markdown(res, res["env"], saved)
        _write(args.out, md)
        render_png(res, saved, saved.png)
        print(md)
        print(f"wrote {args.out} and {saved.png}")
        return res
    args.variant = args.variant or ("resnest14d" if args.smoke else "resnest50")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 7)
    args.repeats_large = args.repeats_large if args.repeats_large is not None else (1 if args.smoke else 3)
    args.png = args.png or os.path.splitext(args.out)[0] + ".png"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print(f"torch {env['torch']}, threads {env['threads']} (interop {env['interop_threads']}), {env['device']}",
          flush=True)
    res = {"env": env, "args": {k: v for k, v in vars(args).items()}}
    res["backbone"] = run_backbone(args, device)
    if not args.no_detector:
        try:
            import detectron2  # noqa: F401
            res["detector"] = run_detector(args, device)
        except ImportError:
            logger.info("detectron2 is not installed: no detector benchmark")
    env["load_after"] = _load()
    env["argv"] = list(argv) if argv is not None else sys.argv[1:]
    md = render_markdown(res, env, args)
    _write(args.out, md)
    render_png(res, args, args.png)
    if args.json:
        _write(args.json, json.dumps(res, indent=1))
    print(md)
    print(f"wrote {args.out} and {args.png}")
    return res


if __name__ == "__main__":
    main()
