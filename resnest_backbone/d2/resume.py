"""Exact resume for detectron2 training: a run killed after a checkpoint and resumed with `--resume` ends
with the same weights, bit for bit, as a run that was never interrupted (same config, fixed SEED; CPU, or a
GPU with deterministic kernels), with no iteration and no training sample repeated or skipped.

detectron2's DefaultTrainer checkpoints the model, the optimizer (with this project's Trainer) and the LR
scheduler, but not where the training data stream stood nor the random number generators, so after a resume

- its TrainingSampler starts its seeded shuffle again from the beginning (the resumed run sees the first
  images of the first epoch again, not the ones the uninterrupted run would see);
- augmentation (numpy's global RNG in the main process, or per-worker seeds) and the model's own sampling
  (torch's global RNG: RPN / ROI sampling, DropBlock) continue from a different RNG state;
- aspect-ratio grouping loses the images it held back for the next batch.

Here the training randomness is a function of positions instead of history:

ResumableTrainLoader
    drop-in for `build_detection_train_loader` (same dataset, mapper, sampler, batch size, aspect-ratio
    grouping, workers). Sample p of this rank's stream is `mapper(dataset[sampler_stream[p]])` computed with
    numpy / python / torch RNGs seeded from (loader seed, rank, p), so it is the same in the main process
    or in any worker. The loader's state -- the next stream position, the positions held in aspect-ratio
    buckets, the seed -- is a few ints (`state_dict()`), counted at the consumer side (prefetched samples are
    not counted), and `load_state_dict()` makes the next `iter()` continue exactly there.
seed_step
    the global RNGs (torch incl. CUDA, numpy, python) are re-seeded from (SEED, rank, iteration) right
    before each training step, so the step's randomness does not depend on what ran before it in this
    process (model construction, checkpoint loading, evaluation, PreciseBN, a data loader starting).
ExactResumeMixin
    for a DefaultTrainer subclass: seeds each step, and puts the data loaders' states and the base seed
    in the trainer's checkpoint state (plain ints and lists: the checkpoint stays loadable with
    torch.load(weights_only=True)). `exact_resume = False` on the class gives detectron2's stock behaviour.
"""
import itertools
import logging
import random
from typing import Dict, List, Optional

import torch
from torch.utils import data as torchdata

from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper

from ..seeding import LOADER, SAMPLE, mix_seed, seed_step, seeded, torch_seed

__all__ = ["ExactResumeMixin", "ResumableTrainLoader", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


class _StreamSamples(torchdata.Dataset):
    """Item (p, index) -> (p, mapper(dataset[index])), computed with the RNGs seeded from (seed, rank, p). A
    mapper returning None (a sample to skip) is retried on other indices drawn from the same seed."""

    def __init__(self, dataset, mapper, seed: int, rank: int):
        self.dataset, self.mapper, self.seed, self.rank = dataset, PicklableWrapper(mapper), seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        position, index = item
        words = mix_seed(self.seed, self.rank, position, SAMPLE)
        fallback = random.Random(int(words[2]))
        with seeded(words):
            for attempt in itertools.count(1):
                data = self.mapper(self.dataset[index])
                if data is not None:
                    return position, data
                if attempt >= 3:
                    logger.warning(f"Failed to apply the mapper to dataset index {index} "
                                   f"(stream position {position}) after {attempt} attempts")
                index = fallback.randrange(len(self.dataset))


class _Positions(torchdata.Sampler):
    """(position, index) of a sampler's stream: the positions in `pending`, then every position >= start."""

    def __init__(self, sampler, start: int, pending: List[int]):
        self.sampler, self.start, self.pending = sampler, start, frozenset(pending)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start or position in self.pending:
                yield position, int(index)


def _as_is(item):
    return item


class ResumableTrainLoader:
    """Batches (lists of mapped dicts) like detectron2's `build_detection_train_loader`, from a stream
    whose position is saved with `state_dict()` and restored with `load_state_dict()`.

    dataset: list of dataset dicts or a map-style dataset; sampler: an infinite, seeded index sampler
    (detectron2's TrainingSampler, RepeatFactorTrainingSampler, ...); total_batch_size: over all processes;
    aspect_ratio_grouping: detectron2's two buckets (width > height or not); num_workers: DataLoader workers
    (the batches do not depend on it); seed: any int, default the sampler's `_seed` (detectron2 main builds
    its samplers with seed=cfg.SEED: -1 by default), drawn (the same in every process) when that is None.
    The seed is saved, restored, and written to the sampler's `_seed`, so its order is drawn from it too."""

    def __init__(self, dataset, mapper, sampler, total_batch_size: int, *, aspect_ratio_grouping: bool = True,
                 num_workers: int = 0, seed: Optional[int] = None):
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise ValueError(f"Total batch size ({total_batch_size}) must be divisible by the number of "
                             f"processes ({world_size})")
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        if isinstance(dataset, torchdata.IterableDataset):
            raise TypeError("ResumableTrainLoader needs a map-style dataset (an iterable dataset has no "
                            "positions to resume at)")
        self.dataset, self.mapper, self.sampler = dataset, mapper, sampler
        self.batch_size = total_batch_size // world_size
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.num_workers = num_workers
        if seed is None:
            seed = getattr(sampler, "_seed", None)
        self.seed = int(seed if seed is not None else comm.shared_random_seed())
        if hasattr(sampler, "_seed"):
            sampler._seed = self.seed
        self.rank = comm.get_rank()
        self._next = 0  # first stream position not yet read into a batch or a bucket
        self._pending: List[int] = []  # positions read into an aspect-ratio bucket, not yet in a batch

    def state_dict(self) -> Dict:
        """Where the batches handed out so far leave the stream: plain ints (weights-only loadable)."""
        return {"next": self._next, "pending": list(self._pending), "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict) -> None:
        """The next `iter()` continues after the batches counted in `state`."""
        self._next = int(state["next"])
        self._pending = sorted(int(p) for p in state.get("pending", []))
        self.seed = int(state["seed"])
        if hasattr(self.sampler, "_seed"):
            self.sampler._seed = self.seed
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            logger.warning(f"Resuming the data stream with {self.batch_size} images per batch per process "
                           f"(the checkpoint's run used {state['batch_size']}): the sample order continues, "
                           "the batches differ from those of an uninterrupted run")

    def _bucket(self, data) -> int:
        if not self.aspect_ratio_grouping:
            return 0
        return 0 if data["width"] > data["height"] else 1

    def __iter__(self):
        loader = torchdata.DataLoader(
            _StreamSamples(self.dataset, self.mapper, self.seed, self.rank),
            sampler=_Positions(self.sampler, self._next, self._pending), batch_size=None,
            num_workers=self.num_workers, collate_fn=_as_is, worker_init_fn=worker_init_reset_seed,
            # its own generator: starting the loader leaves torch's global RNG alone
            generator=torch.Generator().manual_seed(torch_seed(mix_seed(self.seed, self.rank, 0, LOADER))))
        buckets = [[], []]
        for position, data in loader:
            bucket = buckets[self._bucket(data)]
            bucket.append((position, data))
            if len(bucket) == self.batch_size:
                batch = [d for _, d in bucket]
                del bucket[:]
                self._next = max(self._next, position + 1)
                self._pending = sorted(p for b in buckets for p, _ in b)
                yield batch


def build_resumable_train_loader(cfg, mapper=None) -> ResumableTrainLoader:
    """`build_detection_train_loader(cfg, mapper)` (same dataset, sampler, batch size, grouping, workers)
    as a ResumableTrainLoader."""
    from detectron2.data.build import _train_loader_from_config

    args = _train_loader_from_config(cfg, mapper)
    return ResumableTrainLoader(args["dataset"], args["mapper"], args["sampler"], args["total_batch_size"],
                                aspect_ratio_grouping=args["aspect_ratio_grouping"],
                                num_workers=args["num_workers"])


class ExactResumeMixin:
    """For a DefaultTrainer subclass (`class Trainer(ExactResumeMixin, DefaultTrainer)`) whose
    build_train_loader returns a ResumableTrainLoader: each step runs with the global RNGs seeded from
    (seed, rank, iteration), and the trainer's checkpoint state carries the seed and the data loaders'
    positions (every process's, gathered at checkpoint iterations)."""

    exact_resume = True

    def _exact_seed(self) -> int:
        if getattr(self, "_exact_seed_value", None) is None:
            seed = int(self.cfg.SEED)
            # a SEED < 0 run draws one (the same in every process); it is saved with the checkpoints
            self._exact_seed_value = seed if seed >= 0 else int(comm.shared_random_seed())
        return self._exact_seed_value

    def _resumable_loaders(self) -> Dict[str, ResumableTrainLoader]:
        from detectron2.engine import hooks

        found = {"train": getattr(self._trainer, "data_loader", None)}
        for h in self._hooks:
            if isinstance(h, hooks.PreciseBN) and not getattr(h, "_disabled", True):
                found["precise_bn"] = h._data_loader
        return {k: v for k, v in found.items() if isinstance(v, ResumableTrainLoader)}

    def _checkpoint_due(self) -> bool:
        period = int(self.cfg.SOLVER.CHECKPOINT_PERIOD)
        return (period > 0 and (self.iter + 1) % period == 0) or self.iter >= self.max_iter - 1

    def before_train(self):
        if self.exact_resume:
            self._exact_seed()  # a collective when SEED < 0: every process, now
        super().before_train()

    def run_step(self):
        if self.exact_resume:
            seed_step(self._exact_seed(), comm.get_rank(), self.iter)
        super().run_step()

    def after_step(self):
        # Only the main process writes checkpoints: the other processes' loader positions (which differ
        # with aspect-ratio grouping) are gathered to it before the checkpointer hook runs.
        if self.exact_resume and comm.get_world_size() > 1 and self._checkpoint_due():
            states = {k: v.state_dict() for k, v in self._resumable_loaders().items()}
            self._gathered_data = (self.iter, comm.all_gather(states))
        super().after_step()

    def state_dict(self):
        ret = super().state_dict()
        if self.exact_resume:
            loaders = self._resumable_loaders()
            gathered = getattr(self, "_gathered_data", None)
            if comm.get_world_size() > 1 and gathered is not None and gathered[0] == self.iter:
                per_rank = gathered[1]
            else:
                per_rank = [{k: v.state_dict() for k, v in loaders.items()}]
            ret["exact_resume"] = {"seed": self._exact_seed(), "world_size": comm.get_world_size(),
                                   "data": per_rank}
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict.get("exact_resume")
        if not self.exact_resume:
            return
        if saved is None:
            logger.warning("The checkpoint has no data stream position / seed (written without exact resume): "
                           "the data stream starts again from the beginning")
            return
        self._exact_seed_value = int(saved["seed"])
        per_rank, rank, world_size = saved["data"], comm.get_rank(), comm.get_world_size()
        if len(per_rank) != world_size:
            logger.warning(f"The checkpoint holds the data stream position of {len(per_rank)} process(es), "
                           f"this run has {world_size}: each process continues at the position of process 0")
            mine = {k: dict(v, pending=[]) for k, v in per_rank[0].items()}
        else:
            mine = per_rank[rank]
        for name, loader in self._resumable_loaders().items():
            if name in mine:
                loader.load_state_dict(mine[name])
