"""The treatment menu: standard ways to make a PyTorch model run faster, applied identically to every
implementation the benchmark compares (ours, the official code, timm, torchvision's ResNet).

A treatment turns a freshly built model (on its device, in the mode of the step: eval or train) and an
example input (already in the treatment's memory format) into the callable that is timed:

  eager           the model as built (NCHW)
  channels_last   model and input in channels_last (NHWC) memory format
  jit             channels_last + torch.jit.trace (strict=False: dict outputs allowed) + torch.jit.freeze +
                  torch.jit.optimize_for_inference (folds conv + BN, prepacks weights for oneDNN)
  compile         channels_last + torch.compile (inductor, options={"freezing": True}); only with --compile
                  (on CPU the first call for each input shape compiles: 8-40 s per model on 2 threads here)
  bf16 autocast   channels_last + torch.autocast(device, torch.bfloat16) around the forward (fp32 input)
  int8 fx         post-training static int8 quantization, torch.ao FX graph mode (prepare_fx / convert_fx,
                  x86 qconfig mapping), calibrated on the timed input; needs an FX-traceable model, so it
                  fails on models whose forward has data-dependent control flow (the failure is recorded)

Training steps use the layout treatments and, with --compile, torch.compile (TRAIN_MENU: eager,
channels_last, channels_last + compile: inductor compiles the forward and the backward; 1-2 min per model on
2 threads here; compiled for the workload's fixed shape, dynamic=False); jit freezing, autocast and int8 are
inference transforms. Ours additionally has its own fast path, `resnest_backbone.core.fuse.deploy`, and its own
int8, `resnest_backbone.core.quant.quantize_int8` (own_treatments()): treatments only ours has, reported as
ours' own entries.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import torch
from torch import nn

__all__ = ["DETECTOR_MENU", "EVAL_MENU", "TRAIN_MENU", "Treatment", "bf16_autocast", "channels_last", "eager",
           "fp16_autocast", "fused_channels_last", "GPU_EVAL_MENU", "gpu_own_treatments", "int8_fx", "int8_quantize",
           "jit_freeze", "menu", "own_treatments", "to_channels_last", "torch_compile", "train_compile"]

Step = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Treatment:
    name: str
    apply: Callable[[nn.Module, torch.Tensor], Step]  # (model, example input) -> the callable to time
    dtype: str = "fp32"  # arithmetic of the convolutions / matmuls: fp32, bf16 or int8 (which peak applies)
    channels_last: bool = False  # feed channels_last inputs
    needs_compile: bool = False  # slow to prepare: only with --compile
    description: str = ""


def to_channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def eager(model: nn.Module, x: torch.Tensor) -> Step:
    return model


def channels_last(model: nn.Module, x: torch.Tensor) -> Step:
    return to_channels_last(model)


def jit_freeze(model: nn.Module, x: torch.Tensor) -> Step:
    with torch.no_grad():
        traced = torch.jit.trace(to_channels_last(model.eval()), x, strict=False, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def torch_compile(model: nn.Module, x: torch.Tensor) -> Step:
    return torch.compile(to_channels_last(model), options={"freezing": True})


def _autocast(dtype: torch.dtype) -> Callable[[nn.Module, torch.Tensor], Step]:
    """channels_last + torch.autocast(the input's device, dtype)."""
    def apply(model: nn.Module, x: torch.Tensor) -> Step:
        model = to_channels_last(model)

        def step(inp: torch.Tensor):
            with torch.autocast(inp.device.type, dtype=dtype):
                return model(inp)

        return step

    return apply


bf16_autocast = _autocast(torch.bfloat16)
fp16_autocast = _autocast(torch.float16)  # the GPU's half precision (tools/gpu_check.py)


def int8_fx(model: nn.Module, x: torch.Tensor) -> Step:
    if x.device.type != "cpu":
        raise RuntimeError(f"int8 FX quantization (x86 backend) runs on CPU only, not {x.device.type}")
    from resnest_backbone.core.quant import fx_int8  # the same flow as quantize_int8, for any FX-traceable model

    prepared, convert = fx_int8(model, (x,), "x86")
    with torch.no_grad():
        prepared(x)  # calibration: the observers record the activations' ranges
    return convert(prepared)


def int8_quantize(model: nn.Module, x: torch.Tensor) -> Step:
    """Ours' own int8: quantize_int8 (its split attention in int8 form, then the int8 fx flow)."""
    from resnest_backbone.core.quant import quantize_int8

    return quantize_int8(model, [x])


EAGER = Treatment("eager", eager, description="the model as built, NCHW")
CHANNELS_LAST = Treatment("channels_last", channels_last, channels_last=True,
                          description="model and input in channels_last (NHWC) memory format")
BF16_AUTOCAST = Treatment("bf16 autocast", bf16_autocast, dtype="bf16", channels_last=True,
                          description="channels_last + torch.autocast(device, torch.bfloat16) around the forward")
EVAL_MENU: Tuple[Treatment, ...] = (
    EAGER,
    CHANNELS_LAST,
    Treatment("jit", jit_freeze, channels_last=True,
              description="channels_last + torch.jit.trace + torch.jit.freeze + torch.jit.optimize_for_inference"),
    Treatment("compile", torch_compile, channels_last=True, needs_compile=True,
              description='channels_last + torch.compile (inductor, options={"freezing": True}); only with '
                          "--compile"),
    BF16_AUTOCAST,
    Treatment("int8 fx", int8_fx, dtype="int8",
              description="post-training static int8, torch.ao FX graph mode (prepare_fx / convert_fx, x86 "
                          "qconfig mapping), calibrated on the timed input; needs an FX-traceable model"),
)


# On a GPU (tools/gpu_check.py): the layouts and both half precisions; ours' own: gpu_own_treatments().
GPU_EVAL_MENU: Tuple[Treatment, ...] = (
    EAGER, CHANNELS_LAST, BF16_AUTOCAST,
    Treatment("fp16 autocast", fp16_autocast, dtype="fp16", channels_last=True,
              description="channels_last + torch.autocast(device, torch.float16) around the forward"),
)


def train_compile(model: nn.Module, x: torch.Tensor) -> Step:
    return torch.compile(to_channels_last(model), dynamic=False)  # the eval shapes compiled before: static


TRAIN_MENU: Tuple[Treatment, ...] = (
    EAGER,
    CHANNELS_LAST,
    Treatment("channels_last + compile", train_compile, channels_last=True, needs_compile=True,
              description="training: channels_last + torch.compile (inductor; forward and backward compiled); "
                          "only with --compile"),
)


def fused_channels_last(model: nn.Module, x) -> Step:
    from resnest_backbone.core.fuse import fuse_model

    return fuse_model(model, inplace=True, channels_last=True)


# Whole detectors (detectron2 models, list-of-dict inputs): the same two treatments for both trunks.
DETECTOR_MENU: Tuple[Treatment, ...] = (
    EAGER,
    Treatment("fused + channels_last", fused_channels_last,
              description="resnest_backbone.core.fuse.fuse_model(model, channels_last=True): every BN / FrozenBN "
                          "folded into its conv (trunk, FPN, box head), ResNeSt blocks fused, channels_last"),
)


def menu(mode: str, compile_: bool) -> List[Treatment]:
    """The generic treatments for a step ("eval" or "train"), without the compile ones unless compile_."""
    return [t for t in (EVAL_MENU if mode == "eval" else TRAIN_MENU) if compile_ or not t.needs_compile]


# ----------------------------------------------------------------------------------- ours' own fast path
def _param_dtype_input(model: nn.Module) -> Step:
    """Call `model` with its input cast to the dtype of its parameters (a bf16 model takes bf16 input)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return lambda x: model(x.to(dtype))


def own_treatments(compile_: bool) -> List[Treatment]:
    """Ours' fast path: resnest_backbone.core.fuse.deploy (folded norms, fused split attention,
    channels_last), alone and composed with the generic jit / compile treatments; in bf16 when deploy
    takes a dtype; and ours' int8, quantize_int8."""
    from resnest_backbone.core.fuse import deploy

    fast = (lambda m, x: deploy(m.eval(), channels_last=True))
    own = [
        Treatment("fast path", fast, channels_last=True, description="deploy(model, channels_last=True)"),
        Treatment("fast path + jit", lambda m, x: jit_freeze(fast(m, x), x), channels_last=True,
                  description="the fast path, then the jit treatment"),
    ]
    if compile_:
        own.append(Treatment("fast path + compile", lambda m, x: torch_compile(fast(m, x), x), channels_last=True,
                             needs_compile=True, description="the fast path, then the compile treatment"))
    own.append(Treatment("int8 quantize_int8", int8_quantize, dtype="int8",
                         description="resnest_backbone.core.quant.quantize_int8 (the int8 form of the split "
                                     "attention, then the int8 fx flow), calibrated on the timed input"))
    if "dtype" in inspect.signature(deploy).parameters:  # the bf16 fast path, where deploy has one
        own.append(Treatment(
            "fast path bf16",
            lambda m, x: _param_dtype_input(deploy(m.eval(), channels_last=True, dtype=torch.bfloat16)),
            dtype="bf16", channels_last=True, description="deploy(model, channels_last=True, dtype=torch.bfloat16)"))
    return own


def gpu_own_treatments() -> List[Treatment]:
    """Ours' fast path on a GPU: deploy(model, channels_last=True) in fp32, bf16 and fp16."""
    from resnest_backbone.core.fuse import deploy

    def fast(dtype):
        return lambda m, x: _param_dtype_input(deploy(m.eval(), channels_last=True, dtype=dtype))

    return [Treatment(f"fast path{suffix}", fast(dtype), dtype=name, channels_last=True,
                      description=f"deploy(model, channels_last=True{arg})")
            for suffix, dtype, name, arg in (("", None, "fp32", ""),
                                             (" bf16", torch.bfloat16, "bf16", ", dtype=torch.bfloat16"),
                                             (" fp16", torch.float16, "fp16", ", dtype=torch.float16"))]
