"""detectron2 adapter. Importing it registers the plugin in detectron2's registries and changes nothing else
there: the ResNeSt backbones in BACKBONE_REGISTRY (build_resnest_backbone, build_resnest_fpn_backbone,
build_resnest_retinanet_fpn_backbone, build_resnest_deeplab_backbone), DeepLabV3AuxHead in
SEM_SEG_HEADS_REGISTRY, and the generated demo datasets in DatasetCatalog (resnest_demo_*, datasets.py).

    import resnest_backbone.d2
    resnest_backbone.d2.add_resnest_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnest_fpn_backbone"

The training parts, each one line in a detectron2 project (train.py says more):

    class Trainer(ExactResumeMixin, ResNeStHooksMixin, DeviceTrainerMixin, DefaultTrainer):
        build_evaluator = staticmethod(resnest_evaluator)
    launch(main, args.num_gpus, ..., device=cfg.MODEL.DEVICE)
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
from .hooks import ResNeStDropBlockHook, ResNeStHooksMixin, ResNeStPreciseBN, build_dropblock_hook
from .model_zoo import get_config, get_config_file, list_configs
from .resume import ExactResumeMixin, build_resumable_train_loader
from .train import DeviceTrainerMixin, Trainer, launch, resnest_evaluator

register_fp32_heads({"FastRCNNOutputLayers": ("",), "StandardRPNHead": ("objectness_logits", "anchor_deltas"),
                     "RetinaNetHead": ("cls_score", "bbox_pred"), "MaskRCNNConvUpsampleHead": ("predictor",)})
DEMO_DATASETS = register_demo_datasets()  # resnest_demo_*: generated under $DETECTRON2_DATASETS on first load

__all__ = ["DEMO_DATASETS", "DatasetMissingError", "DeviceTrainerMixin", "ExactResumeMixin", "ResNeStBackbone",
           "ResNeStDropBlockHook", "ResNeStHooksMixin", "ResNeStPreciseBN", "SafeDetectionCheckpointer", "Trainer",
           "add_resnest_config", "build_dropblock_hook", "build_resnest_backbone", "build_resnest_fpn_backbone",
           "build_resnest_retinanet_fpn_backbone", "build_resumable_train_loader", "check_datasets", "get_config",
           "get_config_file", "launch", "list_configs", "register_demo_datasets", "register_demo_subset",
           "resnest_evaluator", "resnest_kwargs_from_cfg"]
