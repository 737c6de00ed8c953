"""resnest-convert: ResNeSt ImageNet checkpoint -> detectron2 .pkl / mmdet .pth / official .pth|.safetensors

    resnest-convert resnest50-528c19ca.pth resnest50_d2.pkl
    resnest-convert resnest50-528c19ca.pth resnest50_mmdet.pth --format mmdet
    resnest-convert my_fast_model.pth out.pkl --variant resnest50_fast_2s1x64d

The variant is read from the weights; avd_first (the `fast` ablations), which weights cannot show, is taken
from --variant, or from the official / timm file name (resnest50_fast_2s1x64d-44938639.pth,
resnest50d_4s2x40d-41d14ed0.pth). When neither decides, nothing is written and the candidates are listed.
The output records the variant; every loader of this package checks it against the model.
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
    parser.add_argument("--variant", help="the variant the weights are for (checked against the weights; needed when avd_first "
                             "cannot be decided from the file name)")
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
    for note in report.notes:
        print(f"resnest-convert: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
