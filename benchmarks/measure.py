"""The measuring primitives of tools/benchmark.py (what is run, and on what, is run.py):

  interleaved  ms per round of several callables timed in interleaved rounds (A B C A B C ...), so that
               drifts in machine load hit all of them alike, after warm-up rounds (the report gives medians)
  eval_step    one forward pass (eval mode is the caller's) under torch.no_grad()
  train_step   one training step: forward + backward of the sum of the outputs' means (each output's
               gradient in that output's memory format, as a layer after the trunk hands it back)
  measure_peak peak memory of the tensors allocated during a step (on CPU, counted by a dispatch-mode tracker
               over tensor storages; on CUDA, torch.cuda.max_memory_allocated), above what existed before it
  count_gmacs  multiply-adds of the architecture (fvcore; it reports a multiply-add as one "flop")
  conv_bound   the time of a model's convolutions alone, each timed on its own: the ceiling of its throughput
  op_breakdown where one call's time goes, by operator class (convolution, batch norm, the rest)
  steady_allocator  glibc's malloc kept from returning memory to the OS, so that repeated steps do not
               page-fault afresh (a training step at detection size otherwise spent 0.3-1.5 s of system time
               in page faults here, a different amount each round)
  matmul_peak  the machine's limit: GFLOP/s per dtype on the current threads, the best of square matmuls and
               of large dense convolutions (oneDNN's convolution kernels can beat torch.mm: the limit is the
               faster of the two, never a figure that the models then exceed)
  environment  what a timing depends on (device, torch, threads, load, CPU flags)
"""
import collections
import ctypes
import ctypes.util
import datetime
import logging
import os
import platform
import re
import resource
import statistics
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger("resnest.benchmark")

__all__ = ["CONV_SHAPES", "MATMUL_DTYPES", "PeakTensorMemory", "conv_bound", "conv_rate", "count_gmacs", "cpu_flags",
           "environment", "eval_step", "interleaved", "load_average", "matmul_peak", "matmul_rate", "measure_peak",
           "median", "op_breakdown", "steady_allocator", "TRAIN_LOSS", "train_step", "try_call"]


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


def eval_step(model: Callable, x):
    with torch.no_grad():
        return model(x)


class _MeanInLayout(torch.autograd.Function):
    """out.mean() whose backward hands `out` its gradient (the same values as the mean's own backward) as a
    dense tensor laid out like `out`: channels_last for a channels_last output, as a layer after the trunk
    hands it back (a detector's FPN convolutions). The mean's own backward makes a contiguous (NCHW) tensor
    whatever out's layout: a channels_last trunk then adds it to the channels_last gradient of the next stage
    with a layout-converting add, twice per stage output (its first block's conv1 and shortcut), and its last
    ReLU's backward mixes the two layouts too: a cost that a detector's training does not have, paid by
    every channels_last implementation in the comparison."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.device = out.shape, out.dtype, out.device
        ctx.channels_last = (out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)
                             and not out.is_contiguous())
        return out.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        dense = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device, memory_format=fmt)
        return dense.copy_((grad / dense.numel()).expand(ctx.shape))


TRAIN_LOSS = ("the sum of the outputs' means (float32); each output gets its gradient in its own memory format, "
              "as a layer after the trunk (a detector's FPN) hands it back")


def train_step(model: Callable, x: torch.Tensor) -> None:
    """Forward, then backward of the sum of the outputs' means (in float32; _MeanInLayout)."""
    loss = sum(_MeanInLayout.apply(o.float()) for o in _outputs(model(x)))
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


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def interleaved(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                device: torch.device, cpu: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """ms of each timed round per callable, timed in interleaved rounds (A B C A B C ...) after `warmup`
    untimed ones. With a dict `cpu`, also the CPU ms of this process (user + system, all threads) per
    timed round, into cpu[name]: the work done, which other processes' load and the scheduler disturb
    less than the wall time."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    alive = dict(fns)
    for round_ in range(warmup + repeats):
        for name, fn in list(alive.items()):
            _sync(device)
            cpu_start = _cpu_seconds()
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
                if cpu is not None:
                    cpu[name].append((_cpu_seconds() - cpu_start) * 1e3)
    return times


def median(times: Sequence[float]) -> Optional[float]:
    return statistics.median(times) if times else None


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {msg[:160]}"


def try_call(fn: Callable[[], object]) -> Tuple[object, Optional[str]]:
    """(fn(), None) if it runs, else (None, a one-line description of what it raised)."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a model that fails a workload is reported, not fatal
        return None, _describe(exc)


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
# name: (in channels, out channels, kernel, height = width), batch 1, stride 1, "same" padding: the dense
# convolutions of a ResNet-style trunk at detection size, big enough that the kernel, not overhead, is timed
CONV_SHAPES = {"conv 1x1 1024->1024 @64x64": (1024, 1024, 1, 64), "conv 3x3 256->256 @128x128": (256, 256, 3, 128)}


def _best_time(op: Callable[[], object], repeats: int, device: torch.device) -> float:
    op()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        op()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(dtype: torch.dtype, n: int, repeats: int = 3, device="cpu") -> float:
    """GFLOP/s (2 n^3 per product) of an n x n @ n x n matmul in `dtype` on the current threads: the best of
    `repeats` timed products after one untimed. int8: torch._int_mm (int32 accumulation)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        a, b = (torch.randint(-64, 64, (n, n), generator=gen, dtype=torch.int8).to(device) for _ in range(2))
        op = torch._int_mm
    else:
        a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
        op = torch.mm
    return 2 * n ** 3 / _best_time(lambda: op(a, b), repeats, device) / 1e9


def conv_rate(dtype: torch.dtype, cin: int, cout: int, kernel: int, size: int, repeats: int = 3,
              device="cpu") -> float:
    """GFLOP/s (2 x multiply-adds) of one dense convolution in `dtype`, channels_last, batch 1, stride 1,
    padding kernel // 2, on a size x size input: the best of `repeats` timed calls after one untimed."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, size, size, generator=gen).to(device=device, dtype=dtype,
                                                         memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, kernel, kernel, generator=gen) * 0.01).to(device=device, dtype=dtype,
                                                                           memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = _best_time(lambda: torch.nn.functional.conv2d(x, w, padding=kernel // 2), repeats, device)
    return 2 * cin * cout * kernel * kernel * size * size / seconds / 1e9


def conv_bound(model: nn.Module, x: torch.Tensor, repeats: int = 3, device="cpu") -> dict:
    """The convolutions (nn.Conv2d) of one eval forward of `model` on `x`, each timed alone: F.conv2d on a
    channels_last input and weight of the same shapes, the same threads, the best of `repeats` calls after
    one untimed. {"ms": the sum of those times, "gmacs": their multiply-adds, "convs": how many}. A treatment
    that keeps these convolutions (and runs each no faster than oneDNN does alone) cannot beat "ms": it is
    the ceiling of a model's throughput, read against the machine peak."""
    device = torch.device(device)
    shapes: List[Tuple[nn.Conv2d, torch.Size]] = []
    handles = [m.register_forward_pre_hook(lambda m, inp: shapes.append((m, inp[0].shape)))
               for m in model.modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    seconds, macs = 0.0, 0
    with torch.no_grad():
        for conv, shape in shapes:
            inp = torch.randn(shape, generator=gen).to(device=device, memory_format=torch.channels_last)
            weight = conv.weight.detach().to(device=device, memory_format=torch.channels_last)
            bias = None if conv.bias is None else conv.bias.detach().to(device)

            def op(inp=inp, weight=weight, bias=bias, conv=conv):
                return torch.nn.functional.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation,
                                                  conv.groups)
            seconds += _best_time(op, repeats, device)
            macs += op().numel() * weight[0].numel()
    return {"ms": seconds * 1e3, "gmacs": macs / 1e9, "convs": len(shapes)}


CONV_OPS = frozenset({"convolution", "convolution_backward", "mkldnn_convolution", "_convolution",
                      "_convolution_pointwise", "_convolution_pointwise_"})
NORM_OPS = frozenset({"native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
                      "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
                      "batch_norm_backward", "native_group_norm", "native_group_norm_backward"})


class _OpTimer(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ms: Dict[str, float] = collections.defaultdict(float)
        self.calls: Dict[str, int] = collections.defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        kind = "conv" if name in CONV_OPS else "norm" if name in NORM_OPS else "other"
        self.ms[kind] += (time.perf_counter() - start) * 1e3
        self.calls[kind] += 1
        return out


def op_breakdown(fn: Callable[[], object], device="cpu") -> dict:
    """Where one call of fn() spends its time, by operator class, each operator timed as it runs (CPU:
    the operators run synchronously): {"conv": ms (convolutions, forward and backward), "norm": ms (batch
    and group norm, forward and backward), "other": ms (every other operator: activations, pooling, the
    elementwise and reduction work), "total": ms (the whole call, with the Python and autograd overhead
    between operators), "calls": {class: operator calls}}. Run it after warm-up calls: a first call's
    one-off costs land on whichever operator meets them."""
    device = torch.device(device)
    _sync(device)
    timer = _OpTimer()
    start = time.perf_counter()
    with timer:
        fn()
    _sync(device)
    total = (time.perf_counter() - start) * 1e3
    return {"conv": timer.ms["conv"], "norm": timer.ms["norm"], "other": timer.ms["other"], "total": total,
            "calls": {k: timer.calls[k] for k in ("conv", "norm", "other")}}


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h


def steady_allocator() -> Optional[str]:
    """Keep glibc's malloc from giving freed memory back to the OS: no mmap for large blocks (M_MMAP_MAX 0)
    and no trimming of the heap (M_TRIM_THRESHOLD at its largest). A large tensor is otherwise a fresh
    mmap that page-faults on first touch, every step again: a ResNeSt-50 training step at 2x512x768 or
    2x800x1216 spent 0.3-1.5 s of system time in page faults (measured here, 2026-12-02), a different
    amount each round. With it, once the heap has grown to a step's peak, steps run without page faults.
    It applies to the whole process (every implementation alike) and cannot be undone; the memory stays
    with the process. Returns what was set (for the report), or None where the C library is not glibc or
    refused both settings (then nothing is changed)."""
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    try:
        libc = ctypes.CDLL(name)
        done = [desc for option, value, desc in ((_M_MMAP_MAX, 0, "M_MMAP_MAX=0"),
                                                 (_M_TRIM_THRESHOLD, 2**31 - 1, "M_TRIM_THRESHOLD=2^31-1"))
                if libc.mallopt(option, value) == 1]
    except (OSError, AttributeError):
        return None
    return f"glibc malloc, {', '.join(done)} (freed memory kept: no page faults per step)" if done else None


def matmul_peak(sizes: Sequence[int] = (1024, 2048, 4096), repeats: int = 3, device="cpu",
                conv_shapes: Optional[Dict[str, Tuple[int, int, int, int]]] = None,
                dtypes: Optional[Sequence[str]] = None) -> dict:
    """The machine's limit on the current threads, per dtype: square matmul GFLOP/s per size (fp32, bf16,
    int8) and dense convolution GFLOP/s per shape of `conv_shapes` (default CONV_SHAPES; fp32 and bf16):
    {dtype: {"sizes": {n: GFLOP/s}, "conv": {shape: GFLOP/s}, "matmul_gflops": max over sizes,
    "gflops": max over everything} or {"error": message}}. "gflops" is the limit every throughput is a
    fraction of. "bf16_over_fp32" is the ratio of the two limits: well above 1 when bf16 runs on native
    instructions (AVX512-BF16 / AMX on CPU), about 1 or below when it is emulated through fp32. With
    `dtypes`, only those (and fp32, the reference)."""
    shapes = CONV_SHAPES if conv_shapes is None else conv_shapes
    out: dict = {}
    for name, dtype in MATMUL_DTYPES.items():
        if dtypes is not None and name not in dtypes and name != "fp32":
            continue
        rates = {}
        try:
            for n in sizes:
                rates[str(n)] = matmul_rate(dtype, n, repeats, device)
        except Exception as exc:  # noqa: BLE001 - e.g. no int8 matmul on this device / torch
            out[name] = {"error": _describe(exc)}
            continue
        entry = {"sizes": rates, "matmul_gflops": max(rates.values())}
        if dtype.is_floating_point:
            convs = {}
            for shape, (cin, cout, kernel, size) in shapes.items():
                convs[shape], error = try_call(lambda: conv_rate(dtype, cin, cout, kernel, size, repeats, device))
                if error:
                    logger.info("%s %s: %s", shape, name, error)
                    del convs[shape]
            entry["conv"] = convs
        entry["gflops"] = max([entry["matmul_gflops"], *entry.get("conv", {}).values()])
        out[name] = entry
        logger.info("peak %s: %s GFLOP/s", name, ", ".join(
            f"{n}: {r:.0f}" for n, r in {**rates, **entry.get("conv", {})}.items()))
    if "gflops" in out["fp32"] and "gflops" in out.get("bf16", {}):
        out["bf16_over_fp32"] = out["bf16"]["gflops"] / out["fp32"]["gflops"]
    return out


def cpu_flags() -> List[str]:
    """The CPU's vector / matrix flags that decide bf16 and int8 speed, from /proc/cpuinfo where readable:
    every avx512*, amx*, avx2 and avx_vnni flag (what `grep -o -w -E 'avx512[a-z_0-9]*|amx[a-z_]*|avx2|avx_vnni'
    /proc/cpuinfo` prints). Recorded with every number: the same code is several times faster or slower
    in bf16 and int8 from one CPU to the next."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in set(flags) if re.fullmatch(r"avx512[a-z_0-9]*|amx[a-z_]*|avx2|avx_vnni", f))


def load_average() -> Optional[float]:
    """1-minute load average: other processes on the machine distort CPU timings; reported with them."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(device="cpu") -> dict:
    """Date, device name, torch version and threads, load average, OMP_WAIT_POLICY, the CPU's vector
    capability (as torch sees it) and matrix flags: what a timing depends on."""
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
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags()}
