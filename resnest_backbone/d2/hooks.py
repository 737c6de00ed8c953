"""detectron2 hook that ramps ResNeSt's DropBlock linearly over training (the official recipe).

    trainer.register_hooks([ResNeStDropBlockHook(drop_prob=0.1, ramp_iters=0)])

resnest_backbone.d2.Trainer adds it by itself whenever MODEL.RESNEST.DROPBLOCK_PROB > 0, with
MODEL.RESNEST.DROPBLOCK_RAMP_ITERS (0 = ramp over the whole training, SOLVER.MAX_ITER).
"""
import logging
from typing import Optional

from detectron2.engine import HookBase
from torch.nn.parallel import DataParallel, DistributedDataParallel

from ..core.dropblock import DropBlockScheduler, check_ramp

__all__ = ["ResNeStDropBlockHook", "build_dropblock_hook"]


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
            self.scheduler = DropBlockScheduler(_unwrap(self.trainer.model), self.drop_prob, max(steps, 1),
                                                self.start)
            if not self.scheduler.blocks:
                logging.getLogger(__name__).warning(
                    "ResNeStDropBlockHook: the model has no DropBlock2D (backbone built with DROPBLOCK_PROB 0?)")
            else:
                logging.getLogger(__name__).info(
                    "DropBlock: %d blocks ramped from %g to %s over %d iterations", len(self.scheduler.blocks),
                    self.start, self.drop_prob if self.drop_prob is not None else "their configured value", steps)
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
