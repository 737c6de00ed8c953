"""Precision policy of the inference and mixed-precision paths: which dtype a forward runs in, on which device,
and which layers stay float32.

    autocast_inference(model, torch.bfloat16)   # the model's forward under autocast (what deploy(dtype=) does)
    autocast_forward(model, "cpu", dtype)       # the same around a training step's forward (AutocastTrainer)
    keep_fp32_heads(model, device_type)         # the score / box predictors in fp32 inside an autocast region
    register_fp32_heads({cls: attrs})           # how an adapter names its framework's predictors

Unless given, the autocast device type is that of the module's weights at call time (autocast_device): a model
moved to another device after deploy() runs under that device's autocast.
"""
import contextlib
import itertools
import re
import threading
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["AUTOCAST_DTYPES", "FP32_HEADS", "autocast_device", "autocast_forward", "autocast_inference",
           "cpu_flags", "fp32_heads", "keep_fp32_heads", "register_fp32_heads", "slower_than_fp32"]

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)

# The layers whose outputs become scores and box coordinates, kept in float32 under autocast (their floating
# inputs cast to fp32): class, or class name where the class is optional, -> its submodules ("" = itself).
# Filled by the adapters (register_fp32_heads); small layers (a 1x1 conv / linear over the features), and fp32
# scores keep their ranking for NMS and AP.
FP32_HEADS: Dict[Union[type, str], Tuple[str, ...]] = {}


def register_fp32_heads(heads: Mapping[Union[type, str], Sequence[str]]) -> None:
    """Keep these predictors in float32 under autocast: {class or class name: its submodule names ("" = the
    module itself)}; subclasses match too. Names add up: two frameworks may share a class name (RPNHead)."""
    for cls, attrs in heads.items():
        FP32_HEADS[cls] = tuple(dict.fromkeys(FP32_HEADS.get(cls, ()) + tuple(attrs)))


def fp32_heads(model: nn.Module) -> List[str]:
    """Names of the submodules of `model` that FP32_HEADS keeps in float32."""
    names = []
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            for attr in FP32_HEADS.get(cls, ()) + FP32_HEADS.get(cls.__name__, ()):
                if not attr:
                    names.append(name)
                elif isinstance(getattr(module, attr, None), nn.Module):
                    names.append(f"{name}.{attr}" if name else attr)
    return sorted(set(names))


def autocast_device(module: nn.Module, args: tuple = ()) -> str:
    """The device type a call of `module` computes on: that of its first parameter or buffer now, else of its
    first tensor argument, else "cpu". (Detectors take CPU images and move them to their weights' device.)"""
    tensors = (a for a in args if isinstance(a, torch.Tensor))
    for tensor in itertools.chain(module.parameters(), module.buffers(), tensors):
        return tensor.device.type
    return "cpu"


class _AutocastHooks:
    """A forward pre-hook and forward hook pair running a module's forward under torch.autocast(device type,
    dtype), or with autocast off and floating inputs (positional; tensors and lists / tuples of tensors) cast
    to float32 (dtype=torch.float32). The device type is `device_type`, or autocast_device at each call.
    Copies and pickles of the module carry it (rebuilt from dtype and device type)."""

    def __init__(self, dtype: torch.dtype, device_type: Optional[str] = None):
        self.dtype, self.device_type = dtype, device_type
        self._local = threading.local()

    def __reduce__(self):
        return type(self), (self.dtype, self.device_type)

    def enter(self, module, args):
        fp32 = self.dtype == torch.float32
        context = torch.autocast(self.device_type or autocast_device(module, args), enabled=not fp32,
                                 **({} if fp32 else {"dtype": self.dtype}))
        context.__enter__()
        self._local.__dict__.setdefault("stack", []).append(context)
        if fp32:
            return tuple(_to_fp32(a) for a in args)
        return None

    def exit(self, module, args, output):
        self._local.stack.pop().__exit__(None, None, None)


def _to_fp32(value):
    """Floating tensors (also in a list / tuple, e.g. feature levels) as float32; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _set_autocast_hooks(module: nn.Module, dtype: torch.dtype, device_type: Optional[str]) -> None:
    for table in (module._forward_pre_hooks, module._forward_hooks):  # an earlier setting (also a copy's)
        for key in [k for k, hook in table.items() if isinstance(getattr(hook, "__self__", None), _AutocastHooks)]:
            del table[key]
            module._forward_hooks_always_called.pop(key, None)
    hooks = _AutocastHooks(dtype, device_type)
    module.register_forward_pre_hook(hooks.enter)
    module.register_forward_hook(hooks.exit, always_call=True)


@contextlib.contextmanager
def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype,
                     keep_fp32: Optional[Sequence[str]] = None):
    """While open, calls of `module` (its forward only: not the backward, not an optimizer step) run under
    torch.autocast(device_type, dtype), with the submodules named in `keep_fp32` (default fp32_heads(module):
    the score / box predictors) in float32 (keep_fp32_heads), as autocast_inference does. The mixed-precision
    training step of d2.train.AutocastTrainer."""
    hooks = _AutocastHooks(dtype, device_type)
    handles = (module.register_forward_pre_hook(hooks.enter),
               module.register_forward_hook(hooks.exit, always_call=True))
    try:
        with keep_fp32_heads(module, device_type, keep_fp32):
            yield module
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def keep_fp32_heads(module: nn.Module, device_type: str, names: Optional[Sequence[str]] = None):
    """While open, the submodules of `module` named in `names` (default fp32_heads(module)) run with
    autocast off on float32 inputs, also when the caller has autocast on (mmengine's optim_context)."""
    handles = []
    for sub in _submodules(module, fp32_heads(module) if names is None else names, "keep_fp32_heads"):
        hooks = _AutocastHooks(torch.float32, device_type)
        handles += [sub.register_forward_pre_hook(hooks.enter),
                    sub.register_forward_hook(hooks.exit, always_call=True)]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()


def _submodules(model: nn.Module, names: Sequence[str], caller: str) -> List[nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"{caller}: keep_fp32 names {missing} are not submodules of {type(model).__name__}")
    return [modules[name] for name in names]


def autocast_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16, device_type: Optional[str] = None,
                       keep_fp32: Optional[Sequence[str]] = None) -> nn.Module:
    """Make `model` (itself: same object, same class) run its forward under torch.autocast(device_type,
    dtype); device_type defaults to the model's at each call (autocast_device). The submodules named in
    `keep_fp32` (default: fp32_heads(model), the score and box predictors) run with autocast off on fp32
    inputs. Calling it again replaces the earlier setting; `model.autocast_dtype` tells the dtype. Meant for
    inference (deploy(dtype=...)); mixed-precision training goes through the frameworks' AMP (detectron2
    SOLVER.AMP, mmengine AmpOptimWrapper), which keep backward and the optimizer step outside autocast."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_inference: dtype={dtype} is not one of {[str(d) for d in AUTOCAST_DTYPES]}")
    heads = _submodules(model, fp32_heads(model) if keep_fp32 is None else list(keep_fp32), "autocast_inference")
    _set_autocast_hooks(model, dtype, device_type)
    for head in heads:
        _set_autocast_hooks(head, torch.float32, device_type)
    model.autocast_dtype = dtype
    return model


# ------------------------------------------------------------------------------------- the CPU in hand
def cpu_flags() -> Dict[str, object]:
    """This CPU's features as torch reads them (cpuinfo): {"avx2": True, "amx_bf16": False, "cpu_name": ...}."""
    return dict(torch.cpu.get_capabilities())


# Instructions that compute in a half-precision dtype on x86; without them it is emulated, and what was measured
# then (ResNeSt-50 deploy() at 800x1216, batch 1, 2 threads, against its float32 deploy()).
NATIVE = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
MEASURED = {torch.bfloat16: "2.7x slower on an AVX-512 VNNI Xeon, 8.1x on an AVX2 AMD EPYC",
            torch.float16: "8.0x slower on an AVX2 AMD EPYC"}


def slower_than_fp32(dtype: Optional[torch.dtype], flags: Mapping[str, object]) -> Optional[str]:
    """Why CPU autocast in `dtype` runs slower than float32 on a CPU with these features (cpu_flags()), or
    None: a half-precision dtype without the instructions that compute in it."""
    if dtype not in NATIVE or any(flags.get(name) for name in NATIVE[dtype]):
        return None
    have = [name for name, on in sorted(flags.items())
            if on is True and re.fullmatch(r"avx2|avx512\w*|amx\w*|avx_vnni", name)]
    return (f"{dtype} on this CPU ({flags.get('cpu_name', 'unknown')}: {' '.join(have) or 'no AVX2'}) is slower "
            f"than float32: without {' / '.join(NATIVE[dtype])} it is emulated. ResNeSt-50 at 800x1216 ran "
            f"{MEASURED[dtype]} than in float32. Use float32 here (deploy() without dtype).")
