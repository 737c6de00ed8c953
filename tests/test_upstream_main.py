"""detectron2 main's changes since the snapshot of CI's second line, reproduced and run against the plugin.

CI's second detectron2 line, sal-detectron2==0.7.2, packages upstream main as of a59f0563 (2024-04-17; its
sources differ from that commit only by the version string and two small patches). CI cannot fetch upstream, so each
later change of main that the plugin depends on is reproduced here, quoting upstream's lines and commit, and
checked on whichever detectron2 line runs the suite. Read up to 02b5c4e (2026-06-06); no test needed:
- e8806d60, bce6d726 (build_batch_data_loader's prefetch_factor / persistent_workers / pin_memory): the
  resumable loader builds its own DataLoader; the stock path passes no new argument.
- 5b72c27a (cfg.FLOAT32_PRECISION, read by default_setup; CUDA only): the plugin neither sets nor reads it.
- 70f45430 (SemSegEvaluator works with numpy 2): main needs no numpy<2 (the sal wheel pins it).
- 8eff0743 + 754469e1 (COCOEvaluator DictConfig tasks: added, then reverted), 4823082a + 536dc9d5
  (Cityscapes imports from a Meta-internal package: unused here), 400a49c1 (MapDataset's retry: the
  resumable loader has its own), 65184fc0 / 5c380fdf / 181aae36 / 92ae9f0b / 31bebdea / 8a9d885b /
  2a420edb / 8d85329a (compile / export hints, rotated ops, caffe2, register_coco_instances, read_image),
  fd277889, 8f22855e, 9604f599, 525208d9 (reference cycles, formatting).
"""
import io
import itertools
import os
import random

import numpy as np
import pytest
import torch

from resnest_backbone.seeding import LOADER, SAMPLE, STEP, mix_seed, seed_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- seeds of any int
# Seeds a sampler can carry on main: cfg.SEED's -1, any int a user sets, seeds torch treats as one (torch's
# manual_seed maps -1 to 2**64 - 1), and wider than 64 bits.
SEEDS = [-(2 ** 70), -(2 ** 64) - 1, -(2 ** 64), -(2 ** 63), -(2 ** 32) - 1, -(2 ** 32), -2, -1, 0, 1, 2,
         2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 2 ** 70]
TAILS = [(rank, position, domain) for rank in (0, 1) for position in (0, 1, 3, 2 ** 32 - 1)
         for domain in (STEP, SAMPLE, LOADER)]


def test_mix_seed_keeps_the_values_of_non_negative_seeds():
    """Checkpoints written before keep resuming identically: a seed >= 0 gives numpy's SeedSequence of the
    four values, as before."""
    for seed in (s for s in SEEDS if s >= 0):
        for tail in TAILS:
            expected = np.random.SeedSequence([seed, *tail]).generate_state(4)
            assert np.array_equal(mix_seed(seed, *tail), expected), (seed, tail)


def test_mix_seed_takes_any_int_and_distinct_inputs_give_distinct_seeds():
    words = {(seed, *tail): tuple(mix_seed(seed, *tail)) for seed in SEEDS for tail in TAILS}
    assert len(set(words.values())) == len(words)
    # the pairs a shortcut would merge: |seed|, seed mod 2**64 (torch's view), 32-bit words, trailing zeros
    for a, b in [(-1, 1), (-1, 2 ** 64 - 1), (-1, 0), (-(2 ** 32), 2 ** 32), (-(2 ** 64), 0)]:
        assert words[(a, 0, 3, STEP)] != words[(b, 0, 3, STEP)], (a, b)
    # the data loader's generator and step 3 no longer share their words (the old 3-value call
    # mix_seed(seed, rank, LOADER) padded to the words of mix_seed(seed, rank, 3, STEP))
    assert words[(0, 0, 0, LOADER)] != words[(0, 0, 3, STEP)]
    assert mix_seed(-1, 0, 0, SAMPLE).dtype == np.uint32 and mix_seed(-1, 0, 0, SAMPLE).shape == (4,)


def test_mix_seed_refuses_a_seed_that_is_not_an_int():
    with pytest.raises(TypeError):
        mix_seed(None, 0, 0, STEP)  # "no seed": draw one first (the resumable loader does)
    with pytest.raises(TypeError):
        mix_seed(1.5, 0, 0, STEP)
    for rank, position in [(-1, 0), (0, 2 ** 32)]:
        with pytest.raises(ValueError, match="rank, position and domain"):
            mix_seed(1, rank, position, STEP)


def _draws():
    return float(np.random.rand()), random.random(), float(torch.rand(()))


def test_seed_step_with_a_negative_or_wide_seed_is_a_function_of_position():
    for seed in (-1, 2 ** 70):
        seed_step(seed, 0, 7)
        first = _draws()
        seed_step(seed, 0, 8)
        other = _draws()
        seed_step(seed, 0, 7)
        assert _draws() == first != other
    seed_step(2 ** 64 - 1, 0, 7)  # torch's manual_seed treats it as -1; this is another seed
    wide = _draws()
    seed_step(-1, 0, 7)
    assert _draws() != wide


# ------------------------------------------------------------------- main's sampler construction (b1c43ff)
def mains_sampler(cfg, dataset):
    """The training sampler as detectron2 main builds it (None: a sampler whose construction did not change).

    detectron2/data/build.py, _train_loader_from_config, since facebookresearch/detectron2@b1c43ffb
    (2024-12-19, "ddp bug fix"; before it: TrainingSampler(len(dataset)), seed None = a shared random one):

                if sampler_name == "TrainingSampler":
                    sampler = TrainingSampler(len(dataset), seed=cfg.SEED)
                elif sampler_name == "RepeatFactorTrainingSampler":
                    repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                        dataset, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
                    )
                    sampler = RepeatFactorTrainingSampler(repeat_factors, seed=cfg.SEED)
    """
    from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset), seed=cfg.SEED)
    if name == "RepeatFactorTrainingSampler":
        # REPEAT_SQRT (afe9eb92, 2024-03) is in main and sal-detectron2, not in v0.6 (always the square root)
        sqrt = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD, **sqrt)
        return RepeatFactorTrainingSampler(repeat_factors, seed=cfg.SEED)
    return None


def use_mains_samplers(build_module):
    """Make `build_module._train_loader_from_config` (detectron2.data.build's) build its training sampler as
    detectron2 main does; the same function on main itself. Returns the original."""
    original = build_module._train_loader_from_config

    def _train_loader_from_config(cfg, mapper=None, *, dataset=None, sampler=None):
        args = original(cfg, mapper, dataset=dataset, sampler=sampler)
        mains = mains_sampler(cfg, args["dataset"]) if sampler is None else None
        if mains is not None:
            args["sampler"] = mains
        return args

    build_module._train_loader_from_config = _train_loader_from_config
    return original


def _dicts(n=12):
    """Dataset dicts with annotations (RepeatFactorTrainingSampler counts categories): every third image
    tall, category 2 rare (repeated)."""
    return [{"id": i, "width": 20 if i % 3 == 0 else 40, "height": 30,
             "annotations": [{"category_id": 2 if i == 5 else i % 2}]} for i in range(n)]


def _augment(d):
    """An 'augmentation' drawing from numpy's, python's and torch's global RNGs, like detectron2's transforms."""
    return {"id": d["id"], "width": d["width"], "height": d["height"], "aug": _draws()}


def _round_trip(state):
    """A loader state through a weights-only checkpoint, as the trainer saves it."""
    buffer = io.BytesIO()
    torch.save({"data": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["data"]


def _main_seed_all_rng(seed=None):
    """detectron2/utils/env.py seed_all_rng on main, since bce6d726 (2024-05-02, "Make lightning
    reproducible"), which DataLoader workers run through worker_init_reset_seed (the `seed is None` branch,
    unchanged, is not needed here):

        np.random.seed(seed)
        torch.manual_seed(seed)
        random.seed(seed)
        torch.cuda.manual_seed_all(str(seed))
        os.environ["PYTHONHASHSEED"] = str(seed)
    """
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.cuda.manual_seed_all(str(seed))
    os.environ["PYTHONHASHSEED"] = str(seed)


@pytest.mark.d2
@pytest.mark.parametrize("sampler_name", ["TrainingSampler", "RepeatFactorTrainingSampler"])
def test_mains_samplers_with_the_default_seed_feed_the_resumable_loader(sampler_name, monkeypatch):
    """detectron2's default SEED (-1) becomes the sampler's seed on main: the loader takes it, hands out the
    sampler's own index stream, resumes mid-stream exactly (aspect-ratio buckets included), and its batches
    do not depend on the workers, seeded by main's seed_all_rng."""
    import detectron2.data.build as d2_build
    from detectron2.config import get_cfg

    from resnest_backbone.d2.resume import ResumableTrainLoader

    cfg = get_cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = sampler_name
    cfg.DATALOADER.REPEAT_THRESHOLD = 0.5
    assert cfg.SEED == -1  # detectron2's default
    dicts = _dicts()

    def loader(workers=0, grouping=True):
        return ResumableTrainLoader(dicts, _augment, mains_sampler(cfg, dicts), 3, num_workers=workers,
                                    aspect_ratio_grouping=grouping)

    first = loader()
    assert first.seed == first.sampler._seed == -1
    full = list(itertools.islice(first, 10))
    # the sampler's order: without grouping, the stream is its index stream
    ids = [d["id"] for batch in itertools.islice(loader(grouping=False), 10) for d in batch]
    assert ids == list(itertools.islice(iter(mains_sampler(cfg, dicts)), 30))
    if sampler_name == "RepeatFactorTrainingSampler":
        assert ids.count(5) > ids.count(4)  # the rare category's image is repeated
    for stop in (1, 4):
        head_loader = loader()
        head = list(itertools.islice(head_loader, stop))
        resumed = loader()
        resumed.load_state_dict(_round_trip(head_loader.state_dict()))
        assert head + list(itertools.islice(resumed, 10 - stop)) == full, stop
    monkeypatch.setattr(d2_build, "seed_all_rng", _main_seed_all_rng)  # forked workers inherit it
    assert list(itertools.islice(loader(workers=2), 10)) == full


@pytest.mark.d2
def test_a_sampler_without_a_seed_resumes_exactly():
    """Main's TrainingSampler shuffles without seeding its generator when its `_seed` is None (bce6d726):
    the loader draws a seed, gives it to the sampler and saves it, so a resumed run continues the same order.

    detectron2/data/samplers/distributed_sampler.py, TrainingSampler._infinite_indices, since
    facebookresearch/detectron2@bce6d726 (2024-05-02, "Make lightning reproducible"):

            g = torch.Generator()
            if self._seed is not None:
                g.manual_seed(self._seed)
    """
    from detectron2.data.samplers import TrainingSampler

    from resnest_backbone.d2.resume import ResumableTrainLoader

    class MainsTrainingSampler(TrainingSampler):
        def _infinite_indices(self):
            g = torch.Generator()
            if self._seed is not None:
                g.manual_seed(self._seed)
            while True:
                if self._shuffle:
                    yield from torch.randperm(self._size, generator=g).tolist()
                else:
                    yield from torch.arange(self._size).tolist()

    dicts = _dicts()

    def loader():
        sampler = MainsTrainingSampler(len(dicts))
        sampler._seed = None
        return ResumableTrainLoader(dicts, _augment, sampler, 3)

    np.random.seed(0)  # comm.shared_random_seed() draws from it: the same seed for the next two loaders
    uninterrupted = loader()
    assert isinstance(uninterrupted.seed, int) and uninterrupted.sampler._seed == uninterrupted.seed
    full = list(itertools.islice(uninterrupted, 8))
    np.random.seed(0)
    first = loader()
    head = list(itertools.islice(first, 3))
    resumed = loader()  # draws a seed of its own; the checkpoint's replaces it
    resumed.load_state_dict(_round_trip(first.state_dict()))
    assert head + list(itertools.islice(resumed, 5)) == full


@pytest.mark.d2
@pytest.mark.parametrize("sampler_name", ["TrainingSampler", "RepeatFactorTrainingSampler"])
def test_build_resumable_train_loader_with_mains_construction(sampler_name, monkeypatch):
    """The plugin's own path (Trainer.build_train_loader -> build_resumable_train_loader) with main's
    _train_loader_from_config, detectron2's default SEED, the demo set and detectron2's DatasetMapper: batches
    come out (the first step on main crashed here), the same in two builds."""
    import detectron2.data.build as d2_build

    import resnest_backbone.d2  # noqa: F401  (registers the demo sets)
    from conftest import d2_cfg
    from resnest_backbone.d2.resume import build_resumable_train_loader

    monkeypatch.setattr(d2_build, "_train_loader_from_config", d2_build._train_loader_from_config)
    use_mains_samplers(d2_build)
    cfg = d2_cfg("configs/demo_faster_rcnn_resnest.yaml", **{
        "SEED": "-1", "DATALOADER.SAMPLER_TRAIN": sampler_name, "DATALOADER.NUM_WORKERS": "0",
        "SOLVER.IMS_PER_BATCH": "2", "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": "128"})
    loaders = [build_resumable_train_loader(cfg) for _ in range(2)]
    assert type(loaders[0].sampler).__name__ == sampler_name and loaders[0].seed == loaders[0].sampler._seed == -1
    batches = [next(iter(loader)) for loader in loaders]
    assert len(batches[0]) == 2 and [d["image_id"] for d in batches[0]] == [d["image_id"] for d in batches[1]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(*batches))
