"""resnest-backbone: ResNeSt (split-attention networks) for detectron2, mmdetection/mmsegmentation and torchvision.

The package itself is the framework-free core (pure PyTorch; importing it registers nothing anywhere):

    import resnest_backbone
    trunk = resnest_backbone.build_resnest("resnest50")

Each framework adapter registers itself when it is imported, and only then:

    import resnest_backbone.d2   # detectron2: the backbones (BACKBONE_REGISTRY) and the demo datasets
    import resnest_backbone.mm   # mmdet / mmseg: ResNeStSA in MODELS, the hooks
                                 # (configs: custom_imports = dict(imports=['resnest_backbone.mm']))
    import resnest_backbone.tv   # torchvision: builders as torchvision's (registers nothing)

Subpackages: core/ (the network), convert/ (weight files), data/ (demo data and dataset layout,
framework-free), d2/, mm/ and tv/ (the adapters); model_zoo.py finds the project's configs by name.
"""
from .core import (ALIASES, VARIANTS, DropBlockScheduler, ResNeSt, SplitAttentionConv2d, build_resnest,
                   get_variant)
from .model_zoo import get_config_file, list_configs

__version__ = "0.1.0"
__all__ = ["ALIASES", "VARIANTS", "DropBlockScheduler", "ResNeSt", "SplitAttentionConv2d", "build_resnest",
           "get_config_file", "get_variant", "list_configs"]
