"""Speed of ResNeSt backbones side by side with the official code, timm and ResNet, each under the same
menu of treatments, and of Faster R-CNN ResNeSt-FPN vs R-50-FPN. Separate pieces:

    candidates.py   workloads and implementations (each built on demand)
    treatments.py   the treatment menu (eager, channels_last, jit, compile, bf16 autocast, int8) + ours' own
    measure.py      measuring primitives: interleaved timing, peak memory, GMACs, machine peak (matmul, conv),
                    environment
    run.py          what is measured: one JSON-able result dict
    render.py       markdown + png and the goals, from that dict alone

tools/benchmark.py is the command line; tools/gpu_check.py times the same candidates on a GPU. A development
tool run from a checkout (the repository root on sys.path), not part of the installed package. Imports torch
and resnest_backbone only; the official resnest package, timm, torchvision,
fvcore, matplotlib and detectron2 are imported when the pieces that need them run.
"""
from .candidates import (FULL_EVAL, FULL_TRAIN, GRAD_CHECKPOINT_LOAD, SMOKE_EVAL, SMOKE_GRAD_CHECKPOINT_LOAD,
                         SMOKE_TRAIN, Implementation, Workload, backbone_implementations, detector_implementations,
                         detector_workload, parse_workloads, resnet_depth_name)
from .measure import environment, load_average, matmul_peak
from .render import goals, render_markdown, render_png
from .run import run_backbones, run_benchmark, run_detectors, run_grad_checkpoint
from .treatments import DETECTOR_MENU, EVAL_MENU, TRAIN_MENU, Treatment, menu, own_treatments

__all__ = ["DETECTOR_MENU", "EVAL_MENU", "FULL_EVAL", "FULL_TRAIN", "GRAD_CHECKPOINT_LOAD", "Implementation",
           "SMOKE_EVAL", "SMOKE_GRAD_CHECKPOINT_LOAD", "SMOKE_TRAIN", "TRAIN_MENU", "Treatment", "Workload",
           "backbone_implementations", "detector_implementations", "detector_workload", "environment", "goals",
           "load_average", "matmul_peak", "menu", "own_treatments", "parse_workloads", "render_markdown",
           "render_png", "resnet_depth_name", "run_backbones", "run_benchmark", "run_detectors",
           "run_grad_checkpoint"]
