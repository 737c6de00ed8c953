"""What tools/benchmark.py measures: the workloads, and the implementations, each built on demand (the
official resnest==0.0.5, timm, torchvision and detectron2 are imported only by the builders that need them).

Backbone implementations all return the four stage outputs (res2..res5), no classifier: ours, the official
code, timm, and a torchvision ResNet of the same depth. Each gets the same treatments (treatments.py); ours
also its own fast path. Detectors: Faster R-CNN ResNeSt-FPN and R-50-FPN from the same config.
"""
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
from torch import nn

from resnest_backbone.core import build_resnest, get_variant
from .treatments import Treatment, own_treatments

__all__ = ["FULL_EVAL", "FULL_TRAIN", "GRAD_CHECKPOINT_LOAD", "Implementation", "SMOKE_CONV_SHAPES", "SMOKE_EVAL",
           "SMOKE_GRAD_CHECKPOINT_LOAD", "SMOKE_TRAIN", "Stages", "Workload", "backbone_implementations",
           "detector_implementations", "detector_workload", "official_resnest", "parse_workloads", "resnet_depth_name",
           "timm_resnest", "torchvision_resnet"]


@dataclass(frozen=True)
class Workload:
    batch: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width} b{self.batch}"

    @property
    def large(self) -> bool:  # detection-size work: fewer timed rounds (repeats_large)
        return self.batch * self.height * self.width >= 800 * 1216

    def input(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(self.batch, 3, self.height, self.width, generator=torch.Generator().manual_seed(seed))


# The last workload of each list is the key one (the goals are judged there).
FULL_EVAL = (Workload(1, 224, 224), Workload(8, 224, 224), Workload(1, 800, 1216))
FULL_TRAIN = (Workload(2, 800, 1216),)
SMOKE_EVAL = (Workload(1, 64, 64), Workload(2, 64, 96))
SMOKE_TRAIN = (Workload(2, 64, 64),)
GRAD_CHECKPOINT_LOAD, SMOKE_GRAD_CHECKPOINT_LOAD = Workload(2, 320, 320), Workload(2, 64, 64)
SMOKE_CONV_SHAPES = {"conv 3x3 32->32 @32x32": (32, 32, 3, 32)}  # the full run: measure.CONV_SHAPES


def parse_workloads(text: str) -> Tuple[Workload, ...]:
    """"1x800x1216,8x224x224" -> workloads ("" -> none); ValueError naming the bad item."""
    loads = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            b, h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"workload {item!r}: give BxHxW, e.g. 1x800x1216") from None
        if min(b, h, w) < 1:
            raise ValueError(f"workload {item!r}: batch, height and width must be positive")
        loads.append(Workload(b, h, w))
    return tuple(loads)


def detector_workload(smoke: bool = False) -> Workload:
    return Workload(1, 64, 96) if smoke else Workload(1, 800, 1216)


class Stages(nn.Module):
    """Run an ImageNet ResNet-style model (official ResNeSt, timm, torchvision) up to its four stages and
    return their outputs, like our trunk (no pooling / classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = model.conv1, model.bn1
        self.relu = model.relu if hasattr(model, "relu") else model.act1  # timm calls it act1
        self.maxpool = model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c2, c3, c4, self.layer4(c4)]


@dataclass(frozen=True)
class Implementation:
    role: str  # "ours", "official", "timm", "resnet": what the report compares
    name: str
    build: Callable[[], nn.Module]
    arch: str = "resnest"  # which GMAC count applies ("resnest" / "resnet")
    own: Tuple[Treatment, ...] = ()  # treatments only this implementation has


def official_resnest(variant: str) -> nn.Module:
    from resnest.torch.resnet import Bottleneck, ResNet

    v = get_variant(variant)
    return ResNet(Bottleneck, list(v.layers), radix=v.radix, groups=v.cardinality,
                  bottleneck_width=v.bottleneck_width, deep_stem=v.deep_stem, stem_width=v.stem_width,
                  avg_down=v.avg_down, avd=v.avd, avd_first=v.avd_first)


def timm_resnest(variant: str) -> nn.Module:
    from timm.models.resnest import ResNestBottleneck
    from timm.models.resnet import ResNet

    v = get_variant(variant)
    return ResNet(block=ResNestBottleneck, layers=list(v.layers), stem_type="deep", stem_width=v.stem_width,
                  avg_down=v.avg_down, base_width=v.bottleneck_width, cardinality=v.cardinality,
                  block_args=dict(radix=v.radix, avd=v.avd, avd_first=v.avd_first))


def torchvision_resnet(variant: str) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, list(get_variant(variant).layers))


def resnet_depth_name(variant: str) -> str:
    return f"ResNet-{sum(get_variant(variant).layers) * 3 + 2}"


def backbone_implementations(variant: str, compile_: bool = False) -> List[Implementation]:
    """Ours, the official code, timm and torchvision's ResNet of the same depth (built with the current
    torch seed: seed before each build for the same weights)."""
    return [
        Implementation("ours", f"{variant} ours", lambda: build_resnest(variant), own=tuple(own_treatments(compile_))),
        Implementation("official", f"{variant} official 0.0.5", lambda: Stages(official_resnest(variant))),
        Implementation("timm", f"{variant} timm", lambda: Stages(timm_resnest(variant))),
        Implementation("resnet", f"{resnet_depth_name(variant)} torchvision",
                       lambda: Stages(torchvision_resnet(variant)), arch="resnet"),
    ]


def detector_implementations(variant: str, device: str = "cpu") -> List[Implementation]:
    """Faster R-CNN (FPN, 4conv1fc head) with our `variant` trunk ("ours") and with detectron2's ResNet-50
    trunk ("resnet"), from the same config (faster_rcnn_resnest50_fpn.yaml), each built with seed 0."""

    def build(arch: str) -> nn.Module:
        from resnest_backbone.d2.export import build_detectron2_model

        opts = ["MODEL.RESNEST.VARIANT", variant]
        if arch == "resnet":  # same config (FPN, 4conv1fc head, norms), detectron2's ResNet-50 trunk
            opts += ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH", 50]
        torch.manual_seed(0)
        return build_detectron2_model("faster_rcnn_resnest50_fpn.yaml", opts, device=device)[1]

    return [Implementation("ours", f"Faster R-CNN {variant}-FPN", lambda: build("resnest")),
            Implementation("resnet", "Faster R-CNN R-50-FPN", lambda: build("resnet"), arch="resnet")]
