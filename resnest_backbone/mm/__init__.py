"""OpenMMLab adapter: one backbone class, `ResNeStSA`, registered in mmdet's and mmseg's MODELS (whichever
are installed). Configs reach it with

    custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type='ResNeStSA', variant='resnest50', ...))

The name differs from mmdet's / mmseg's built-in `ResNeSt` (a separate implementation with other key names),
which stays available unchanged.

`optim_wrapper = dict(type='AnyDeviceAmpOptimWrapper', dtype='bfloat16', ...)` trains in mixed precision on
the CPU too (amp.py; mmengine's AmpOptimWrapper needs an accelerator).

Importing this package also lets mmengine 0.10.7 read back its own training checkpoints under torch >= 2.6
(`load_from` / `resume`), still with weights_only=True: see compat.py.
"""
import importlib
import importlib.util

from ..core.precision import register_fp32_heads
from .amp import AnyDeviceAmpOptimWrapper  # noqa: E402  (registers it in mmengine's OPTIM_WRAPPERS)
from .backbone import ResNeStSA, mm_norm
from .compat import allow_mmengine_checkpoints
from .hooks import ResNeStDropBlockHook, ResNeStInputCheckHook, check_mm_input, register_hooks
from .resume import ExactResumeHook  # noqa: E402  (registers ExactResumeHook)

REGISTRY_NAME = "ResNeStSA"


def _register() -> list:
    registered, problems = [], []
    for package in ("mmdet", "mmseg"):
        if importlib.util.find_spec(package) is None:
            problems.append(f"{package} is not installed")
            continue
        try:
            registry = importlib.import_module(f"{package}.registry").MODELS
        except (ImportError, AssertionError) as exc:  # mmdet/mmseg assert their mmcv version range on import
            problems.append(f"{package} does not import ({type(exc).__name__}: {exc})")
            continue
        if registry.module_dict.get(REGISTRY_NAME) is not ResNeStSA:
            registry.register_module(name=REGISTRY_NAME, module=ResNeStSA, force=True)
        registered.append(package)
    if not registered:
        raise ImportError("resnest_backbone.mm: neither mmdet nor mmseg can be used (" + "; ".join(problems)
                          + "). Install mmcv 2.1.0 with ops, mmdet==3.3.0, mmsegmentation==1.2.2 (make env)")
    if problems:
        import logging

        logging.getLogger(__name__).info("ResNeStSA registered only in %s: %s", registered, "; ".join(problems))
    return registered


register_fp32_heads({"BBoxHead": ("fc_cls", "fc_reg"), "RPNHead": ("rpn_cls", "rpn_reg"),
                     "BaseRoIExtractor": ("",)})  # mmdet's, by name (optional); mmcv's CPU RoIAlign: no bf16
REGISTERED_IN = _register()
HOOKS_REGISTERED_IN = register_hooks()  # ResNeStDropBlockHook: mmengine's HOOKS, and mmdet's / mmseg's
allow_mmengine_checkpoints()

__all__ = ["AnyDeviceAmpOptimWrapper", "ExactResumeHook", "HOOKS_REGISTERED_IN", "REGISTERED_IN", "REGISTRY_NAME",
           "ResNeStDropBlockHook", "ResNeStInputCheckHook", "ResNeStSA", "allow_mmengine_checkpoints", "check_mm_input",
           "mm_norm", "register_hooks"]
