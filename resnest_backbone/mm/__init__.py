"""OpenMMLab adapter: one backbone class, `ResNeStSA`, registered in mmdet's and mmseg's MODELS (whichever
are installed). Configs reach it with

    custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(_delete_=True, type='ResNeStSA', variant='resnest50', ...))

The name differs from mmdet's / mmseg's built-in `ResNeSt` (a separate implementation with other key names),
which stays available unchanged.

`optim_wrapper = dict(type='AnyDeviceAmpOptimWrapper', dtype='bfloat16', ...)` trains in mixed precision on
the CPU too (amp.py; mmengine's AmpOptimWrapper needs an accelerator).

What importing this package changes in mmengine / mmdet / mmseg (tests/test_mm_adapter.py checks that nothing
else changes): the registries (ResNeStSA in mmdet's / mmseg's MODELS; ResNeStDropBlockHook,
ResNeStInputCheckHook and ExactResumeHook in mmengine's HOOKS and AnyDeviceAmpOptimWrapper in its
OPTIM_WRAPPERS, where mmdet's and mmseg's registries find them), and, as a documented purpose of the import,
mmengine's loader for local checkpoint files: the project's safe reader (compat.allow_mmengine_checkpoints),
so that `load_from`, `resume` and every `Pretrained` init read files weights-only, and mmengine can read back
its own checkpoints under torch >= 2.6.
"""
import importlib
import importlib.util
import logging

from ..core.precision import register_fp32_heads
from .amp import AnyDeviceAmpOptimWrapper  # noqa: E402  (registers it in mmengine's OPTIM_WRAPPERS)
from .backbone import ResNeStSA, mm_norm
from .compat import allow_mmengine_checkpoints
from .hooks import HOOKS_REGISTERED_IN, ResNeStDropBlockHook, ResNeStInputCheckHook, check_mm_input
from .resume import ExactResumeHook  # noqa: E402  (registers ExactResumeHook)

REGISTRY_NAME = "ResNeStSA"


def _register() -> list:
    """Register ResNeStSA in the MODELS of mmdet and of mmseg, each where installed. One that is installed but
    does not import is an error naming its cause (a config that needs it would otherwise fail far from it,
    with "not in registry"); one that is not installed is skipped; neither installed is an error."""
    registered, absent = [], []
    for package in ("mmdet", "mmseg"):
        if importlib.util.find_spec(package) is None:
            absent.append(package)
            continue
        try:
            registry = importlib.import_module(f"{package}.registry").MODELS
        except Exception as exc:  # e.g. mmdet/mmseg assert their mmcv version range on import
            raise ImportError(
                f"resnest_backbone.mm: {package} is installed but does not import ({type(exc).__name__}: {exc}), so "
                f"ResNeStSA cannot be registered for it. Fix that install (mmcv 2.1.0 with ops, mmdet==3.3.0, "
                f"mmsegmentation==1.2.2: make env), or uninstall {package} if you do not use it") from exc
        registry.register_module(name=REGISTRY_NAME, module=ResNeStSA, force=True)
        registered.append(package)
    if not registered:
        raise ImportError("resnest_backbone.mm: neither mmdet nor mmseg is installed. Install mmcv 2.1.0 with ops, "
                          "mmdet==3.3.0, mmsegmentation==1.2.2 (make env)")
    if absent:
        logging.getLogger(__name__).info("ResNeStSA registered in %s (%s not installed)", registered, absent)
    return registered


register_fp32_heads({"BBoxHead": ("fc_cls", "fc_reg"), "RPNHead": ("rpn_cls", "rpn_reg"),
                     "BaseRoIExtractor": ("",)})  # mmdet's, by name (optional); mmcv's CPU RoIAlign: no bf16
REGISTERED_IN = _register()
allow_mmengine_checkpoints()

__all__ = ["AnyDeviceAmpOptimWrapper", "ExactResumeHook", "HOOKS_REGISTERED_IN", "REGISTERED_IN", "REGISTRY_NAME",
           "ResNeStDropBlockHook", "ResNeStInputCheckHook", "ResNeStSA", "allow_mmengine_checkpoints", "check_mm_input",
           "mm_norm"]
