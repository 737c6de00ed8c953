"""Random number generators as a function of positions, for exact resume (any framework: numpy, torch).

    mix_seed(seed, rank, position, domain)   128 well-mixed bits (4 x uint32): any int seed, three positions
    seed_step(seed, rank, iteration)         seed torch (CPU + CUDA), numpy and python's global RNGs for a step
    seeded(words)                            context: the global CPU RNGs seeded inside, as before afterwards

Seeding every training step (and every sample, or every fetched batch) from its position makes a run's
randomness independent of what ran before in the process, so a run resumed from a checkpoint draws the same
random numbers as an uninterrupted one. Used by resnest_backbone.d2.resume and resnest_backbone.mm.resume.
"""
import operator
import random
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["DATA", "LOADER", "SAMPLE", "STEP", "mix_seed", "seed_step", "seeded", "torch_seed"]

# Domains: the seeds of steps, samples and batch fetches never coincide.
STEP, SAMPLE, DATA, LOADER = 0, 1, 2, 3


def mix_seed(seed: int, rank: int, position: int, domain: int) -> np.ndarray:
    """128 well-mixed bits (4 x uint32), the same on every platform, from numpy's SeedSequence of a seed (any
    int: negative and wider than 64 bits too) and three ints in [0, 2**32). Distinct inputs give distinct
    entropy words, so seeds coincide only by a 128-bit hash collision. A seed >= 0 enters as itself (its
    32-bit words: the values of earlier releases); a negative one as the words of -1 - seed then a 0 word, a
    form no seed >= 0 has (numpy's words of an int end in a non-zero word, except 0's single word)."""
    seed = operator.index(seed)  # an int: None (a sampler's "no seed") or a float is a TypeError
    rest = [operator.index(v) for v in (rank, position, domain)]
    if not all(0 <= v < 2 ** 32 for v in rest):
        raise ValueError(f"mix_seed: rank, position and domain must be in [0, 2**32), got {rest}")
    if seed >= 0:
        return np.random.SeedSequence([seed, *rest]).generate_state(4)
    words, rest_of_seed = [], -1 - seed
    while True:
        words.append(rest_of_seed & 0xFFFFFFFF)
        rest_of_seed >>= 32
        if not rest_of_seed:
            break
    return np.random.SeedSequence([*words, 0, *rest]).generate_state(4)


def torch_seed(words: np.ndarray) -> int:
    return int(words[0]) | (int(words[1]) << 32)


def _seed_globals(words: np.ndarray, all_devices: bool) -> None:
    np.random.seed(words)
    # bytes, not the same int: random.seed(int) would fill the Mersenne Twister from the same words as numpy
    # and draw the same numbers (random.seed(bytes) hashes them with sha512 first)
    random.seed(words.tobytes())
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
