"""resnest-backbone: ResNeSt (split-attention networks) for detectron2 and mmdetection/mmsegmentation.

    import resnest_backbone            # registers the detectron2 / OpenMMLab backbones if those import
    trunk = resnest_backbone.build_resnest("resnest50")
"""
from .core import (ALIASES, VARIANTS, DropBlockScheduler, ResNeSt, SplitAttentionConv2d, build_resnest,
                   get_variant)

__version__ = "0.1.0"
__all__ = ["ALIASES", "VARIANTS", "DropBlockScheduler", "ResNeSt", "SplitAttentionConv2d", "build_resnest",
           "get_variant"]


def _register_adapters() -> None:
    # Each framework is optional: register into it only when it is installed.
    import importlib.util

    import warnings

    if importlib.util.find_spec("detectron2") is not None:
        with warnings.catch_warnings():  # detectron2 0.6 + torch 2.x: torch.jit.script deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            from . import d2  # noqa: F401  (registers BACKBONE_REGISTRY entries)
    if importlib.util.find_spec("mmdet") is not None or importlib.util.find_spec("mmseg") is not None:
        try:
            from . import mm  # noqa: F401  (registers into mmdet/mmseg MODELS)
        except ImportError as exc:  # e.g. mmcv without compiled ops: detectron2 half still works
            import logging

            logging.getLogger(__name__).warning("resnest_backbone: OpenMMLab adapter not registered: %s", exc)


_register_adapters()
