"""Alias of resnest_backbone.d2 (the detectron2 adapter): `import resnest_backbone.detectron2` registers the
ResNeSt backbones in detectron2's BACKBONE_REGISTRY."""
from .d2 import *  # noqa: F401,F403
from .d2 import __all__  # noqa: F401
