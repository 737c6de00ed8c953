"""detectron2 hooks for ResNeSt training, each usable from any detectron2 trainer.

ResNeStDropBlockHook ramps ResNeSt's DropBlock linearly over training (the official recipe):

    trainer.register_hooks([build_dropblock_hook(cfg)])   # MODEL.RESNEST.DROPBLOCK_PROB / _RAMP_ITERS; None if 0
    trainer.register_hooks([ResNeStDropBlockHook(drop_prob=0.1, ramp_iters=0)])

ResNeStPreciseBN is detectron2's PreciseBN hook (TEST.PRECISE_BN; the Trainer and LazyConfig training use it
in its place) that leaves alone the norms the precise-BN passes never ran: fvcore's update_bn_stats would
set their running mean and variance to zero.

ResNeStHooksMixin gives a DefaultTrainer both from its config: `class Trainer(ResNeStHooksMixin, DefaultTrainer)`.
"""
import contextlib
import logging
from typing import Iterator, Optional

import torch
from detectron2.engine import HookBase, hooks
from fvcore.nn.precise_bn import get_bn_modules
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..core.dropblock import DropBlockScheduler, check_ramp

__all__ = ["ResNeStDropBlockHook", "ResNeStHooksMixin", "ResNeStPreciseBN", "build_dropblock_hook",
           "keep_unused_norm_stats"]


def _unwrap(model):
    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else model


class ResNeStDropBlockHook(HookBase):
    """Before every iteration, sets the drop_prob of every DropBlock2D in the trainer's model to

        start + (drop_prob - start) * min((trainer.iter + 1) / ramp_iters, 1)

    The value comes from the trainer's current `iter` only (no counter of the hook's own), so a resumed run
    (trainer.iter = k) trains with the value for iteration k.

    drop_prob: the final value; None = each block's configured value (MODEL.RESNEST.DROPBLOCK_PROB, which the
        backbone was built with). ramp_iters: iterations to reach it; 0 = trainer.max_iter. start: the first
        value (0 as the official recipes)."""

    def __init__(self, drop_prob: Optional[float] = None, ramp_iters: int = 0, start: float = 0.0):
        check_ramp("ResNeStDropBlockHook", drop_prob, ramp_iters)
        self.drop_prob, self.ramp_iters, self.start = drop_prob, int(ramp_iters), float(start)
        self.scheduler: Optional[DropBlockScheduler] = None

    def _scheduler(self) -> DropBlockScheduler:
        if self.scheduler is None:
            steps = self.ramp_iters or int(self.trainer.max_iter)
            scheduler = DropBlockScheduler(_unwrap(self.trainer.model), self.drop_prob, max(steps, 1), self.start)
            if not scheduler.blocks:
                raise ValueError("ResNeStDropBlockHook: the model has no DropBlock2D, so there is nothing to ramp: "
                                 "build the backbone with MODEL.RESNEST.DROPBLOCK_PROB > 0 (LazyConfig: "
                                 "ResNeStBackbone(dropblock_prob=...)), or do not register the hook")
            logging.getLogger(__name__).info(
                "DropBlock: %d blocks ramped from %g to %s over %d iterations", len(scheduler.blocks), self.start,
                self.drop_prob if self.drop_prob is not None else "their configured value", steps)
            self.scheduler = scheduler
        return self.scheduler

    def _update(self) -> None:
        self._scheduler().set_progress(int(self.trainer.iter) + 1)

    def before_train(self):
        self._update()

    def before_step(self):
        self._update()

    @property
    def current(self):
        """The drop_prob values now set (one per DropBlock2D)."""
        return self.scheduler.current if self.scheduler is not None else []


def build_dropblock_hook(cfg) -> Optional[ResNeStDropBlockHook]:
    """The hook for a config, or None when MODEL.RESNEST.DROPBLOCK_PROB is 0 (or the config has no RESNEST)."""
    rc = cfg.MODEL.get("RESNEST")
    if rc is None or not rc.get("DROPBLOCK_PROB", 0.0) > 0:
        return None
    return ResNeStDropBlockHook(drop_prob=rc.DROPBLOCK_PROB, ramp_iters=rc.get("DROPBLOCK_RAMP_ITERS", 0))


@contextlib.contextmanager
def keep_unused_norm_stats(model: torch.nn.Module) -> Iterator[None]:
    """Around fvcore's update_bn_stats: every BN layer it recomputes (get_bn_modules: BatchNorm / SyncBatchNorm
    in training mode) whose forward never ran inside the block gets its running mean and variance back, with
    a warning naming it. fvcore skips such a layer in every batch and then writes its empty estimate: zeros
    (a zero variance). In a ResNeSt that is the split-attention norm after the global pool at one image per
    process, which normalises with the running statistics instead (SplitAttentionConv2d.attention_norm)."""
    layers = [m for m in get_bn_modules(model) if m.running_mean is not None and m.running_var is not None]
    names = {id(m): n for n, m in model.named_modules()}
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in layers}
    ran = set()
    handles = [m.register_forward_pre_hook(lambda module, _: ran.add(id(module))) for m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    unused = [m for m in layers if id(m) not in ran]
    for m in unused:
        mean, var = saved[id(m)]
        m.running_mean, m.running_var = mean, var
    if unused:
        listed = [names.get(id(m), type(m).__name__) for m in unused]
        logging.getLogger(__name__).warning(
            "PreciseBN: %d of %d norm layers did not run their forward in the precise-BN passes and keep their "
            "training running statistics (split-attention norms after the global pool run on the running "
            "statistics at 1 image per process): %s%s", len(unused), len(layers), ", ".join(listed[:8]),
            ", ..." if len(listed) > 8 else "")


class ResNeStPreciseBN(hooks.PreciseBN):
    """detectron2's PreciseBN (same arguments, same schedule: every `period` iterations and after the last),
    whose update keeps the running statistics of layers it could not recompute (keep_unused_norm_stats)."""

    @classmethod
    def adopt(cls, hook: hooks.PreciseBN) -> "ResNeStPreciseBN":
        """This class in place of a built detectron2 PreciseBN hook (same state: model, data loader, period)."""
        new = cls.__new__(cls)
        new.__dict__.update(hook.__dict__)
        return new

    def update_stats(self):
        if getattr(self, "_disabled", False):
            return super().update_stats()
        with keep_unused_norm_stats(self._model):
            super().update_stats()


class ResNeStHooksMixin:
    """For a DefaultTrainer subclass (`class Trainer(ResNeStHooksMixin, DefaultTrainer)`): its build_hooks, with
    build_dropblock_hook(cfg) first (it sets drop_prob before each step) and detectron2's PreciseBN hook as
    ResNeStPreciseBN."""

    def build_hooks(self):
        ret = [ResNeStPreciseBN.adopt(h) if type(h) is hooks.PreciseBN else h for h in super().build_hooks()]
        dropblock = build_dropblock_hook(self.cfg)
        return ([dropblock] if dropblock is not None else []) + ret
