"""Mixed-precision training with mmengine on any device: `AmpOptimWrapper` where mmengine runs it (CUDA, NPU,
MLU, MUSA), and bfloat16 autocast without loss scaling on the CPU, where mmengine's AmpOptimWrapper refuses
to start ("only available training on gpu, npu, mlu or musa").

    optim_wrapper = dict(type='AnyDeviceAmpOptimWrapper', dtype='bfloat16', optimizer=dict(type='SGD', ...))

Importing resnest_backbone.mm registers it in mmengine's OPTIM_WRAPPERS (mmdet's / mmseg's registries find
it there). The training step is mmengine's: `optim_context` runs the model's forward under mmengine's
autocast (torch.autocast), backward and the optimizer step run outside it on the float32 parameters.
"""
import contextlib
import logging

import torch
from mmengine.device import get_device
from mmengine.device import is_cuda_available, is_mlu_available, is_musa_available, is_npu_available
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ..core.precision import keep_fp32_heads

__all__ = ["AnyDeviceAmpOptimWrapper"]


@OPTIM_WRAPPERS.register_module(force=True)
class AnyDeviceAmpOptimWrapper(AmpOptimWrapper):
    """mmengine's AmpOptimWrapper (its autocast, and its loss scaling on the accelerators it supports), with
    the model's score / box predictors (core.precision.FP32_HEADS: mmdet's RPNHead rpn_cls / rpn_reg, BBoxHead
    fc_cls / fc_reg; the RoI extractor) run in float32 inside the autocast region: proposals and their NMS stay
    fp32 (mmcv's CPU nms and RoIAlign refuse bf16; bf16 coordinates are 2 px apart between 256 and 512, 4 px
    up to 1024). On the CPU: autocast in
    `dtype` (default and only choice there: bfloat16, mmengine's CPU autocast refuses float16), no loss
    scaling (bfloat16 has float32's exponent range; `loss_scale` is not used and says so in the log), and
    the loss scaler a disabled torch GradScaler (scale, unscale_, step and update pass through; its state
    is empty)."""

    def __init__(self, loss_scale="dynamic", dtype=None, use_fsdp: bool = False, **kwargs):
        if is_cuda_available() or is_npu_available() or is_mlu_available() or is_musa_available():
            super().__init__(loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp, **kwargs)
            return
        if isinstance(dtype, str):
            if dtype not in self.valid_dtypes:
                raise ValueError(f"AnyDeviceAmpOptimWrapper: dtype={dtype!r} is not one of {self.valid_dtypes}")
            dtype = getattr(torch, dtype)
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f"AnyDeviceAmpOptimWrapper: dtype={dtype} on the CPU; CPU autocast trains in "
                             "bfloat16 (dtype='bfloat16')")
        if loss_scale != "dynamic":
            logging.getLogger(__name__).info("AnyDeviceAmpOptimWrapper on the CPU: bfloat16 needs no loss "
                                             "scaling; loss_scale=%r is not used", loss_scale)
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.cast_dtype = torch.bfloat16

    @contextlib.contextmanager
    def optim_context(self, model):
        with super().optim_context(model), keep_fp32_heads(model, get_device()):
            yield
