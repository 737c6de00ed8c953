"""Speed of ResNeSt backbones side by side with the official code, timm and ResNet, and of Faster R-CNN
ResNeSt-FPN vs R-50-FPN: the candidates (candidates.py) and how they are measured (measure.py). The command
line and the report (markdown + chart, rendered from the JSON of the numbers) are tools/benchmark.py.

Imports torch only; the official resnest package, timm, torchvision, fvcore and detectron2 are imported
when the candidates or counts that need them are built.
"""
from .candidates import (FULL_EVAL, FULL_TRAIN, GRAD_CHECKPOINT_LOAD, SMOKE_EVAL, SMOKE_GRAD_CHECKPOINT_LOAD,
                         SMOKE_TRAIN, Candidate, Workload, backbone_candidates, candidate_names, detector_models,
                         detector_workload, resnet_depth_name)
from .measure import environment, load_average, measure_backbones, measure_detectors, measure_grad_checkpoint

__all__ = ["Candidate", "FULL_EVAL", "FULL_TRAIN", "GRAD_CHECKPOINT_LOAD", "SMOKE_EVAL", "SMOKE_GRAD_CHECKPOINT_LOAD",
           "SMOKE_TRAIN", "Workload", "backbone_candidates", "candidate_names", "detector_models", "detector_workload",
           "environment", "load_average", "measure_backbones", "measure_detectors", "measure_grad_checkpoint",
           "resnet_depth_name"]
