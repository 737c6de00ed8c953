"""DropBlock (Ghiasi et al. 2018, arXiv:1810.12890), the regularizer ResNeSt trains with in stages 3-4.

As the paper (Algorithm 1) and its official TF code define it:

- seeds are sampled only where a whole block fits: on the (H - bs + 1) x (W - bs + 1) positions whose
  bs x bs block lies inside the feature map, each with probability

      gamma = drop_prob / bs^2 * (H * W) / ((H - bs + 1) * (W - bs + 1))          (paper, eq. 1)

  and every seed drops the whole bs x bs block around it (seed map padded to H x W at the block centres,
  then max-pooled), so no partial block is ever dropped at a border;
- independent masks for every sample and channel;
- the kept units are rescaled by numel(mask) / sum(mask) over the whole batch (as the official TF code:
  per batch, not per sample), so the mean activation is preserved;
- block_size must be odd (a block has a centre); a block larger than the map is clamped to it (for a square
  map the whole channel is then dropped with probability drop_prob); drop_prob 0 and eval mode are the
  identity.

gamma ignores overlapping blocks, so the dropped fraction is a little below drop_prob (the exact expectation
is `expected_drop_fraction`). The official ResNeSt torch code declares DropBlock2D but its constructor raises
NotImplementedError; this one works.

`drop_prob` is a plain attribute so a schedule can change it during training: DropBlockScheduler, driven by
resnest_backbone.d2.ResNeStDropBlockHook (detectron2) or resnest_backbone.mm.ResNeStDropBlockHook (mmengine).
The value given to the constructor is kept in `target_prob`, the value the schedule ramps to by default.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F


def _seed_grid(block_size: int, height: int, width: int) -> Tuple[int, int, int]:
    """(block, rows, cols): block_size clamped to the map, and the rows x cols seed positions whose whole
    block lies inside a `height` x `width` map."""
    block = min(block_size, height, width)
    return block, height - block + 1, width - block + 1


def dropblock_gamma(drop_prob: float, block_size: int, height: int, width: int) -> float:
    """Seed probability (paper, eq. 1) for a `height` x `width` map; block_size is clamped to the map."""
    block, rows, cols = _seed_grid(block_size, height, width)
    return min(1.0, drop_prob * height * width / (block * block * (rows * cols)))


def expected_drop_fraction(drop_prob: float, block_size: int, height: int, width: int) -> float:
    """Exact expected fraction of dropped units, overlaps included: unit (r, c) is dropped unless none of
    the n_r * n_c seed positions whose block covers it fired, so P = 1 - (1 - gamma) ** (n_r * n_c)."""
    block = _seed_grid(block_size, height, width)[0]
    gamma = dropblock_gamma(drop_prob, block_size, height, width)

    def covering(size: int) -> List[int]:  # per row (column): how many valid seed rows cover it
        return [min(r, size - block) - max(0, r - block + 1) + 1 for r in range(size)]

    rows, cols = covering(height), covering(width)
    kept = sum((1.0 - gamma) ** (nr * nc) for nr in rows for nc in cols)
    return 1.0 - kept / (height * width)


class DropBlock2D(nn.Module):
    def __init__(self, drop_prob: float, block_size: int = 3):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"dropblock drop_prob={drop_prob} must be in [0, 1)")
        if block_size < 1 or block_size % 2 == 0:
            raise ValueError(f"dropblock block_size={block_size} must be a positive odd number")
        self.drop_prob = float(drop_prob)
        self.target_prob = float(drop_prob)  # the configured (final) value; a schedule ramps drop_prob to it
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob <= 0.0:
            return x
        batch, channels, height, width = x.shape
        block, valid_h, valid_w = _seed_grid(self.block_size, height, width)
        gamma = dropblock_gamma(self.drop_prob, self.block_size, height, width)
        # Seeds only on the positions whose whole block lies inside the map.
        seeds = (torch.rand((batch, channels, valid_h, valid_w), dtype=torch.float32, device=x.device)
                 < gamma).to(torch.float32)
        if block > 1:
            # Seed (i, j) drops rows i..i+block-1 and columns j..j+block-1 (for odd block: the block centred at
            # (i + block//2, j + block//2)): zero-pad by block-1, max-pool block x block -> H x W.
            seeds = F.max_pool2d(F.pad(seeds, [block - 1, block - 1, block - 1, block - 1]), block, stride=1)
        keep = 1.0 - seeds
        # Rescale by numel / kept over the whole batch (official TF code) so the mean activation is unchanged.
        # In float32: a half-precision sum of a large mask overflows.
        scale = keep.numel() / keep.sum().clamp(min=1.0)
        return x * (keep * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


def dropblock_or_identity(drop_prob: float, block_size: int = 3) -> nn.Module:
    """The DropBlock of a ResNeSt layer (block 3, as the official code), or nn.Identity when drop_prob is 0."""
    return DropBlock2D(drop_prob, block_size) if drop_prob > 0 else nn.Identity()


def check_ramp(owner: str, drop_prob: Optional[float], ramp_iters: int) -> None:
    """The arguments of a DropBlock ramp hook (detectron2's and mmengine's): ValueError naming the bad one."""
    if ramp_iters < 0:
        raise ValueError(f"{owner} ramp_iters={ramp_iters} must be >= 0 (0: the whole training)")
    if drop_prob is not None and not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"{owner} drop_prob={drop_prob} must be in [0, 1)")


class DropBlockScheduler:
    """Linear ramp of every DropBlock2D in a model from `start` to `stop` over `steps` iterations.

    The paper found a fixed drop probability from the first iteration hurts; the official recipes ramp it
    linearly from 0 to the final value over training. The value for progress k (iterations started so far,
    the current one included) is

        start + (stop - start) * min(k / steps, 1)

    so iteration i (0-based) of a run trains with k = i + 1 and the ramp's last iteration (i = steps - 1)
    already uses `stop`. `stop=None` ramps each block to its own configured value (`target_prob`).

    Stateless use (resume-safe, what the detectron2 / mmengine hooks do): `set_progress(trainer.iter + 1)`
    before each iteration. Counter use: call `step()` before each iteration."""

    def __init__(self, model: nn.Module, stop: Optional[float], steps: int, start: float = 0.0):
        if steps < 1:
            raise ValueError(f"DropBlockScheduler steps={steps} must be >= 1")
        for name, value in (("start", start), ("stop", stop)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"DropBlockScheduler {name}={value} must be in [0, 1)")
        self.blocks = [m for m in model.modules() if isinstance(m, DropBlock2D)]
        self.start, self.stop, self.steps = float(start), stop, int(steps)
        self.iteration = 0
        self._apply()

    def value(self, progress: int, target: Optional[float] = None) -> float:
        """drop_prob after `progress` iterations have started, for a block whose final value is `target`
        (default: `stop`)."""
        stop = self.stop if self.stop is not None else target
        if stop is None:
            raise ValueError("DropBlockScheduler.value: stop=None needs the block's target")
        t = min(max(progress, 0) / self.steps, 1.0)
        return self.start + t * (float(stop) - self.start)

    def _apply(self) -> None:
        for block in self.blocks:
            block.drop_prob = self.value(self.iteration, block.target_prob)

    def set_progress(self, progress: int) -> None:
        self.iteration = int(progress)
        self._apply()

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    @property
    def current(self) -> List[float]:
        return [block.drop_prob for block in self.blocks]
