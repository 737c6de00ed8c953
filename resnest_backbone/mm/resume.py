"""Exact resume for mmengine's IterBasedTrainLoop (any other loop is refused at the start): a run killed after a
checkpoint and resumed with `resume=True` ends with the same weights, bit for bit, as a run that was never
interrupted (same config, `randomness=dict(seed=...)`; CPU, or a GPU with deterministic kernels).

    custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)  # registers the hook
    custom_hooks = [dict(type='ExactResumeHook')]

What mmengine already restores: the model (BN buffers included), the optimizer, the parameter schedulers,
the iteration, the seed (`meta.seed`), and the data order: on resume the loop fetches and drops the batches
of the iterations already done, so the sampler (InfiniteSampler, DefaultSampler, mmdet's
AspectRatioBatchSampler) and dataloader workers -- each seeded once by mmengine -- are where they were.

What it does not: the global RNGs of the training process. The model's own sampling (mmdet's RPN / R-CNN
RandomSampler: torch.randperm), DropBlock, and with `num_workers=0` the data pipeline (mmcv's RandomFlip,
RandomResize: numpy) draw from them, and after a resume they continue from a different state (seeded at
start-up, then only the replayed batches drawn, without the model's draws in between).

ExactResumeHook makes them a function of position instead of history:
- right before each training step, torch (CPU and CUDA), numpy and python's global RNGs are seeded from
  (runner.seed, rank, iteration);
- every batch fetched from the training dataloader -- the replayed ones of a resume included -- is fetched
  with those RNGs seeded from (runner.seed, rank, batch number), and put back as they were afterwards (this
  matters for `num_workers=0`, where the pipeline runs in the training process; workers are seeded by
  mmengine and replayed).
Nothing is added to the checkpoints (mmengine saves and restores runner.seed itself), so they stay as
mmengine writes them.
"""
from typing import Optional

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from ..seeding import DATA, mix_seed, seed_step, seeded

__all__ = ["HOOK_NAME", "ExactResumeHook"]

HOOK_NAME = "ExactResumeHook"


class _SeededFetches:
    """A training-loop dataloader iterator whose n-th batch is fetched with the global RNGs seeded from
    (seed, rank, n), then restored."""

    def __init__(self, iterator, seed: int, rank: int):
        self._inner, self._seed, self._rank, self.fetched = iterator, seed, rank, 0

    def __iter__(self):
        return self

    def __next__(self):
        with seeded(mix_seed(self._seed, self._rank, self.fetched, DATA)):
            batch = next(self._inner)
        self.fetched += 1
        return batch

    def __getattr__(self, name):  # the wrapped iterator's attributes (_dataloader, _epoch, ...)
        return getattr(self._inner, name)


@HOOKS.register_module(name=HOOK_NAME, force=True)
class ExactResumeHook(Hook):
    """Seed the training process's global RNGs from (seed, rank, iteration) before each step and from
    (seed, rank, batch number) for each batch fetch, so that a resumed IterBasedTrainLoop run draws the same
    random numbers as an uninterrupted one.

    seed: None = the runner's seed (`randomness=dict(seed=...)`, or the one mmengine drew and saved in the
    checkpoint's meta). Lowest priority: the seeding is the last thing before the step. Another training loop
    than IterBasedTrainLoop (e.g. EpochBasedTrainLoop) is refused at the start of training: its resume is not
    shown to be exact."""

    priority = "LOWEST"

    def __init__(self, seed: Optional[int] = None):
        self.seed = seed

    def _seed(self, runner) -> int:
        seed = self.seed if self.seed is not None else runner.seed
        if seed is None:
            raise ValueError("ExactResumeHook needs a seed: set randomness=dict(seed=...) or ExactResumeHook(seed=...)")
        return int(seed) % (2 ** 63)

    def before_train(self, runner) -> None:
        # Runs before the loop replays the batches of a resumed run: those fetches are counted too.
        loop = runner.train_loop
        if not isinstance(loop, IterBasedTrainLoop):
            raise ValueError(f"ExactResumeHook: exact resume is made and tested for IterBasedTrainLoop only, not "
                             f"{type(loop).__name__}; train with train_cfg=dict(type='IterBasedTrainLoop', "
                             "max_iters=...), or remove ExactResumeHook from custom_hooks to resume as mmengine does")
        if not isinstance(loop.dataloader_iterator, _SeededFetches):
            loop.dataloader_iterator = _SeededFetches(loop.dataloader_iterator, self._seed(runner), get_rank())

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        seed_step(self._seed(runner), get_rank(), runner.iter)
