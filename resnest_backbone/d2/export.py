"""Export a whole detectron2 model (e.g. Faster R-CNN ResNeSt-FPN) to ONNX / TorchScript through detectron2's
TracingAdapter, checked against PyTorch (tools/export.py detectron2 ...).

    from resnest_backbone.d2.export import DetectorExport, build_detectron2_model
    cfg, model = build_detectron2_model("faster_rcnn_resnest50_fpn", ["MODEL.WEIGHTS", "model.pkl"], fuse=True)
    export = DetectorExport(model, torch.rand(3, 800, 1216) * 255)     # one image, fixed size
    export.export_onnx("frcnn.onnx"); export.check_onnx("frcnn.onnx")  # max |exported - PyTorch|
"""
from typing import List, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

from ..core.fuse import fuse_model
from ..export import DEFAULT_OPSET, FORMATS, check_close, check_onnx_exportable, max_abs_diff, onnx_session, quiet
from .checkpoint import SafeDetectionCheckpointer
from .model_zoo import get_config

__all__ = ["DetectorExport", "build_detectron2_model", "export_detector"]


def build_detectron2_model(config_file: str, opts: Sequence[str] = (), fuse: bool = False, device: str = "cpu"):
    """(frozen cfg, eval model) for a yaml config (a path or a project config's name) + KEY VALUE overrides;
    MODEL.WEIGHTS is read by the safe checkpointer (architecture checked); `fuse`: norms folded."""
    cfg = get_config(config_file)
    if not isinstance(cfg, CfgNode):
        raise ValueError(f"{config_file}: a LazyConfig; export takes a yaml config")
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        SafeDetectionCheckpointer(model, config=cfg).load(cfg.MODEL.WEIGHTS)  # safe reader, architecture, guards
    if fuse:
        model = fuse_model(model, inplace=True)
    return cfg, model


class DetectorExport:
    """A detectron2 model wrapped by TracingAdapter for one input image (C, H, W, float 0-255, the
    config's INPUT.FORMAT); outputs are the flattened raw Instances (boxes, classes, scores, image size)."""

    def __init__(self, model, image: torch.Tensor):
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
        check_onnx_exportable(self.adapter)
        with quiet(), torch.no_grad():
            torch.onnx.export(self.adapter, self.inputs, path, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=self.output_names(),
                              do_constant_folding=True)

    def export_torchscript(self, path: str) -> None:
        with quiet(), torch.no_grad():
            traced = torch.jit.trace(self.adapter, self.inputs)
        traced.save(path)

    def check_onnx(self, path: str, atol: float = 1e-4) -> float:
        session = onnx_session(path)
        outs = session.run(None, {session.get_inputs()[0].name: self.inputs[0].numpy()})
        return check_close("onnxruntime detector", max_abs_diff(self.reference, outs), atol)

    def check_torchscript(self, path: str, atol: float = 1e-4) -> float:
        with quiet():
            loaded = torch.jit.load(path)  # the file this export has just written
        with torch.no_grad():
            outs = loaded(*self.inputs)
        return check_close("torchscript detector", max_abs_diff(self.reference, list(outs)), atol)


def export_detector(model, path: str, format: str = "onnx", height: int = 800, width: int = 1216,
                    opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> float:
    """Trace `model` on a random (3, height, width) image, write it to `path` and check it against PyTorch;
    returns the largest |exported - PyTorch|."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {FORMATS}")
    export = DetectorExport(model, torch.rand(3, height, width) * 255)
    if format == "onnx":
        export.export_onnx(path, opset)
        return export.check_onnx(path, atol)
    export.export_torchscript(path)
    return export.check_torchscript(path, atol)
