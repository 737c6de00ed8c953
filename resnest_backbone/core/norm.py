"""Normalization layers by name, so configs can say "BN" / "SyncBN" / "FrozenBN" / "GN" and code can pass a
callable. Pure PyTorch: the detectron2 and OpenMMLab adapters pass their own factories instead."""
import logging
from typing import Callable, Union

import torch
from torch import nn
from torch.nn import functional as F

NormSpec = Union[str, Callable[[int], nn.Module], None]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, not parameters).

    Same state_dict keys as nn.BatchNorm2d minus `num_batches_tracked`, so BN checkpoints load into it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BN checkpoints carry it; we have no use
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Return `module` with every BatchNorm2d/SyncBatchNorm replaced by a FrozenBatchNorm2d copy."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module


class SyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm that also works where torch's does not.

    - no multi-process group (one process, the usual CPU / single-GPU debug run): plain BatchNorm, with one
      logged warning, instead of failing (older torch: "Default process group is not initialized");
    - a process group on CPU (gloo), where nn.SyncBatchNorm refuses non-GPU tensors: the statistics of the
      global batch (all processes of `process_group`, default the world) by differentiable all-reduces, so
      outputs, gradients and running statistics are those of nn.BatchNorm2d on the concatenated batch, also
      for unequal per-process batches (an empty one included);
    - CUDA tensors in a process group: torch's own kernel.
    Eval mode, momentum (None = cumulative average), affine and track_running_stats behave as in torch.
    Still an nn.SyncBatchNorm, so framework code that checks for SyncBN keeps working.
    """

    _warned = False

    class _AllReduceSum(torch.autograd.Function):
        """Sum over the processes of a group, differentiable: the backward sums the gradients over them too
        (as torch.distributed.nn.functional.all_reduce, which newer torch deprecates with a warning)."""

        @staticmethod
        def forward(ctx, tensor, group):
            ctx.group = group
            tensor = tensor.clone(memory_format=torch.contiguous_format)
            torch.distributed.all_reduce(tensor, group=group)
            return tensor

        @staticmethod
        def backward(ctx, grad):
            return SyncBatchNorm._AllReduceSum.apply(grad, ctx.group), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics (or, without them, this process's batch), as torch
            return super().forward(x)
        self._check_input_dim(x)
        group = self.process_group or torch.distributed.group.WORLD
        world_size = (torch.distributed.get_world_size(group)
                      if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
        if world_size > 1 and x.is_cuda:
            return super().forward(x)
        # The update factor of the running statistics, as _BatchNorm.forward computes it.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if world_size <= 1:
            if not SyncBatchNorm._warned:
                logging.getLogger(__name__).warning(
                    "SyncBN requested but no multi-process group is running: using plain BatchNorm.")
                SyncBatchNorm._warned = True
            track = self.track_running_stats
            return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                                self.weight, self.bias, True, factor, self.eps)
        return self._all_reduce_forward(x, group, factor)

    def _all_reduce_forward(self, x: torch.Tensor, group, factor: float) -> torch.Tensor:
        all_reduce = SyncBatchNorm._AllReduceSum.apply
        # Statistics of the global batch. Precision: sums are accumulated and all-reduced in float64, and the
        # variance is the all-reduced sum of squared deviations from the global mean (a second all_reduce),
        # not E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. Each process contributes
        # its sums and element count, so unequal (or empty) per-process batches are weighted correctly.
        # all_reduce is differentiable (its backward sums the gradients over processes), so input, weight
        # and bias gradients are those of BatchNorm on the global batch under DDP's summed loss.
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        acc = torch.float64
        local_count = x.new_full((1,), x.numel() // max(channels, 1), dtype=acc)
        stats = all_reduce(torch.cat([x.sum(dim=dims, dtype=acc), local_count]), group)
        total, n = stats[:channels], int(stats[channels].item())
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel in training, got {n} over "
                             f"all processes of the group (input of this process: {tuple(x.shape)})")
        mean = total / n
        centered = x - mean.to(x.dtype).view(shape)
        sq_dev = all_reduce((centered * centered).sum(dim=dims, dtype=acc), group)
        var = sq_dev / n  # biased: normalizes, as torch does
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():  # torch stores the unbiased variance
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_((var.detach() * (n / (n - 1))).to(self.running_var.dtype),
                                                       alpha=factor)
        scale = (var + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight
        y = centered * scale.to(x.dtype).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(shape)
        return y


NORM_LAYERS = {
    "BN": nn.BatchNorm2d,
    "SyncBN": SyncBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": lambda channels: nn.GroupNorm(32, channels),
}


def make_norm(norm: NormSpec) -> Union[Callable[[int], nn.Module], None]:
    """Turn a norm name (or callable, or None / "" for no norm) into a `channels -> module` factory."""
    if norm is None or norm == "":
        return None
    if callable(norm):
        return norm
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm={norm!r} is not supported; use one of {sorted(NORM_LAYERS)} or a callable")
    return NORM_LAYERS[norm]
