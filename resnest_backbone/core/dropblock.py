"""DropBlock (Ghiasi et al. 2018), the regularizer ResNeSt trains with in stages 3-4.

The official ResNeSt torch code declares DropBlock2D but its constructor raises NotImplementedError; this
one works. `drop_prob` is a plain attribute so a schedule can change it during training
(see DropBlockScheduler)."""
import torch
from torch import nn
from torch.nn import functional as F


class DropBlock2D(nn.Module):
    def __init__(self, drop_prob: float, block_size: int = 3):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"dropblock drop_prob={drop_prob} must be in [0, 1)")
        if block_size < 1 or block_size % 2 == 0:
            raise ValueError(f"dropblock block_size={block_size} must be a positive odd number")
        self.drop_prob = float(drop_prob)
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        _, _, height, width = x.shape
        block = min(self.block_size, height, width)
        # gamma: seed probability so that about drop_prob of the units end up dropped (paper, eq. 1);
        # seeds only where a whole block fits.
        valid = (height - block + 1) * (width - block + 1)
        gamma = self.drop_prob * height * width / (block * block * valid)
        seeds = torch.rand_like(x) < gamma
        if block > 1:
            pad = block // 2
            seeds = F.max_pool2d(seeds.to(x.dtype), block, stride=1, padding=pad)
            seeds = seeds[..., :height, :width] > 0
        keep = (~seeds).to(x.dtype)
        # Rescale so the expected activation is unchanged (as dropout does).
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


class DropBlockScheduler:
    """Linearly ramps every DropBlock2D in a model from `start` to `stop` over `steps` calls of step().

    The paper found that a fixed drop probability from the first iteration hurts; ramping it up is the
    usual recipe. Call `step()` once per iteration (or wrap it in your framework's hook)."""

    def __init__(self, model: nn.Module, stop: float, steps: int, start: float = 0.0):
        if steps < 1:
            raise ValueError(f"DropBlockScheduler steps={steps} must be >= 1")
        self.blocks = [m for m in model.modules() if isinstance(m, DropBlock2D)]
        self.start, self.stop, self.steps = start, stop, steps
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        t = min(self.iteration / self.steps, 1.0)
        for block in self.blocks:
            block.drop_prob = self.start + t * (self.stop - self.start)

    def step(self) -> None:
        self.iteration += 1
        self._apply()
