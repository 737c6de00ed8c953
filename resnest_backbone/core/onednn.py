"""oneDNN dispatch of the fast path (core/fuse.py): on CPU in float32 without autograd (eager inference), a
fused block runs as three of PyTorch's own oneDNN fused-convolution calls (torch.ops.mkldnn._convolution_pointwise):
conv1 + ReLU, the split conv + ReLU, and conv3 + residual add + ReLU (the sum written in place); the stem's
conv + ReLU pairs likewise. Under CPU bf16 autocast the same calls run in bf16, on bf16 copies of those convs'
weights made at the first call and kept on the modules (outside the state dict; remade when a weight changes).
Tracing, scripting, ONNX export, torch.compile, other autocast dtypes and autograd see the plain ops
(onednn_dtype). Equal to the plain ops up to float rounding (tests/test_fuse.py: 1e-5 relative in fp32).
`onednn.use_onednn = False` turns it off.
"""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FusedConvReLU", "conv_add_relu", "conv_relu", "onednn_conv", "onednn_dtype"]


def _onednn_ops():
    """PyTorch's own oneDNN fused-convolution ops (torch.ops.mkldnn, CPU):
    conv + ReLU, and conv + add + ReLU written in place into the added tensor; None where this build of
    torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return (torch.ops.mkldnn._convolution_pointwise.default,
                torch.ops.mkldnn._convolution_pointwise.binary,
                torch.ops.mkldnn._convolution_pointwise_.binary)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _onednn_ops()
# The fast path's eager CPU calls use _ONEDNN where onednn_dtype allows and this is True (set it to False to
# compare, or to rule oneDNN's fused ops out when chasing a problem): the modules and weights stay the same.
use_onednn = True


def _bf16_supported() -> bool:
    try:
        return _ONEDNN is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_BF16 = _bf16_supported()


@torch.jit.unused
def onednn_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a fused block computes this call in with oneDNN's fused ops, or None where the plain ops
    run. float32 for a plain float32 CPU tensor; bfloat16 under CPU bf16 autocast (deploy(dtype=
    torch.bfloat16)), where the CPU has bf16 instructions. None with autograd (an input that needs a
    gradient), other autocast dtypes, and whenever something traces, compiles or exports the model: those
    see the plain ops, so traces, ONNX files and torch.compile work as before."""
    if not (use_onednn and _ONEDNN is not None and type(x) is torch.Tensor and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export()):
        return None
    if torch.is_autocast_enabled("cpu"):
        if (_ONEDNN_BF16 and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and x.dtype in (torch.float32, torch.bfloat16)):
            return torch.bfloat16
        return None
    return torch.float32 if x.dtype == torch.float32 else None


def onednn_conv(conv: nn.Module) -> bool:
    """Whether `conv` can be one of those ops: a plain zero-padded float32 nn.Conv2d (or FusedConvReLU)
    with numeric padding and no trainable weights."""
    return (isinstance(conv, nn.Conv2d) and type(conv) in (nn.Conv2d, FusedConvReLU)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.dtype == torch.float32 and not conv.weight.requires_grad
            and (conv.bias is None or not conv.bias.requires_grad))


def _weights(conv: nn.Conv2d, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The conv's weight and bias in `dtype`: themselves in float32; for bf16 a copy made once and kept on
    the module (not in its state dict), remade when the weights change (autocast would cast them again at
    every call: fused weights need no gradient, so autocast does not cache them)."""
    weight, bias = conv.weight, conv.bias
    if weight.dtype == dtype:
        return weight, bias
    key = (dtype, weight.data_ptr(), weight._version,
           None if bias is None else (bias.data_ptr(), bias._version))
    cached = conv.__dict__.get("_onednn_weights")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        conv.__dict__["_onednn_weights"] = cached
    return cached[1], cached[2]


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(conv(x)) in one oneDNN call (ReLU as the convolution's post-op), in x's dtype."""
    weight, bias = _weights(conv, x.dtype)
    return _ONEDNN[0](x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "relu", [], "")


def conv_add_relu(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor, inplace: bool) -> torch.Tensor:
    """relu(conv(x) + other) in one oneDNN call, in x's dtype; inplace=True writes it into `other`."""
    weight, bias = _weights(conv, x.dtype)
    if inplace:
        return _ONEDNN[2](other, x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add",
                          None, "relu", [], None)
    return _ONEDNN[1](x, other, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add", None,
                      "relu", [], None)


class FusedConvReLU(nn.Conv2d):
    """relu(conv(x)) for a (folded) conv followed by a ReLU, e.g. in the stem: one oneDNN call where
    onednn_dtype allows, else the two plain ops. An nn.Conv2d, so the state-dict keys stay those of the conv."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConvReLU":
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        out.weight = conv.weight
        out.bias = conv.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = onednn_dtype(x)
            if dtype is not None and onednn_conv(self):
                return conv_relu(self, x.to(dtype))
        return F.relu(self._conv_forward(x, self.weight, self.bias), inplace=True)
