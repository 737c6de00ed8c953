"""resnest-convert: ResNeSt ImageNet checkpoint -> detectron2 .pkl / mmdet .pth / official .pth|.safetensors

    resnest-convert resnest50-528c19ca.pth resnest50_d2.pkl
    resnest-convert resnest50-528c19ca.pth resnest50_mmdet.pth --format mmdet
    resnest-convert resnest50_fast_2s1x64d.pth out.pkl --variant resnest50_fast_2s1x64d
"""
import argparse
import sys

from .convert import FORMATS, convert_checkpoint
from .io import CheckpointError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="resnest-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint: .pth/.pt/.bin (weights-only), .pkl, .safetensors; official, "
                                      "timm, mmdet or detectron2-ResNeSt naming")
    parser.add_argument("output", help="output file (.pkl for d2; .pth or .safetensors for mmdet/official)")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="output format (default: d2 for .pkl, otherwise required)")
    parser.add_argument("--variant", help="check against this variant instead of the detected one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--keep-classifier", action="store_true", help="keep fc.* (official format)")
    args = parser.parse_args(argv)
    fmt = args.format or ("d2" if args.output.endswith(".pkl") else None)
    if fmt is None:
        parser.error("--format is required unless the output ends with .pkl")
    try:
        report = convert_checkpoint(args.input, args.output, fmt, args.variant, args.force,
                                    args.keep_classifier)
    except (CheckpointError, ValueError) as exc:
        print(f"resnest-convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no permission to write the output folder, disk full
        print(f"resnest-convert: error: {exc.filename or args.output}: {exc.strerror or exc}; nothing was "
              "written", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print(f"wrote {args.output} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
