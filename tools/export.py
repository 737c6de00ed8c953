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
The work is done by resnest_backbone.export (backbone) and resnest_backbone.d2.export (detectron2).
"""
import argparse
import logging
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from resnest_backbone.convert import CheckpointError  # noqa: E402
from resnest_backbone.core import STAGE_NAMES  # noqa: E402
from resnest_backbone.export import DEFAULT_OPSET, FORMATS, build_backbone, export_backbone  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    def common(p):
        p.add_argument("--format", choices=FORMATS, default="onnx")
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
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* deprecation notices
    torch.manual_seed(args.seed)
    try:
        if args.what == "backbone":
            model = build_backbone(args.variant, args.weights, args.out_features.split(","), args.fuse)
            diff = export_backbone(model, args.output, args.format, args.batch, args.height, args.width,
                                   args.method, args.opset, dynamic=not args.static, atol=args.atol)
        else:
            from resnest_backbone.d2.export import build_detectron2_model, export_detector

            _, model = build_detectron2_model(args.config_file, [o for o in args.opts if o != "--"], args.fuse)
            diff = export_detector(model, args.output, args.format, args.height, args.width, args.opset, args.atol)
    except CheckpointError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB); "
          f"max |exported - PyTorch| = {diff:.3g} <= {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
