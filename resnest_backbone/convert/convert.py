"""Convert a ResNeSt classification checkpoint (official, timm, mmdet, detectron2-ResNeSt fork, ours) into
detectron2 `.pkl`, mmdet `.pth` or official-named `.pth`/`.safetensors`, checking the architecture first.

The variant is read from the weights: blocks per stage (layer indices), stem width (conv1.0), and radix /
cardinality / width from the split-attention shapes:
    conv2.conv.weight: (W * radix, W / (cardinality * radix), 3, 3)     W = group width of layer1
    conv2.fc1.weight:  (inter, W / cardinality, 1, 1)
avd_first (the `fast` ablations) moves a parameter-free pool, so it cannot be read from weights: for
those checkpoints pass --variant.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..core.variants import VARIANTS, build_resnest, get_variant
from .io import CheckpointError, load_state_dict, save_d2_pkl, save_torch
from .naming import MMDET, NAMINGS, OFFICIAL, detect_naming

FORMATS = {"d2": (".pkl",), "mmdet": (".pth", ".safetensors"), "official": (".pth", ".safetensors")}
CLASSIFIER_PREFIX = "fc."


@dataclass
class Report:
    source: str
    naming: str = ""
    prefix: str = ""
    variant: str = ""
    variant_candidates: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)  # keys not carried to the output
    tensors: int = 0
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"source: {self.source}", f"naming: {self.naming}" + (f" under prefix {self.prefix!r}" if
                                                                     self.prefix else ""),
               f"variant: {self.variant}" + (f" (same weights layout: {', '.join(self.variant_candidates)})"
                                             if len(self.variant_candidates) > 1 else ""),
               f"tensors written: {self.tensors}"]
        if self.dropped:
            shown = ", ".join(self.dropped[:6]) + (" ..." if len(self.dropped) > 6 else "")
            out.append(f"dropped {len(self.dropped)} keys: {shown}")
        return out + [f"note: {n}" for n in self.notes]


def to_official(weights: Dict[str, torch.Tensor], report: Report) -> Dict[str, torch.Tensor]:
    """Strip a wrapper prefix, keep only the backbone's tensors, and rename them to official names."""
    naming, prefix = detect_naming(weights.keys())
    report.naming, report.prefix = naming.name, prefix
    official = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            report.dropped.append(key)
            continue
        official[naming.to_official(key[len(prefix):])] = value
    return official


def read_arch(weights: Dict[str, torch.Tensor]) -> dict:
    """The weight-visible architecture of official-named ResNeSt weights (CheckpointError if unreadable)."""
    def shape(key, dims):
        if key not in weights:
            raise CheckpointError(f"expected tensor {key!r} is missing")
        value = tuple(weights[key].shape)
        if len(value) != dims or 0 in value:
            raise CheckpointError(f"{key} has shape {list(value)}, expected a {dims}-d conv weight")
        return value

    layers = []
    for stage in range(1, 5):
        blocks = set()
        for k in weights:
            if k.startswith(f"layer{stage}."):
                index = k.split(".")[1]
                if not index.isdigit():
                    raise CheckpointError(f"{k}: block index {index!r} is not a number")
                blocks.add(int(index))
        if not blocks or blocks != set(range(len(blocks))):
            raise CheckpointError(f"layer{stage}: blocks {sorted(blocks)} are not 0..n-1")
        layers.append(len(blocks))
    arch = dict(layers=tuple(layers), stem_width=shape("conv1.0.weight", 4)[0], deep_stem=True,
                avg_down="layer1.0.downsample.2.weight" in weights)
    if "layer1.0.conv2.conv.weight" in weights:
        conv, fc1 = shape("layer1.0.conv2.conv.weight", 4), shape("layer1.0.conv2.fc1.weight", 4)
        per_card = fc1[1]  # W / cardinality
        radix = per_card // conv[1]
        if radix < 1 or per_card % conv[1] or conv[0] % (per_card * radix):
            raise CheckpointError(f"layer1.0.conv2 shapes conv {list(conv)} / fc1 {list(fc1)} are not a "
                                  "split-attention layout")
        cardinality = conv[0] // (per_card * radix)
    else:  # radix 0: plain grouped conv (a ResNet-D / ResNeXt-D with the ResNeSt stem)
        conv = shape("layer1.0.conv2.weight", 4)
        radix = 0
        per_card = conv[1]
        cardinality = conv[0] // per_card
    arch.update(radix=radix, cardinality=cardinality, bottleneck_width=per_card)
    return arch


def describe_foreign(weights: Dict[str, torch.Tensor]) -> str:
    """A guess at what a non-ResNeSt checkpoint is, for error messages."""
    keys = list(weights)

    def has(*parts):
        return any(all(p in k for p in parts) for k in keys)

    if has("patch_embed") or has("cls_token") or has("blocks.0.attn"):
        return "a Vision Transformer (patch_embed / attention blocks)"
    if any(k.endswith("conv1.weight") and weights[k].dim() == 4 and tuple(weights[k].shape[-2:]) == (7, 7)
           for k in keys) and has("layer1.0.conv1"):
        return "a ResNet/ResNeXt with a 7x7 stem (torchvision/timm naming), no split attention"
    if has("res2.0.conv1") and has("stem.conv1"):
        return "a detectron2 ResNet (res2..res5), no split attention"
    if has("res2_0_branch2a"):
        return "a Caffe2/Detectron ResNet (res2_0_branch2a...), no split attention"
    return "not a ResNeSt"


def variants_matching(arch: dict) -> List[str]:
    keys = ("layers", "stem_width", "radix", "cardinality", "bottleneck_width", "deep_stem", "avg_down")
    return [name for name, v in VARIANTS.items() if all(getattr(v, k) == arch[k] for k in keys)]


def _ignorable(key: str) -> bool:
    # BN step counters: FrozenBN / detectron2 files have none, BN trunks do; they are not weights.
    return key.endswith("num_batches_tracked")


def mismatches(weights: Dict[str, torch.Tensor], variant: str, limit: int = 8) -> List[str]:
    """Differences between the weights and a variant's trunk: wrong shapes, missing and unexpected keys,
    each with its shape; the classifier (fc.*) and BN step counters are not compared. With a limit, the
    first `limit` lines, wrong shapes first, then a line counting the rest."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_resnest(variant).state_dict().items()
                    if not _ignorable(k)}
    shapes, missing, unexpected = [], [], []
    for key, want in expected.items():
        if key not in weights:
            missing.append(f"missing {key} {list(want)}")
        elif tuple(weights[key].shape) != want:
            shapes.append(f"{key}: checkpoint {list(weights[key].shape)}, {variant} expects {list(want)}")
    for key in weights:
        if key not in expected and not key.startswith(CLASSIFIER_PREFIX) and not _ignorable(key):
            unexpected.append(f"unexpected {key} {list(weights[key].shape)}")
    problems = shapes + missing + unexpected
    if not limit or len(problems) <= limit:
        return problems
    return problems[:limit] + [f"... and {len(problems) - limit} more ({len(shapes)} wrong shapes, "
                               f"{len(missing)} missing, {len(unexpected)} unexpected)"]


def convert_checkpoint(src: str, dst: str, fmt: str = "d2", variant: Optional[str] = None,
                       force: bool = False, keep_classifier: bool = False) -> Report:
    """Read `src` safely, check it, write `dst` in `fmt`. Raises CheckpointError (nothing written)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not dst.endswith(FORMATS[fmt]):
        raise CheckpointError(f"{dst}: a {fmt} checkpoint must end with {' or '.join(FORMATS[fmt])}")
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"{dst} exists; pass --force to overwrite it")
    report = Report(source=src)
    weights = load_state_dict(src)
    try:
        official = to_official(weights, report)
    except ValueError:
        raise CheckpointError(f"{src} is not a ResNeSt checkpoint (detected: {describe_foreign(weights)}; "
                              "no ResNeSt deep stem conv1.0 / stem.0 / stem.conv1_1 under any prefix); nothing "
                              f"was written. First keys: {_first_keys(weights)}") from None
    try:
        arch = read_arch(official)
    except CheckpointError as exc:
        raise CheckpointError(f"{src} is not a usable ResNeSt checkpoint ({report.naming} naming"
                              f"{' under ' + repr(report.prefix) if report.prefix else ''}): {exc}. First "
                              f"keys: {_first_keys(official)}; nothing was written") from None
    report.variant_candidates = variants_matching(arch)
    detected = report.variant_candidates[0] if report.variant_candidates else "unknown"
    if variant is None:
        if not report.variant_candidates:
            plain = " (radix=0: no split attention, e.g. a ResNet-D)" if arch["radix"] == 0 else ""
            raise CheckpointError(f"{src}: the weights match no known ResNeSt variant (detected: "
                                  f"{_fmt_arch(arch)}){plain}; pass --variant to check against one")
        variant = detected
        if any(VARIANTS[c].avd_first != VARIANTS[variant].avd_first for c in report.variant_candidates):
            report.notes.append(f"avd_first is not visible in weights; assumed {variant}. For a `fast` "
                                "checkpoint pass --variant (e.g. resnest50_fast_2s1x64d)")
    get_variant(variant)  # unknown name -> ValueError with the list
    problems = mismatches(official, variant)
    if problems:
        raise CheckpointError(
            f"{src} does not match variant {variant} (detected: {detected}; read from the weights: "
            f"{_fmt_arch(arch)}); nothing was written. First mismatches:\n  " + "\n  ".join(problems))
    report.variant = variant
    out = {}
    for key, value in official.items():
        if key.startswith(CLASSIFIER_PREFIX) and not keep_classifier:
            report.dropped.append(key)
        else:
            out[key] = value
    if fmt == "d2":  # detectron2 convention (its FrozenBN has no counter; BN restarts it at 0)
        out = {k: v for k, v in out.items() if not k.endswith("num_batches_tracked")}
    if fmt == "mmdet":
        out = {MMDET.from_official(k): v for k, v in out.items()}
    report.tensors = len(out)
    meta = dict(resnest_variant=variant, source=src)
    if fmt == "d2":
        save_d2_pkl(out, dst, force=force, **meta)
    else:
        save_torch(out, dst, force=force, **meta)
    return report


def _first_keys(weights: Dict[str, torch.Tensor], n: int = 5) -> str:
    shown = [f"{k} {list(v.shape)}" for k, v in list(weights.items())[:n]]
    return ", ".join(shown) + (f" ... ({len(weights)} tensors)" if len(weights) > n else "")


def _fmt_arch(arch: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in arch.items())


__all__ = ["FORMATS", "NAMINGS", "OFFICIAL", "Report", "convert_checkpoint", "describe_foreign", "mismatches",
           "read_arch",
           "to_official", "variants_matching"]
