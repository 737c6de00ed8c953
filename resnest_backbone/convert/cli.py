"""resnest-convert: ResNeSt ImageNet checkpoint -> detectron2 .pkl / mmdet .pth / official .pth|.safetensors

    resnest-convert resnest50-528c19ca.pth resnest50_d2.pkl
    resnest-convert resnest50-528c19ca.pth resnest50_mmdet.pth --format mmdet
    resnest-convert my_fast_model.pth out.pkl --variant resnest50_fast_2s1x64d
    resnest-convert resnest50 resnest50_d2.pkl       # a variant name: the published file, downloaded once

A variant name instead of a file (when no such file exists) fetches the published ImageNet weights from a
table of sources (resnest_backbone/convert/sources.py): cached in $RESNEST_CACHE (default
~/.cache/resnest-backbone/weights), resumed when interrupted, and used only once its sha256 matches (the
published 8-hex prefix, or a full hash where one is pinned). RESNEST_WEIGHTS_MIRROR (base URLs tried first)
and RESNEST_WEIGHTS_SOURCES / --sources (a JSON table) change where it looks.

The variant is read from the weights; avd_first (the `fast` ablations), which weights cannot show, is taken
from --variant, or from the official / timm file name (resnest50_fast_2s1x64d-44938639.pth,
resnest50d_4s2x40d-41d14ed0.pth). When neither decides, nothing is written and the candidates are listed.
The output records the variant; every loader of this package checks it against the model.
"""
import argparse
import os
import sys

from .convert import FORMATS, check_output, convert_checkpoint, variant_arch
from .io import CheckpointError
from .sources import SOURCES_ENV, resolve_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="resnest-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="checkpoint: .pth/.pt/.bin (weights-only), .pkl, .safetensors; official, "
                                      "timm, mmdet or detectron2-ResNeSt naming; or a variant name (resnest50, "
                                      "resnest50_fast_2s1x64d, ...): its published weights, downloaded and verified")
    parser.add_argument("output", help="output file (.pkl for d2; .pth or .safetensors for mmdet/official)")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="output format (default: d2 for .pkl, otherwise required)")
    parser.add_argument("--variant", help="the variant the weights are for (checked against the weights; needed when avd_first "
                             "cannot be decided from the file name)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--keep-classifier", action="store_true", help="keep fc.* (official format)")
    parser.add_argument("--cache-dir", help="where weights fetched by name are kept (default: $RESNEST_CACHE or "
                                            "~/.cache/resnest-backbone/weights)")
    parser.add_argument("--sources", help=f"a JSON table of sources for names (same as {SOURCES_ENV})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a download may stall (default 30)")
    args = parser.parse_args(argv)
    fmt = args.format or ("d2" if args.output.endswith(".pkl") else None)
    if fmt is None:
        parser.error("--format is required unless the output ends with .pkl")
    saved = os.environ.get(SOURCES_ENV)
    if args.sources:
        os.environ[SOURCES_ENV] = args.sources
    try:
        check_output(args.output, fmt, args.force)  # before a download
        src, named = resolve_checkpoint(args.input, strict=True, cache_dir=args.cache_dir, timeout=args.timeout)
        variant, given_by = args.variant, "--variant"
        if named is not None:
            if args.variant and variant_arch(args.variant) != variant_arch(named):
                raise CheckpointError(f"the name {args.input} and --variant {args.variant} are different "
                                      "architectures; give one of them")
            variant, given_by = (args.variant, "--variant") if args.variant else (named, "variant name")
        report = convert_checkpoint(src, args.output, fmt, variant, args.force, args.keep_classifier, given_by)
    except (CheckpointError, ValueError) as exc:
        print(f"resnest-convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no permission to write the output folder, disk full
        print(f"resnest-convert: error: {exc.filename or args.output}: {exc.strerror or exc}; nothing was "
              "written", file=sys.stderr)
        return 2
    finally:
        if args.sources:  # main() may run inside another program: leave its environment as it was
            if saved is None:
                os.environ.pop(SOURCES_ENV, None)
            else:
                os.environ[SOURCES_ENV] = saved
    for line in report.lines():
        print(line)
    for note in report.notes:
        print(f"resnest-convert: note: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({fmt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
