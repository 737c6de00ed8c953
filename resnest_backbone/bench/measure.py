"""How tools/benchmark.py measures. Every model runs in one process, interleaved (A B C A B C ...) so that
drifts in machine load hit all of them alike, after warm-up rounds; each number is the median over the
repeats. Per workload (batch x height x width):

  eval   latency of one forward pass in eval mode under torch.no_grad()
  train  one training step: forward in train mode + backward of the sum of the outputs' means
  peak   peak memory of the tensors allocated during the step (on CPU, counted by a dispatch-mode tracker
         over tensor storages; on CUDA, torch.cuda.max_memory_allocated), above what existed before it
  GMAC   multiply-adds of the architecture (fvcore; it reports a multiply-add as one "flop")

measure_grad_checkpoint() times the training step and its peak memory of our trunk with and without
gradient checkpointing (the same weights). measure_backbones(), measure_detectors() and
measure_grad_checkpoint() return plain dicts (JSON as they are) that the report is rendered from.
"""
import copy
import datetime
import logging
import os
import platform
import statistics
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core import build_resnest
from .candidates import Candidate, Stages, Workload, backbone_candidates, detector_models, torchvision_resnet

logger = logging.getLogger("resnest.benchmark")

__all__ = ["PeakTensorMemory", "count_gmacs", "environment", "eval_step", "interleaved", "load_average",
           "measure_backbones", "measure_detectors", "measure_grad_checkpoint", "measure_peak", "train_step",
           "try_call"]


class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storages created while active (CPU or any device), freed ones subtracted.

    Tracks every storage an operator returns (outputs of forward and backward ops, gradients); views and
    in-place results share a storage and count once, and an output sharing the storage of one of the op's
    inputs (a view or detach of a parameter, say, as gradient checkpointing's recomputation makes of every
    weight it saves) allocates nothing. Buffers internal to a kernel (e.g. oneDNN scratch) are not tensors
    and are not seen."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    storage = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def eval_step(model: nn.Module, x) -> None:
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
    """Median ms per callable, timed in interleaved rounds."""
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


def try_call(fn: Callable[[], None]) -> Optional[str]:
    """None if fn() runs, else a one-line description of what it raised."""
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001 - a model that fails a workload is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {msg[:90]}"


def measure_backbones(variant: str, eval_loads: Sequence[Workload], train_loads: Sequence[Workload],
                      warmup: int = 1, repeats: int = 7, repeats_large: int = 3, compile_: bool = False,
                      memory: bool = True, device="cpu") -> dict:
    """Every backbone candidate on every workload: {"eval", "train", "eval_peak", "train_peak": {workload:
    {candidate: ms or MiB}}, "gmacs": {workload: {"resnest", "resnet"}}, "errors": {kind: {workload:
    {candidate: message}}}, "candidates": [{"name", "arch", "trains"}]}."""
    device = torch.device(device)
    cands = backbone_candidates(variant, compile_)
    torch.manual_seed(0)
    for c in cands:
        logger.info("building %s", c.name)
        c.module = c.build().to(device)
    results: dict = {"eval": {}, "train": {}, "eval_peak": {}, "train_peak": {}, "gmacs": {}, "errors": {}}

    # FLOPs: one count per architecture and eval workload (the implementations do the same arithmetic).
    ref = {"resnest": build_resnest(variant).eval(), "resnet": Stages(torchvision_resnet(variant))}
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
                err = try_call(fn)  # also the compile / first-call warm-up
                if err:
                    results["errors"].setdefault(kind, {}).setdefault(w.label, {})[c.name] = err
                    logger.info("  %s fails: %s", c.name, err)
                    continue
                fns[c.name] = fn
            times = interleaved(fns, warmup, repeats_large if w.large else repeats, device)
            results[kind][w.label] = times
            if memory:
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


def measure_detectors(variant: str, workload: Workload, warmup: int = 1, repeats: int = 7,
                      repeats_large: int = 3, device="cpu") -> dict:
    """Eval latency of the detector candidates (detectron2): {"workload", "eval": {model: ms},
    "errors": {model: message}}."""
    device = torch.device(device)
    models = detector_models(variant, fuse=True, device=str(device))
    image = torch.rand(3, workload.height, workload.width, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image.to(device)}]
    fns = {name: (lambda m=m: eval_step(m, inputs)) for name, m in models.items()}
    errors = {}
    for name in list(fns):
        err = try_call(fns[name])
        if err:
            errors[name] = err
            del fns[name]
    logger.info("detector eval %s", workload.label)
    times = interleaved(fns, warmup, repeats_large if workload.large else repeats, device)
    for name, t in times.items():
        logger.info("  %-50s %9.1f ms", name, t)
    return {"workload": workload.label, "eval": times, "errors": errors}


def measure_grad_checkpoint(variants: Sequence[str], workload: Workload, warmup: int = 1, repeats: int = 3,
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
        row = {"variant": variant, "plain_ms": times["plain"], "checkpoint_ms": times["checkpoint"]}
        if memory:
            for name, m in (("plain", plain), ("checkpoint", checkpointed)):
                row[f"{name}_peak"] = measure_peak(lambda m=m: train_step(m, x), device)
                m.zero_grad(set_to_none=True)
        logger.info("  %s", row)
        rows.append(row)
        del plain, checkpointed
    return {"workload": workload.label, "rows": rows}


def load_average() -> Optional[float]:
    """1-minute load average: other processes on the machine distort CPU timings; reported with them."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(device="cpu") -> dict:
    """Date, device name, torch version and threads, load average, OMP_WAIT_POLICY: what a timing depends on."""
    device = torch.device(device)
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
            "interop_threads": torch.get_num_interop_threads(), "load_before": load_average(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
