"""The radix reductions of split attention (the sum of the splits for the global context, and their weighted
sum), each in one function with its execution-mode forms, so that the block's forward stays one step a line.

A radix-major (B, radix*C, H, W) tensor is viewed as its splits without a copy. Training form (split_pool,
split_sum): bit-identical to the official code's `sum(torch.split(x, C, 1))` and `sum([att * split ...])`
(each product rounded on its own, splits added in radix order, then adaptive_avg_pool2d) on the same input,
NCHW or channels_last; channels_last in gives channels_last out (tests/test_split_attention.py). Fused inference form (fused_split_sum, softmax_split_sum): may round
differently, by about 1e-7 relative.
"""
from typing import Optional

import torch
from torch.nn import functional as F

__all__ = ["fused_split_sum", "softmax_split_sum", "split_pool", "split_sum"]


def split_sum(x: torch.Tensor, radix: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_r x[:, r*C:(r+1)*C] (* weights[:, r]) for split weights `weights` (B, radix, C, 1, 1), if given.
    channels_last: the reduction runs over the (B, H*W, radix, C) memory order (the (B, radix, C, H, W) view
    would be a strided reduction with an NCHW result, slower forward and backward). Under torch.compile the
    plain view (that permuted view stops inductor's stride ordering with dynamic shapes, torch 2.14)."""
    batch, channels, height, width = x.size(0), x.size(1) // radix, x.size(2), x.size(3)
    if _channels_last(x) and not torch.compiler.is_compiling():
        hwrc = x.permute(0, 2, 3, 1).reshape(batch, height * width, radix, channels)  # a view
        if weights is not None:
            hwrc = hwrc * weights.view(batch, 1, radix, channels)
        return hwrc.sum(2).view(batch, height, width, channels).permute(0, 3, 1, 2)
    splits = x.view(batch, radix, channels, height, width)
    out = splits.sum(1) if weights is None else (splits * weights).sum(1)
    return out.contiguous(memory_format=torch.channels_last) if _channels_last(x) else out


def split_pool(x: torch.Tensor, radix: int) -> torch.Tensor:
    """The global context (B, C, 1, 1): the spatial mean of the sum of the splits (of x itself for radix 1),
    in the official order. Under autograd with the lighter backward of _SplitPool."""
    if not torch.jit.is_scripting():
        if x.requires_grad and not torch.jit.is_tracing():
            return _SplitPool.apply(x, radix)
    return F.adaptive_avg_pool2d(split_sum(x, radix) if radix > 1 else x, 1)


class _SplitPool(torch.autograd.Function):
    """split_pool whose backward returns the gradient as what it is: the same value over every split and
    pixel, a broadcast (stride-0) view of a (B, radix*C, 1, 1) tensor. Autograd's own backward materialises it
    at full size twice (the pool's backward, then a copy to undo the radix view) before adding it to the
    weighted sum's gradient; a broadcast view is added in place instead. Same values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, radix: int) -> torch.Tensor:
        ctx.shape, ctx.radix = x.shape, radix
        return F.adaptive_avg_pool2d(split_sum(x, radix) if radix > 1 else x, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        batch, channels, height, width = ctx.shape
        grad = (grad / (height * width)).reshape(batch, 1, channels // ctx.radix)
        grad = grad.expand(batch, ctx.radix, channels // ctx.radix).reshape(batch, channels, 1, 1)
        return grad.expand(batch, channels, height, width), None  # linear in grad: double backward works


def fused_split_sum(x: torch.Tensor, weights: torch.Tensor, radix: int) -> torch.Tensor:
    """split_sum(x, radix, weights) for inference: radix 2 as one multiply and one fused multiply-add
    (addcmul_) into an output in x's layout (functional under autograd and tracing)."""
    if radix != 2:
        return split_sum(x, radix, weights)
    splits = x.view(x.size(0), 2, x.size(1) // 2, x.size(2), x.size(3))
    if torch.jit.is_tracing() or x.requires_grad:
        return torch.addcmul(splits[:, 0] * weights[:, 0], splits[:, 1], weights[:, 1])
    out = torch.mul(splits[:, 0], weights[:, 0], out=_split_output(x, 2))
    return out.addcmul_(splits[:, 1], weights[:, 1])


def softmax_split_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Radix 2 with rSoftMax's split weights (B, 2, C, 1, 1), which sum to 1 per channel: w0 * x0 + w1 * x1 =
    x0 + w1 * (x1 - x0), one torch.lerp into an output in x's layout: each split read once, the output
    written once (w0 is taken as 1 - w1). Autograd, tracing / export, scripting, torch.compile and mixed
    dtypes take fused_split_sum (valid for any weights)."""
    if (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or x.requires_grad
            or weights.requires_grad or weights.dtype != x.dtype):
        return fused_split_sum(x, weights, 2)
    splits = x.view(x.size(0), 2, x.size(1) // 2, x.size(2), x.size(3))
    return torch.lerp(splits[:, 0], splits[:, 1], weights[:, 1], out=_split_output(x, 2))


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _split_output(x: torch.Tensor, radix: int) -> torch.Tensor:
    """An empty (B, C, H, W) tensor for the sum of the splits of `x`, in x's layout. Explicit, because a
    product of the split views gets odd strides at batch 1 (the batch stride of a channels_last view is C),
    which pooling / conv layers then read as NCHW and copy."""
    return torch.empty([x.size(0), x.size(1) // radix, x.size(2), x.size(3)], dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
