#!/usr/bin/env python
"""Export a ResNeSt backbone or a detectron2 Faster R-CNN ResNeSt-FPN model to TorchScript / ONNX, and check it.

    # the trunk (res2..res5), fused for inference, as ONNX with dynamic batch / height / width
    python tools/export.py backbone --variant resnest50 --format onnx --fuse --output resnest50.onnx
    # the trunk as TorchScript (script: keeps control flow; trace: fixed to the traced graph)
    python tools/export.py backbone --variant resnest50 --format torchscript --method script -o r50.ts
    # a whole detectron2 model through detectron2's TracingAdapter (fixed input size)
    python tools/export.py detectron2 --config-file configs/faster_rcnn_resnest50_fpn.yaml \
        --format onnx --height 800 --width 1216 -o faster_rcnn_s50.onnx MODEL.WEIGHTS model.pkl

Every export is checked before the command returns: the exported model is run (onnxruntime for ONNX,
torch.jit.load for TorchScript) on the export input and, for the backbone, on a second input of another
batch size and resolution, and its outputs must equal PyTorch's within --atol (default 1e-4).
Weights: --weights FILE for the backbone, MODEL.WEIGHTS in the trailing config options for detectron2; both
are read by the package's safe reader (nothing in a file is executed) and checked against the model (any
naming the converter reads; a file that does not fit is refused: exit 2, nothing written).
"""
import argparse
import importlib
import logging
import os
import sys
import types
import warnings
from typing import List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resnest_backbone.convert import CheckpointError, load_weights  # noqa: E402
from resnest_backbone.core import STAGE_NAMES, build_resnest  # noqa: E402
from resnest_backbone.core.fuse import fuse_model, fuse_resnest  # noqa: E402

logger = logging.getLogger("resnest.export")
DEFAULT_OPSET = 17


# ----------------------------------------------------------------------------------------------- helpers
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|You are using the legacy).*")


def build_backbone(variant: str, weights: str = "", out_features: Sequence[str] = STAGE_NAMES,
                   fuse: bool = False) -> torch.nn.Module:
    model = build_resnest(variant, out_features=tuple(out_features),
                          num_classes=0).eval()
    if weights:  # the package's safe reader and strict check (any naming; classifier dropped)
        logger.info("\n".join(load_weights(model, weights, strict=True).lines()))
    return fuse_resnest(model, inplace=True) if fuse else model


def _max_abs_diff(a: Sequence, b: Sequence) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x = torch.as_tensor(x).double()
        y = torch.as_tensor(y).double()
        if x.shape != y.shape:
            raise AssertionError(f"exported model output shape {tuple(y.shape)} != PyTorch {tuple(x.shape)}")
        if x.numel():
            worst = max(worst, (x - y).abs().max().item())
    return worst


def _check(name: str, diff: float, atol: float) -> float:
    logger.info("%s: max |exported - PyTorch| = %.3g (atol %.1g)", name, diff, atol)
    if not diff <= atol:
        raise AssertionError(f"{name}: exported model differs from PyTorch by {diff:.3g} > atol {atol:g}")
    return diff


# ----------------------------------------------------------------------------------------------- backbone
def export_backbone_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str,
                                method: str = "script") -> torch.jit.ScriptModule:
    _quiet()
    with torch.no_grad():
        if method == "script":
            exported = torch.jit.script(model)
        elif method == "trace":
            exported = torch.jit.trace(model, example, strict=False)  # strict=False: dict outputs
        else:
            raise ValueError(f"method={method!r}: use 'script' or 'trace'")
    exported.save(path)
    return exported


def export_backbone_onnx(model: torch.nn.Module, example: torch.Tensor, path: str,
                         opset: int = DEFAULT_OPSET, dynamic: bool = True) -> List[str]:
    """ONNX with input `image` and one output per out_feature (res2..res5), batch/height/width dynamic."""
    _quiet()
    if opset < 13:
        raise ValueError(f"opset {opset} < 13 is not supported")
    names = list(model.out_features)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {"image": {0: "batch", 2: "height", 3: "width"}}
        dynamic_axes.update({n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names})
    with torch.no_grad():
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    return names


def check_backbone_onnx(model: torch.nn.Module, path: str, inputs: Sequence[torch.Tensor],
                        atol: float = 1e-4) -> float:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
        outs = session.run(None, {"image": x.numpy()})
        worst = max(worst, _check(f"onnxruntime {tuple(x.shape)}", _max_abs_diff(list(ref.values()), outs),
                                  atol))
    return worst


def check_backbone_torchscript(model: torch.nn.Module, path: str, inputs: Sequence[torch.Tensor],
                               atol: float = 1e-4) -> float:
    loaded = torch.jit.load(path)
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref, out = model(x), loaded(x)
        if list(ref) != list(out):
            raise AssertionError(f"TorchScript outputs {list(out)} != PyTorch {list(ref)}")
        worst = max(worst, _check(f"torchscript {tuple(x.shape)}",
                                  _max_abs_diff(list(ref.values()), list(out.values())), atol))
    return worst


# ---------------------------------------------------------------------------------------------- detectron2
def tracing_adapter_class():
    """detectron2.export.TracingAdapter. detectron2 0.6's `detectron2.export` imports caffe2 at package
    import; when that fails, load its flatten module (which needs only torch and detectron2) on its own."""
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError:
        pass
    import detectron2

    name = "detectron2.export"
    saved = sys.modules.get(name)
    stub = types.ModuleType(name)
    stub.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    sys.modules[name] = stub
    try:
        return importlib.import_module("detectron2.export.flatten").TracingAdapter
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


def build_detectron2_model(config_file: str, opts: Sequence[str] = (), fuse: bool = False):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from resnest_backbone.d2 import SafeDetectionCheckpointer, add_resnest_config, get_config_file

    cfg = get_cfg()
    add_resnest_config(cfg)
    cfg.merge_from_file(get_config_file(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # safe reader + architecture checks
    if fuse:
        model = fuse_model(model, inplace=True)
    return cfg, model


class DetectorExport:
    """A detectron2 model wrapped by TracingAdapter for one input image (C, H, W, float 0-255, the
    config's INPUT.FORMAT); outputs are the flattened raw Instances (boxes, classes, scores, image size)."""

    def __init__(self, model, image: torch.Tensor):
        TracingAdapter = tracing_adapter_class()

        def inference(model, inputs):
            # do_postprocess=False: boxes in the model input's coordinates, no resize (not traceable)
            instances = model.inference(inputs, do_postprocess=False)[0]
            return [{"instances": instances}]

        self.adapter = TracingAdapter(model, [{"image": image}], inference)
        self.adapter.eval()
        self.inputs: Tuple[torch.Tensor, ...] = self.adapter.flattened_inputs
        with torch.no_grad():
            self.reference: List[torch.Tensor] = list(self.adapter(*self.inputs))  # PyTorch's outputs

    def output_names(self) -> List[str]:
        schema = self.adapter.outputs_schema
        try:  # [ {"instances": Instances(pred_boxes, pred_classes, scores)} ] -> names + image_size
            keys = schema.schemas[0].schemas[0].keys
            names = [k.replace("pred_", "") for k in keys] + ["image_size"]
        except (AttributeError, IndexError):
            names = []
        count = len(self.reference)
        return names if len(names) == count else [f"output_{i}" for i in range(count)]

    def export_onnx(self, path: str, opset: int = DEFAULT_OPSET) -> None:
        _quiet()
        with torch.no_grad():
            torch.onnx.export(self.adapter, self.inputs, path, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=self.output_names(),
                              do_constant_folding=True)

    def export_torchscript(self, path: str) -> None:
        _quiet()
        with torch.no_grad():
            traced = torch.jit.trace(self.adapter, self.inputs)
        traced.save(path)

    def check_onnx(self, path: str, atol: float = 1e-4) -> float:
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs = session.run(None, {session.get_inputs()[0].name: self.inputs[0].numpy()})
        return _check("onnxruntime detector", _max_abs_diff(self.reference, outs), atol)

    def check_torchscript(self, path: str, atol: float = 1e-4) -> float:
        loaded = torch.jit.load(path)
        with torch.no_grad():
            outs = loaded(*self.inputs)
        return _check("torchscript detector", _max_abs_diff(self.reference, list(outs)), atol)


# --------------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def common(p):
        p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
        p.add_argument("-o", "--output", required=True, help="file to write (.onnx / .ts / .pt)")
        p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 13)")
        p.add_argument("--fuse", action="store_true", help="fold the norms first (inference fast path)")
        p.add_argument("--height", type=int, default=224)
        p.add_argument("--width", type=int, default=224)
        p.add_argument("--atol", type=float, default=1e-4, help="max |exported - PyTorch| allowed")
        p.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("backbone", help="the ResNeSt trunk (outputs res2..res5)")
    common(b)
    b.add_argument("--variant", default="resnest50")
    b.add_argument("--weights", default="", help="ResNeSt weights in any naming resnest-convert reads (fc.* ignored)")
    b.add_argument("--out-features", default=",".join(STAGE_NAMES))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--method", choices=("script", "trace"), default="script", help="TorchScript method")
    b.add_argument("--static", action="store_true", help="ONNX: fixed input shape (no dynamic axes)")

    d = sub.add_parser("detectron2", help="a detectron2 model (e.g. Faster R-CNN ResNeSt-FPN) via TracingAdapter")
    common(d)
    d.add_argument("--config-file", "--config", required=True, help="a path, or a project config's name")
    d.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet()
    try:
        return _run(args)
    except CheckpointError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    torch.manual_seed(args.seed)
    if args.what == "backbone":
        model = build_backbone(args.variant, args.weights, args.out_features.split(","), args.fuse)
        example = torch.randn(args.batch, 3, args.height, args.width)
        # a second input: other batch size and resolution (dynamic axes / scripted control flow)
        other = torch.randn(args.batch + 1, 3, args.height + 32, max(args.width - 32, 32))
        checks = [example] if (args.format == "torchscript" and args.method == "trace") or args.static \
            else [example, other]
        if args.format == "onnx":
            export_backbone_onnx(model, example, args.output, args.opset, dynamic=not args.static)
            diff = check_backbone_onnx(model, args.output, checks, args.atol)
        else:
            export_backbone_torchscript(model, example, args.output, args.method)
            diff = check_backbone_torchscript(model, args.output, checks, args.atol)
    else:
        opts = [o for o in args.opts if o != "--"]
        _, model = build_detectron2_model(args.config_file, opts, args.fuse)
        image = torch.rand(3, args.height, args.width) * 255
        export = DetectorExport(model, image)
        if args.format == "onnx":
            export.export_onnx(args.output, args.opset)
            diff = export.check_onnx(args.output, args.atol)
        else:
            export.export_torchscript(args.output)
            diff = export.check_torchscript(args.output, args.atol)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB); "
          f"max |exported - PyTorch| = {diff:.3g} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
