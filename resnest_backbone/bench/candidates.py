"""What tools/benchmark.py measures: the workloads, and the candidate models, each built on demand (the
official resnest==0.0.5, timm, torchvision and detectron2 are imported only by the builders that need them).

Backbone candidates all return the four stage outputs (res2..res5), no classifier: ours (training form, in
channels_last, and the inference fast path), the official code, timm, and a torchvision ResNet of the same
depth (eager, and with the same inference treatment: BN folded + channels_last); with compile, the fast path
and the folded ResNet under torch.compile. Detector candidates: Faster R-CNN ResNeSt-FPN and R-50-FPN from
the same config, eager and fused + channels_last.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..core import build_resnest, get_variant
from ..core.fuse import deploy, fuse_model

__all__ = ["Candidate", "FULL_EVAL", "FULL_TRAIN", "GRAD_CHECKPOINT_LOAD", "SMOKE_EVAL", "SMOKE_GRAD_CHECKPOINT_LOAD",
           "SMOKE_TRAIN", "Stages", "Workload",
           "backbone_candidates", "candidate_names", "detector_models", "detector_workload", "fold_bn_fx",
           "official_resnest", "resnet_depth_name", "timm_resnest", "torchvision_resnet"]


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


FULL_EVAL = (Workload(1, 224, 224), Workload(8, 224, 224), Workload(1, 800, 1216))
FULL_TRAIN = (Workload(1, 224, 224), Workload(8, 224, 224), Workload(1, 800, 1216), Workload(2, 800, 1216))
SMOKE_EVAL = (Workload(1, 64, 64), Workload(2, 64, 96))
SMOKE_TRAIN = (Workload(2, 64, 64),)
GRAD_CHECKPOINT_LOAD, SMOKE_GRAD_CHECKPOINT_LOAD = Workload(2, 320, 320), Workload(2, 64, 64)


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


@dataclass
class Candidate:
    name: str
    build: Callable[[], nn.Module]
    trains: bool = True  # has a training step (the fast path is inference only)
    channels_last: bool = False  # feed channels_last inputs
    arch: str = "resnest"  # which fvcore count applies ("resnest" / "resnet")
    module: Optional[nn.Module] = None
    error: Dict[str, str] = field(default_factory=dict)


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


def fold_bn_fx(model: nn.Module) -> nn.Module:
    """The same inference treatment for a plain ResNet: conv+BN folding (torch.fx) and channels_last."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval()).to(memory_format=torch.channels_last)


def resnet_depth_name(variant: str) -> str:
    return f"ResNet-{sum(get_variant(variant).layers) * 3 + 2}"


def candidate_names(variant: str) -> Dict[str, str]:
    """The backbone candidates' names by role (the report compares roles)."""
    rn = resnet_depth_name(variant)
    fast, rn_fast = f"{variant} ours, fast path", f"{rn} torchvision, BN folded + channels_last"
    return {"ours": f"{variant} ours", "ours_cl": f"{variant} ours, channels_last", "fast": fast,
            "official": f"{variant} official 0.0.5", "timm": f"{variant} timm", "resnet": f"{rn} torchvision",
            "resnet_fast": rn_fast, "fast_compiled": f"{fast} + torch.compile",
            "resnet_fast_compiled": f"{rn_fast} + torch.compile"}


def backbone_candidates(variant: str, compile_: bool) -> List[Candidate]:
    n = candidate_names(variant)
    cands = [
        Candidate(n["ours"], lambda: build_resnest(variant)),
        Candidate(n["ours_cl"], lambda: build_resnest(variant).to(memory_format=torch.channels_last),
                  channels_last=True),
        Candidate(n["fast"], lambda: deploy(build_resnest(variant).eval(), channels_last=True),
                  trains=False, channels_last=True),
        Candidate(n["official"], lambda: Stages(official_resnest(variant))),
        Candidate(n["timm"], lambda: Stages(timm_resnest(variant))),
        Candidate(n["resnet"], lambda: Stages(torchvision_resnet(variant)), arch="resnet"),
        Candidate(n["resnet_fast"], lambda: fold_bn_fx(Stages(torchvision_resnet(variant))), trains=False,
                  channels_last=True, arch="resnet"),
    ]
    if compile_:
        cands.append(Candidate(n["fast_compiled"],
                               lambda: deploy(build_resnest(variant).eval(), channels_last=True, compile=True),
                               trains=False, channels_last=True))
        cands.append(Candidate(n["resnet_fast_compiled"],
                               lambda: torch.compile(fold_bn_fx(Stages(torchvision_resnet(variant))),
                                                     options={"freezing": True}),
                               trains=False, channels_last=True, arch="resnet"))
    return cands


def detector_models(variant: str, fuse: bool, device: str = "cpu") -> Dict[str, nn.Module]:
    """Faster R-CNN (FPN, 4conv1fc head) with our `variant` trunk and with detectron2's ResNet-50 trunk, from
    the same config (faster_rcnn_resnest50_fpn.yaml); with `fuse` also each one fused + channels_last."""
    from ..d2.export import build_detectron2_model

    models = {}
    for arch in ("resnest", "resnet"):
        opts = ["MODEL.RESNEST.VARIANT", variant]
        if arch == "resnet":  # same config (FPN, 4conv1fc head, norms), detectron2's ResNet-50 trunk
            opts += ["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH", 50]
        torch.manual_seed(0)
        _, model = build_detectron2_model("faster_rcnn_resnest50_fpn.yaml", opts, device=device)
        name = (f"Faster R-CNN {variant}-FPN" if arch == "resnest" else "Faster R-CNN R-50-FPN")
        models[name] = model
        if fuse:  # the backbone fast path's treatment: norms folded (trunk, FPN, head) + channels_last
            models[name + ", fused + channels_last"] = fuse_model(model, channels_last=True)
    return models
