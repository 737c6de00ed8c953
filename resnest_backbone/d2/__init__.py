"""detectron2 adapter. Importing it registers the ResNeSt backbones in detectron2's BACKBONE_REGISTRY.

    import resnest_backbone.d2
    resnest_backbone.d2.add_resnest_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnest_fpn_backbone"
"""
from .backbone import (ResNeStBackbone, build_resnest_backbone, build_resnest_fpn_backbone,
                       build_resnest_retinanet_fpn_backbone, resnest_kwargs_from_cfg)
from .checkpoint import SafeDetectionCheckpointer
from .config import add_resnest_config
from .deeplab import add_resnest_deeplab_config, build_resnest_deeplab_backbone  # noqa: F401  (registers)
from .hooks import ResNeStDropBlockHook, build_dropblock_hook
from .model_zoo import get_config, get_config_file, list_configs

__all__ = ["ResNeStBackbone", "ResNeStDropBlockHook", "SafeDetectionCheckpointer", "add_resnest_config",
           "build_dropblock_hook", "build_resnest_backbone", "get_config", "get_config_file", "list_configs", "build_resnest_fpn_backbone",
           "build_resnest_retinanet_fpn_backbone", "resnest_kwargs_from_cfg"]
