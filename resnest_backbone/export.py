"""TorchScript / ONNX export of the ResNeSt trunk, each export checked against PyTorch (torch only; onnx and
onnxruntime for ONNX). The detectron2 models' export (TracingAdapter) is in resnest_backbone.d2.export;
tools/export.py is the command line for both.

    from resnest_backbone.export import build_backbone, export_backbone
    model = build_backbone("resnest50", weights="resnest50.pth", fuse=True)   # safe reader, strict check
    export_backbone(model, "resnest50.onnx", "onnx")    # dynamic N/H/W; returns max |exported - PyTorch|

The exported model is run (onnxruntime for ONNX, torch.jit.load for TorchScript) on the export input and,
unless the export is fixed to one shape, on a second input of another batch size and resolution; its
outputs must equal PyTorch's within `atol`, else AssertionError.
"""
import contextlib
import logging
import warnings
from typing import List, Sequence

import torch

from .convert import load_weights
from .core import STAGE_NAMES, build_resnest
from .core.deform import has_deformable
from .core.fuse import fuse_resnest

logger = logging.getLogger("resnest.export")
DEFAULT_OPSET = 17
FORMATS = ("onnx", "torchscript")

__all__ = ["DEFAULT_OPSET", "FORMATS", "build_backbone", "check_backbone_onnx", "check_backbone_torchscript",
           "check_close", "check_onnx_exportable", "export_backbone", "export_backbone_onnx",
           "export_backbone_torchscript", "max_abs_diff", "onnx_session", "quiet"]


@contextlib.contextmanager
def quiet():
    """Silence the exporters' notices that say nothing about this export (deprecations, tracer warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|You are using the legacy).*")
        yield


def build_backbone(variant: str, weights: str = "", out_features: Sequence[str] = STAGE_NAMES,
                   fuse: bool = False) -> torch.nn.Module:
    """An eval trunk returning `out_features`; `weights` (any naming the converter reads, classifier
    dropped) go through the package's safe reader and strict check; `fuse`: the inference fast path."""
    model = build_resnest(variant, out_features=tuple(out_features), num_classes=0).eval()
    if weights:
        logger.info("\n".join(load_weights(model, weights, strict=True).lines()))
    return fuse_resnest(model, inplace=True) if fuse else model


def max_abs_diff(a: Sequence, b: Sequence) -> float:
    """Largest |a_i - b_i| over paired outputs (tensors or arrays); a shape mismatch raises."""
    worst = 0.0
    for x, y in zip(a, b):
        x = torch.as_tensor(x).double()
        y = torch.as_tensor(y).double()
        if x.shape != y.shape:
            raise AssertionError(f"exported model output shape {tuple(y.shape)} != PyTorch {tuple(x.shape)}")
        if x.numel():
            worst = max(worst, (x - y).abs().max().item())
    return worst


def check_close(name: str, diff: float, atol: float) -> float:
    logger.info("%s: max |exported - PyTorch| = %.3g (atol %.1g)", name, diff, atol)
    if not diff <= atol:
        raise AssertionError(f"{name}: exported model differs from PyTorch by {diff:.3g} > atol {atol:g}")
    return diff


def onnx_session(path: str):
    """onnx's checker on the file, then a CPU onnxruntime session for it."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def export_backbone_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str,
                                method: str = "script") -> torch.jit.ScriptModule:
    """script: keeps control flow (any shape); trace: fixed to the traced graph."""
    with quiet(), torch.no_grad():
        if method == "script":
            exported = torch.jit.script(model)
        elif method == "trace":
            exported = torch.jit.trace(model, example, strict=False)  # strict=False: dict outputs
        else:
            raise ValueError(f"method={method!r}: use 'script' or 'trace'")
    exported.save(path)
    return exported


def check_onnx_exportable(model: torch.nn.Module) -> None:
    """Refuse, before anything is written, a model ONNX cannot express here: deformable convs (torchvision
    registers no ONNX symbolic for deform_conv2d)."""
    if has_deformable(model):
        raise ValueError("ONNX export of a deformable (DCN) ResNeSt is not supported: torchvision registers no "
                         "ONNX symbolic for deform_conv2d. Export it as TorchScript (script or trace), which "
                         "keeps torchvision's op (load it with torchvision imported), or build the model "
                         "without deform_on_per_stage.")


def export_backbone_onnx(model: torch.nn.Module, example: torch.Tensor, path: str,
                         opset: int = DEFAULT_OPSET, dynamic: bool = True) -> List[str]:
    """ONNX with input `image` and one output per out_feature (res2..res5), batch/height/width dynamic."""
    if opset < 13:
        raise ValueError(f"opset {opset} < 13 is not supported")
    check_onnx_exportable(model)
    names = list(model.out_features)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"}}
        dynamic_axes.update({n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names})
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return names


def check_backbone_onnx(model: torch.nn.Module, path: str, inputs: Sequence[torch.Tensor],
                        atol: float = 1e-4) -> float:
    session = onnx_session(path)
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
        outs = session.run(None, {"image": x.numpy()})
        worst = max(worst, check_close(f"onnxruntime {tuple(x.shape)}", max_abs_diff(list(ref.values()), outs),
                                       atol))
    return worst


def check_backbone_torchscript(model: torch.nn.Module, path: str, inputs: Sequence[torch.Tensor],
                               atol: float = 1e-4) -> float:
    with quiet():
        loaded = torch.jit.load(path)  # the file this export has just written
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref, out = model(x), loaded(x)
        if list(ref) != list(out):
            raise AssertionError(f"TorchScript outputs {list(out)} != PyTorch {list(ref)}")
        worst = max(worst, check_close(f"torchscript {tuple(x.shape)}",
                                       max_abs_diff(list(ref.values()), list(out.values())), atol))
    return worst


def export_backbone(model: torch.nn.Module, path: str, format: str = "onnx", batch: int = 1, height: int = 224,
                    width: int = 224, method: str = "script", opset: int = DEFAULT_OPSET, dynamic: bool = True,
                    atol: float = 1e-4) -> float:
    """Export `model` to `path` and check it: on a random (batch, 3, height, width) input, and unless the
    export is fixed to that shape (dynamic=False, or TorchScript by trace) also on one of another batch
    size and resolution. Returns the largest |exported - PyTorch|."""
    example = torch.randn(batch, 3, height, width)
    other = torch.randn(batch + 1, 3, height + 32, max(width - 32, 32))
    checks = [example] if not dynamic or (format == "torchscript" and method == "trace") else [example, other]
    if format == "onnx":
        export_backbone_onnx(model, example, path, opset, dynamic=dynamic)
        return check_backbone_onnx(model, path, checks, atol)
    if format == "torchscript":
        export_backbone_torchscript(model, example, path, method)
        return check_backbone_torchscript(model, path, checks, atol)
    raise ValueError(f"format={format!r}: use one of {FORMATS}")
