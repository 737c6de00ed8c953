#!/usr/bin/env python
"""Side-by-side speed of ResNeSt backbones, each implementation under the same menu of standard treatments:
ours, the official code (resnest==0.0.5), timm, and torchvision's ResNet of the same depth; plus Faster
R-CNN ResNeSt-FPN vs R-50-FPN; every throughput also as a fraction of the machine's peak (the best of matmuls
and dense convolutions).

    python tools/benchmark.py --threads 2 --compile   # full run (the committed one): docs/benchmark.json,
                                                      # then .md and .png from it (about 30 min on 2 threads)
    python tools/benchmark.py --threads 2         # without the torch.compile treatments (compiling each model
                                                  # and shape took 8-40 s here)
    python tools/benchmark.py --render                    # docs/benchmark.md + .png from docs/benchmark.json
    python tools/benchmark.py --render b.json --out b.md  # the report of another run, measuring nothing
    python tools/benchmark.py --smoke --out /tmp/b.md     # tiny sizes, one round: checks that it runs
    python tools/benchmark.py --eval 1x800x1216 --train "" --no-detector --repeats-large 1   # one workload
    python tools/benchmark.py --grad-checkpoint-only --grad-checkpoint-variants resnest50,resnest200 \
        --out docs/grad_checkpoint.md      # only: training step with / without gradient checkpointing

Pieces (benchmarks/ at the repository root: a development tool, not in the installed package):
candidates.py (workloads, implementations), treatments.py (the menu), measure.py (timing, peak memory, GMACs,
machine peak), run.py (what is measured, into one JSON-able dict), render.py (markdown + png from that dict
alone, and the goals). This file is the command line: it measures into --json (default: --out with .json),
then renders the report from the JSON as written; every section names the CPU and its flags.
The torch thread count is fixed (--threads) and recorded; run it on a quiet machine.
"""
import os

if __name__ == "__main__":
    # OpenMP threads that spin while waiting (the default) slow everything down many times over when other
    # processes share the CPUs; sleeping waiters cost little on an idle machine. It must be set before torch
    # loads, so only when run as a script. Override it by setting OMP_WAIT_POLICY yourself.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import logging
import sys
import warnings
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.candidates import (FULL_EVAL, FULL_TRAIN, GRAD_CHECKPOINT_LOAD, SMOKE_CONV_SHAPES,  # noqa: E402
                                   SMOKE_EVAL, SMOKE_GRAD_CHECKPOINT_LOAD, SMOKE_TRAIN, detector_workload,
                                   parse_workloads)
from benchmarks.render import render_markdown, render_png  # noqa: E402
from benchmarks.run import run_benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "docs", "benchmark.md")


def _write(path: str, text: str) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_report(res: dict, out: str, png: str) -> str:
    md = render_markdown(res)
    _write(out, md)
    print(md)
    if "backbone" in res:
        render_png(res, png)
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out}")
    return md


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=None, help="ResNeSt variant (default resnest50; smoke: resnest14d)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; smoke 0)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    parser.add_argument("--repeats-large", type=int, default=None,
                        help="timed rounds at detection size (default 3; smoke 1)")
    parser.add_argument("--repeats-train", type=int, default=None,
                        help="timed rounds of the training steps (default 5; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    parser.add_argument("--eval", default=None, metavar="BxHxW,...",
                        help="eval workloads, the key one last (default 1x224x224,8x224x224,1x800x1216)")
    parser.add_argument("--train", default=None, metavar="BxHxW,...",
                        help='training-step workloads, the key one last (default 2x800x1216; "" for none)')
    parser.add_argument("--peak-sizes", default=None, metavar="N,...",
                        help="square matmul sizes for the machine peak (default 1024,2048,4096; smoke 128,256)")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile treatments (slow)")
    parser.add_argument("--dtypes", default=None, metavar="DTYPE,...",
                        help="only the backbone treatments of these dtypes (fp32, bf16, fp16, int8; default all), e.g. "
                             "fp32,int8 on a CPU without native bf16, where each bf16 call at 800x1216 takes a minute")
    parser.add_argument("--no-train", action="store_true", help='same as --train ""')
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-detector", action="store_true")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="also time a training step of our trunk without / with gradient checkpointing")
    parser.add_argument("--grad-checkpoint-only", action="store_true",
                        help="measure only that (no backbone / detector comparison, no chart)")
    parser.add_argument("--grad-checkpoint-variants", default=None,
                        help="comma-separated variants for it (default: --variant)")
    parser.add_argument("--grad-checkpoint-size", default=None, metavar="BxHxW",
                        help="its workload (default 2x320x320; smoke 2x64x64)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave malloc as it is (default: glibc kept from returning freed memory to the OS, "
                             "so that repeated steps do not page-fault afresh; see measure.steady_allocator)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown report (default docs/benchmark.md)")
    parser.add_argument("--png", default=None, help="bar chart (default: --out with .png)")
    parser.add_argument("--json", default=None, help="the numbers (default: --out with .json)")
    parser.add_argument("--render", nargs="?", const="", default=None, metavar="JSON",
                        help="measure nothing: write --out / --png from the JSON of an earlier run "
                             "(default: --out with .json)")
    args = parser.parse_args(argv)
    stem = os.path.splitext(args.out)[0]
    args.png = args.png or stem + ".png"
    if args.render is not None:
        path = args.render or stem + ".json"
        try:
            with open(path) as f:
                res = json.load(f)
        except FileNotFoundError:
            parser.error(f"--render: {path} does not exist (run the benchmark first, or name its JSON)")
        except json.JSONDecodeError as exc:
            parser.error(f"--render: {path} is not JSON ({exc})")
        if not isinstance(res, dict) or res.get("schema") != 2:
            parser.error(f"--render: {path} is not a result of this version of the benchmark (no \"schema\": 2)")
        write_report(res, args.out, args.png)
        return res
    args.json = args.json or stem + ".json"
    smoke = args.smoke
    args.variant = args.variant or ("resnest14d" if smoke else "resnest50")
    args.warmup = args.warmup if args.warmup is not None else (0 if smoke else 1)
    args.repeats = args.repeats if args.repeats is not None else (1 if smoke else 7)
    args.repeats_large = args.repeats_large if args.repeats_large is not None else (1 if smoke else 3)
    args.repeats_train = args.repeats_train if args.repeats_train is not None else (1 if smoke else 5)
    try:
        eval_loads = parse_workloads(args.eval) if args.eval is not None else SMOKE_EVAL if smoke else FULL_EVAL
        train_loads = (() if args.no_train else parse_workloads(args.train) if args.train is not None
                       else SMOKE_TRAIN if smoke else FULL_TRAIN)
        gc_load = (parse_workloads(args.grad_checkpoint_size)[0] if args.grad_checkpoint_size
                   else SMOKE_GRAD_CHECKPOINT_LOAD if smoke else GRAD_CHECKPOINT_LOAD)
        peak_sizes = ([int(n) for n in args.peak_sizes.split(",") if n.strip()] if args.peak_sizes
                      else [128, 256] if smoke else [1024, 2048, 4096])
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.dtypes is not None else None
        unknown = sorted(set(dtypes or ()) - {"fp32", "bf16", "fp16", "int8"})
        if unknown or dtypes == []:
            raise ValueError(f"--dtypes {args.dtypes!r}: use some of fp32, bf16, fp16, int8")
    except (ValueError, IndexError) as exc:
        parser.error(str(exc) or "bad workload")
    if not eval_loads and not args.grad_checkpoint_only:
        parser.error("--eval: give at least one workload (the key one last)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    gc_variants = []
    if args.grad_checkpoint or args.grad_checkpoint_only:
        gc_variants = [v.strip() for v in (args.grad_checkpoint_variants or args.variant).split(",") if v.strip()]
    res = run_benchmark(
        variant=args.variant, eval_loads=eval_loads, train_loads=train_loads,
        detector_load=None if args.no_detector else detector_workload(smoke),
        grad_checkpoint_variants=gc_variants, grad_checkpoint_load=gc_load, backbone=not args.grad_checkpoint_only,
        compile_=args.compile, warmup=args.warmup, repeats=args.repeats, repeats_large=args.repeats_large,
        repeats_train=args.repeats_train,
        memory=not args.no_memory, dtypes=dtypes, peak_sizes=peak_sizes, peak_convs=SMOKE_CONV_SHAPES if smoke else None,
        device=args.device, args=dict(vars(args)), steady_allocator_=not args.default_allocator,
        argv=list(argv) if argv is not None else sys.argv[1:])
    text = json.dumps(res, indent=1)
    _write(args.json, text + "\n")
    write_report(json.loads(text), args.out, args.png)  # rendered from the numbers as saved
    return res


if __name__ == "__main__":
    main()
