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

    - no process group (one process, the usual CPU / single-GPU debug run): plain BatchNorm, with one
      logged warning, instead of failing (older torch: "Default process group is not initialized");
    - a process group on CPU (gloo), where nn.SyncBatchNorm refuses non-GPU tensors: statistics are
      averaged over processes with a differentiable all_reduce (as detectron2's NaiveSyncBatchNorm);
    - CUDA tensors in a process group: torch's own kernel.
    Still an nn.SyncBatchNorm, so framework code that checks for SyncBN keeps working.
    """

    _warned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                       and torch.distributed.get_world_size() > 1)
        if not distributed:
            if not SyncBatchNorm._warned:
                logging.getLogger(__name__).warning(
                    "SyncBN requested but no multi-process group is running: using plain BatchNorm.")
                SyncBatchNorm._warned = True
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                0.1 if self.momentum is None else self.momentum, self.eps)
        if x.is_cuda:
            return super().forward(x)
        return self._all_reduce_forward(x)

    def _all_reduce_forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        mean_sq = (x * x).mean(dim=(0, 2, 3))
        stats = all_reduce(torch.cat([mean, mean_sq])) / torch.distributed.get_world_size()
        mean, mean_sq = stats.split(channels)
        var = mean_sq - mean * mean
        momentum = 0.1 if self.momentum is None else self.momentum
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach(), momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


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
