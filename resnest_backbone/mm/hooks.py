"""mmengine hooks: ResNeStDropBlockHook ramps ResNeSt's DropBlock linearly over training (the official recipe);
ResNeStInputCheckHook warns when ResNeSt weights meet a data_preprocessor that is not RGB with the ImageNet
mean/std (resnest_backbone.guards).

    custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(type='ResNeStSA', ..., dropblock_prob=0.1))
    custom_hooks = [dict(type='ResNeStDropBlockHook', ramp_iters=0)]   # 0: over the whole training

    custom_hooks = [dict(type='ResNeStInputCheckHook')]

Both are registered in mmengine's HOOKS, where mmdet's and mmseg's HOOKS find them (a registry looks in its
parent). This module imports only mmengine (and torch).
"""
import logging
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..core.dropblock import DropBlockScheduler, check_ramp

HOOK_NAME = "ResNeStDropBlockHook"
INPUT_HOOK_NAME = "ResNeStInputCheckHook"

HOOKS_REGISTERED_IN = ["mmengine"]  # the registry of the hooks here and in resume.py

__all__ = ["HOOK_NAME", "HOOKS_REGISTERED_IN", "INPUT_HOOK_NAME", "ResNeStDropBlockHook", "ResNeStInputCheckHook",
           "check_mm_input"]


@HOOKS.register_module(name=HOOK_NAME, force=True)
class ResNeStDropBlockHook(Hook):
    """Before every training iteration, sets the drop_prob of every DropBlock2D in the runner's model to

        start + (drop_prob - start) * min((runner.iter + 1) / ramp_iters, 1)

    Derived from `runner.iter` only (no counter of the hook's own), so a resumed run trains with the value of
    the iteration it resumes at; iteration- and epoch-based loops alike (runner.iter counts iterations).

    drop_prob: the final value; None = each block's configured value (the backbone's `dropblock_prob`).
    ramp_iters: iterations to reach it; 0 = runner.max_iters (the whole training). start: first value.
    A model without DropBlock2D (backbone dropblock_prob=0) is an error at the start of training."""

    priority = "NORMAL"

    def __init__(self, drop_prob: Optional[float] = None, ramp_iters: int = 0, start: float = 0.0):
        check_ramp(HOOK_NAME, drop_prob, ramp_iters)
        self.drop_prob, self.ramp_iters, self.start = drop_prob, int(ramp_iters), float(start)
        self.scheduler: Optional[DropBlockScheduler] = None

    def _scheduler(self, runner) -> DropBlockScheduler:
        if self.scheduler is None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            steps = self.ramp_iters or int(runner.max_iters)
            scheduler = DropBlockScheduler(model, self.drop_prob, max(steps, 1), self.start)
            if not scheduler.blocks:
                raise ValueError(f"{HOOK_NAME}: the model ({type(model).__name__}) has no DropBlock2D to ramp: its "
                                 "backbone was built with dropblock_prob=0. Set model.backbone.dropblock_prob (e.g. "
                                 f"0.1, the official recipe), or remove {HOOK_NAME} from custom_hooks")
            self.scheduler = scheduler
            final = self.drop_prob if self.drop_prob is not None else "their configured value"
            (getattr(runner, "logger", None) or logging.getLogger(__name__)).info(
                f"DropBlock: {len(scheduler.blocks)} blocks ramped from {self.start} to {final} over {steps} "
                "iterations")
        return self.scheduler

    def _update(self, runner) -> None:
        self._scheduler(runner).set_progress(int(runner.iter) + 1)

    def before_train(self, runner) -> None:
        self._update(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._update(runner)

    @property
    def current(self) -> List[float]:
        """The drop_prob values now set (one per DropBlock2D)."""
        return self.scheduler.current if self.scheduler is not None else []


def _flips_channels(preprocessor) -> bool:
    """Whether an mmengine/mmdet data preprocessor (`_channel_conversion`) or mmseg's SegDataPreProcessor
    (`channel_conversion`) swaps the channel order (bgr_to_rgb or rgb_to_bgr)."""
    for name in ("_channel_conversion", "channel_conversion"):
        if hasattr(preprocessor, name):
            return bool(getattr(preprocessor, name))
    return False


def check_mm_input(model, pretrained: bool = False) -> bool:
    """resnest_backbone.guards' input-format check for an mmdet/mmseg model with a ResNeStSA backbone: warn (through
    mmengine's current logger) when ResNeSt weights are loaded (`pretrained`, or a backbone init_cfg Pretrained)
    and model.data_preprocessor is not RGB with the ImageNet mean/std. Returns whether it warned."""
    from mmengine.logging import print_log

    from ..guards import RESNEST_INPUT, check_input
    from .backbone import ResNeStSA, _is_pretrained

    model = model.module if is_model_wrapper(model) else model
    backbones = [m for m in model.modules() if isinstance(m, ResNeStSA)]
    if not backbones:
        return False
    init = [c for m in backbones for c in (m.init_cfg if isinstance(m.init_cfg, list) else [m.init_cfg])
            if _is_pretrained(c)]
    preprocessor = getattr(model, "data_preprocessor", None)
    if not (pretrained or init) or preprocessor is None:
        return False
    normalised = getattr(preprocessor, "_enable_normalize", False)
    mean = [float(v) for v in preprocessor.mean.flatten()] if normalised else [0.0, 0.0, 0.0]
    std = [float(v) for v in preprocessor.std.flatten()] if normalised else [1.0, 1.0, 1.0]
    rows = [("model.data_preprocessor.mean", mean, RESNEST_INPUT["pixel_mean"]),
            ("model.data_preprocessor.std", std, RESNEST_INPUT["pixel_std"]),
            ("model.data_preprocessor.bgr_to_rgb", _flips_channels(preprocessor), True)]
    source = init[0]["checkpoint"] if init else "load_from"
    return check_input(rows, str(source), lambda m: print_log(m, logger="current", level=logging.WARNING))


@HOOKS.register_module(name=INPUT_HOOK_NAME, force=True)
class ResNeStInputCheckHook(Hook):
    """Before the run, check_mm_input(runner.model) when ResNeSt weights are loaded (a backbone init_cfg
    Pretrained, or load_from / the test checkpoint):

        custom_hooks = [dict(type='ResNeStInputCheckHook')]"""

    priority = "VERY_HIGH"

    def before_run(self, runner) -> None:
        check_mm_input(runner.model, pretrained=bool(getattr(runner, "_load_from", None)))
