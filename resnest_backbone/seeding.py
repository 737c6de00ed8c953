"""Random number generators as a function of positions, for exact resume (any framework: numpy, torch).

    mix_seed(seed, rank, iteration, domain)  128 well-mixed bits (4 x uint32) from a few non-negative ints
    seed_step(seed, rank, iteration)         seed torch (CPU + CUDA), numpy and python's global RNGs for a step
    seeded(words)                            context: the global CPU RNGs seeded inside, as before afterwards

Seeding every training step (and every sample, or every fetched batch) from its position makes a run's
randomness independent of what ran before in the process, so a run resumed from a checkpoint draws the same
random numbers as an uninterrupted one. Used by resnest_backbone.d2.resume and resnest_backbone.mm.resume.
"""
import random
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["DATA", "LOADER", "SAMPLE", "STEP", "mix_seed", "seed_step", "seeded", "torch_seed"]

# Domains: the seeds of steps, samples and batch fetches never coincide.
STEP, SAMPLE, DATA, LOADER = 0, 1, 2, 3


def mix_seed(*values: int) -> np.ndarray:
    """128 well-mixed bits (4 x uint32) from a few non-negative ints, the same on every platform."""
    return np.random.SeedSequence([int(v) for v in values]).generate_state(4)


def torch_seed(words: np.ndarray) -> int:
    return int(words[0]) | (int(words[1]) << 32)


def _seed_globals(words: np.ndarray, all_devices: bool) -> None:
    np.random.seed(words)
    random.seed(int.from_bytes(words.tobytes(), "little"))
    if all_devices:
        torch.manual_seed(torch_seed(words))  # CPU and every CUDA device
    else:
        torch.default_generator.manual_seed(torch_seed(words))


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and python's global RNGs for one training step."""
    _seed_globals(mix_seed(seed, rank, iteration, STEP), all_devices=True)


@contextmanager
def seeded(words: np.ndarray):
    """numpy's, python's and torch's (CPU) global RNGs seeded with `words` inside; afterwards as they were."""
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    try:
        _seed_globals(words, all_devices=False)
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)
