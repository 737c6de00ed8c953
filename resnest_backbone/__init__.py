"""resnest-backbone: ResNeSt (split-attention networks) for detectron2 and mmdetection/mmsegmentation.

The package itself is the framework-free core (pure PyTorch; importing it registers nothing anywhere):

    import resnest_backbone
    trunk = resnest_backbone.build_resnest("resnest50")

Each framework adapter registers itself when it is imported, and only then:

    import resnest_backbone.d2   # detectron2: the backbones (BACKBONE_REGISTRY) and the demo datasets
    import resnest_backbone.mm   # mmdet / mmseg: ResNeStSA in MODELS, the hooks, mmengine's checkpoint loader
                                 # (configs: custom_imports = dict(imports=['resnest_backbone.mm']))

Subpackages: core/ (the network), convert/ (weight files), data/ (demo data and dataset layout,
framework-free), d2/ and mm/ (the adapters).
"""
from .core import (ALIASES, VARIANTS, DropBlockScheduler, ResNeSt, SplitAttentionConv2d, build_resnest,
                   get_variant)

__version__ = "0.1.0"
__all__ = ["ALIASES", "VARIANTS", "DropBlockScheduler", "ResNeSt", "SplitAttentionConv2d", "build_resnest",
           "get_variant"]
