"""detectron2 adapter. Importing it registers the plugin in detectron2: the ResNeSt backbones in
BACKBONE_REGISTRY (build_resnest_backbone, build_resnest_fpn_backbone, build_resnest_retinanet_fpn_backbone,
build_resnest_deeplab_backbone) and the generated demo datasets in DatasetCatalog (resnest_demo_*, datasets.py).

    import resnest_backbone.d2
    resnest_backbone.d2.add_resnest_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnest_fpn_backbone"
"""
import warnings

with warnings.catch_warnings():  # detectron2 0.6 + torch 2.x: torch.jit.script deprecation noise at import
    warnings.simplefilter("ignore", FutureWarning)
    import detectron2.modeling  # noqa: F401

from ..core.precision import register_fp32_heads
from .backbone import (ResNeStBackbone, build_resnest_backbone, build_resnest_fpn_backbone,
                       build_resnest_retinanet_fpn_backbone, resnest_kwargs_from_cfg)
from .checkpoint import SafeDetectionCheckpointer
from .config import add_resnest_config
from .datasets import DatasetMissingError, check_datasets, register_demo_datasets, register_demo_subset
from .deeplab import add_resnest_deeplab_config, build_resnest_deeplab_backbone  # noqa: F401  (registers)
from .hooks import ResNeStDropBlockHook, ResNeStPreciseBN, build_dropblock_hook
from .model_zoo import get_config, get_config_file, list_configs

register_fp32_heads({"FastRCNNOutputLayers": ("",), "StandardRPNHead": ("objectness_logits", "anchor_deltas"),
                     "RetinaNetHead": ("cls_score", "bbox_pred"), "MaskRCNNConvUpsampleHead": ("predictor",)})
DEMO_DATASETS = register_demo_datasets()  # resnest_demo_*: generated under $DETECTRON2_DATASETS on first load

__all__ = ["DEMO_DATASETS", "DatasetMissingError", "ResNeStBackbone", "ResNeStDropBlockHook", "ResNeStPreciseBN",
           "SafeDetectionCheckpointer", "add_resnest_config", "build_dropblock_hook", "build_resnest_backbone",
           "build_resnest_fpn_backbone", "build_resnest_retinanet_fpn_backbone", "check_datasets", "get_config",
           "get_config_file", "list_configs", "register_demo_datasets", "register_demo_subset",
           "resnest_kwargs_from_cfg"]
