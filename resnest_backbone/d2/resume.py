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
    for a DefaultTrainer subclass (`class Trainer(ExactResumeMixin, DefaultTrainer)`): builds the training
    loader as a ResumableTrainLoader, seeds each step, and puts the optimizer, the data loaders' states and
    the base seed in the trainer's checkpoint state (plain ints and lists: the checkpoint stays loadable with
    torch.load(weights_only=True)). What a run cannot reproduce (a changed batch size or world size, a
    checkpoint without the stream state, CUDA's non-deterministic kernels) it says once, before training.
    `exact_resume = False` on the class gives detectron2's stock behaviour.
"""
import logging
import random
from typing import Dict, List, Optional

import torch
from torch.utils import data as torchdata

from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm
from detectron2.utils.serialize import PicklableWrapper

from ..seeding import LOADER, SAMPLE, mix_seed, seed_step, seeded, torch_seed
from .compat import TRAINER_SAVES_OPTIMIZER

__all__ = ["ExactResumeMixin", "ResumableTrainLoader", "build_resumable_train_loader", "exactness_notes"]

logger = logging.getLogger(__name__)


MAPPER_ATTEMPTS = 100  # samples tried for one stream position before a mapper that keeps returning None fails


class _StreamSamples(torchdata.Dataset):
    """Item (p, index) -> (p, mapper(dataset[index])), computed with the RNGs seeded from (seed, rank, p). A
    mapper returning None (a sample to skip) is retried on other indices drawn from the same seed, at most
    MAPPER_ATTEMPTS samples in all; then RuntimeError naming the first one (dataset index, file_name)."""

    def __init__(self, dataset, mapper, seed: int, rank: int):
        self.dataset, self.mapper, self.seed, self.rank = dataset, PicklableWrapper(mapper), seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        position, index = item
        words = mix_seed(self.seed, self.rank, position, SAMPLE)
        fallback = random.Random(int(words[2]))
        first = index
        with seeded(words):
            for attempt in range(1, MAPPER_ATTEMPTS + 1):
                data = self.mapper(self.dataset[index])
                if data is not None:
                    return position, data
                if attempt == 3:
                    logger.warning(f"The mapper returned None for dataset index {first} ({self._name(first)}, "
                                   f"stream position {position}) and 2 samples drawn in its place; trying others")
                index = fallback.randrange(len(self.dataset))
        raise RuntimeError(f"The mapper returned None for dataset index {first} ({self._name(first)}) and for "
                           f"each of the {MAPPER_ATTEMPTS - 1} samples drawn in its place (stream position "
                           f"{position}): a mapper returns None only to skip a sample; check the mapper and the "
                           "dataset")

    def _name(self, index) -> str:
        item = self.dataset[index]
        name = item.get("file_name") if isinstance(item, dict) else None
        return f"file_name {name}" if name else "no file_name"


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
        """The next `iter()` continues after the batches counted in `state`. With another batch size than
        state["batch_size"] the sample order continues, but the batches differ (ExactResumeMixin says so)."""
        self._next = int(state["next"])
        self._pending = sorted(int(p) for p in state.get("pending", []))
        self.seed = int(state["seed"])
        if hasattr(self.sampler, "_seed"):
            self.sampler._seed = self.seed

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


def exactness_notes(device: str, restored: List[str]) -> List[str]:
    """What a run on `device` will not reproduce of an uninterrupted run: `restored` (what loading the
    checkpoint found), and on CUDA the kernels whose results depend on timing (cuDNN's algorithm choice,
    roi_align's backward atomics; torchvision has no deterministic roi_align backward to switch to)."""
    notes = list(restored)
    if torch.device(device).type == "cuda":
        notes.append("on CUDA, cuDNN's algorithm choice and the atomic adds of roi_align's backward make each "
                     "run differ in the last bits: a resumed run continues the same data stream and seeds, but "
                     "its weights are not bit-identical to an uninterrupted run's (they are on the CPU)")
    return notes


class ExactResumeMixin:
    """For a DefaultTrainer subclass: `class Trainer(ExactResumeMixin, DefaultTrainer)`.

    - The training loader is a ResumableTrainLoader: DefaultTrainer's build_train_loader is replaced by
      build_resumable_train_loader(cfg); a trainer with its own build_train_loader builds it with
      build_resumable_train_loader (same arguments as build_detection_train_loader), or training refuses to
      start, naming this.
    - Each step runs with the global RNGs seeded from (seed, rank, iteration).
    - The trainer's checkpoint state carries the optimizer (detectron2 v0.6 leaves it out: compat), the seed and
      the data loaders' positions (every process's, gathered at checkpoint iterations).
    - What the run will not reproduce (exactness_notes) is logged once, as one warning, before training."""

    exact_resume = True

    @classmethod
    def build_train_loader(cls, cfg):
        mro = cls.__mro__
        owner = next(k for k in mro[mro.index(ExactResumeMixin) + 1:] if "build_train_loader" in vars(k))
        if cls.exact_resume and owner is DefaultTrainer:
            return build_resumable_train_loader(cfg)
        return super().build_train_loader(cfg)

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
            if "train" not in self._resumable_loaders():
                raise TypeError(f"{type(self).__name__}.build_train_loader returned a "
                                f"{type(self._trainer.data_loader).__name__}, which exact resume cannot restore: "
                                "build it with resnest_backbone.d2.build_resumable_train_loader(cfg, mapper=...) "
                                "(the arguments of build_detection_train_loader), or set exact_resume = False")
            self._exact_seed()  # a collective when SEED < 0: every process, now
            notes = exactness_notes(self.cfg.MODEL.DEVICE, getattr(self, "_not_restored", []))
            if notes:
                logger.warning("Exact resume: this run will not be bit-identical to an uninterrupted run:\n  - "
                               + "\n  - ".join(notes))
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
            if not TRAINER_SAVES_OPTIMIZER:
                ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self.exact_resume:
            return
        self._not_restored = []
        if "_trainer" not in state_dict:
            self._not_restored.append("the checkpoint has no optimizer state (written by detectron2 v0.6's "
                                      "DefaultTrainer): the optimizer's momentum starts again from zero")
        elif not TRAINER_SAVES_OPTIMIZER:
            self._trainer.load_state_dict(state_dict["_trainer"])
        saved = state_dict.get("exact_resume")
        if saved is None:
            self._not_restored.append("the checkpoint has no data stream position or seed (written without exact "
                                      "resume): the data stream starts again from its beginning")
            return
        self._exact_seed_value = int(saved["seed"])
        per_rank, rank, world_size = saved["data"], comm.get_rank(), comm.get_world_size()
        if len(per_rank) != world_size:
            self._not_restored.append(f"the checkpoint holds the data stream positions of {len(per_rank)} "
                                      f"process(es), this run has {world_size}: each process continues at the "
                                      "position of process 0")
            mine = {k: dict(v, pending=[]) for k, v in per_rank[0].items()}
        else:
            mine = per_rank[rank]
        for name, loader in self._resumable_loaders().items():
            if name in mine:
                saved_batch = int(mine[name].get("batch_size", loader.batch_size))
                if saved_batch != loader.batch_size:
                    self._not_restored.append(
                        f"the {name} data stream continues with {loader.batch_size} images per batch per process "
                        f"(the checkpoint's run used {saved_batch}): the sample order continues, the batches "
                        "differ")
                loader.load_state_dict(mine[name])
