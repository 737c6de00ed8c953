"""resnest_backbone.seeding: the global RNGs seeded from positions draw independent streams."""
import random

import numpy as np
import torch

from resnest_backbone.seeding import SAMPLE, mix_seed, seed_step, seeded


def _draws():
    return np.random.rand(4).tolist(), [random.random() for _ in range(4)], torch.rand(4).tolist()


def test_numpy_python_and_torch_draw_different_numbers_and_repeat_per_position():
    with seeded(mix_seed(7, 0, 3, SAMPLE)):
        first = _draws()
    with seeded(mix_seed(7, 0, 3, SAMPLE)):
        assert _draws() == first  # a function of the position
    numpy_draws, python_draws, torch_draws = first
    assert numpy_draws != python_draws and numpy_draws != torch_draws and python_draws != torch_draws
    seed_step(7, 0, 3)
    step = _draws()
    assert step[0] != step[1] and step != first
