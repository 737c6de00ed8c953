"""What architecture a checkpoint is for: read from the weights' shapes, from the record our converter and
checkpointer write into every file, and from the official / timm file-name conventions.

Shapes show blocks per stage, stem width, radix, cardinality and width. They can never show `avd_first`
(the `fast` ablations move a parameter-free pool) or `avd`, so a file's record, or failing that its file
name, is the only evidence for those. Every loader checks the evidence against the model it loads into
(`check_arch`), so a checkpoint never lands silently in a model of another architecture.

The record (a plain dict, stored as the d2 `.pkl`'s top-level "resnest", mmengine's `meta["resnest"]`,
the safetensors metadata "resnest" as JSON, and the top-level "resnest" of detectron2 training
checkpoints):
    {"variant": "resnest50_fast_2s1x64d", "arch": {layers, stem_width, radix, cardinality,
     bottleneck_width, deep_stem, avg_down, avd, avd_first}, "decided_by": "--variant" | "variant name" |
     "file name" | "weights" | "record" | "model", "source": file name, "source_naming": "official" | ...,
     "writer": ...}
"""
import json
import os
import re
from typing import Any, Dict, List, Optional

import torch

from ..core.trunk import WEIGHT_ARCH_KEYS as ARCH_KEYS  # the knobs a trunk's weights are for
from ..core.trunk import arch_differences
from ..core.variants import ALIASES, VARIANTS, get_variant
from .io import CheckpointError

SHAPE_KEYS = ("layers", "stem_width", "radix", "cardinality", "bottleneck_width", "deep_stem", "avg_down")
INVISIBLE = tuple(k for k in ARCH_KEYS if k not in SHAPE_KEYS)  # avd, avd_first
RECORD_KEY = "resnest"


def writer() -> str:
    from .. import __version__

    return f"resnest-backbone {__version__}"


# --------------------------------------------------------------------------------------------- from weights
def read_arch(weights: Dict[str, torch.Tensor]) -> dict:
    """The weight-visible architecture of official-named ResNeSt weights (CheckpointError if unreadable).

        conv2.conv.weight: (W * radix, W / (cardinality * radix), 3, 3)     W = group width of layer1
        conv2.fc1.weight:  (inter, W / cardinality, 1, 1)
    """
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


def variants_matching(arch: dict) -> List[str]:
    """Rows of the variant table whose knobs equal those given (shape-visible ones, or all of ARCH_KEYS)."""
    keys = [k for k in ARCH_KEYS if k in arch]
    return [name for name, v in VARIANTS.items() if not arch_differences(arch, v.arch(), keys)]


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


def fmt_arch(arch: dict) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in arch.items() if k in ARCH_KEYS)


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


# ----------------------------------------------------------------------------------------------- records
def make_record(variant: str, decided_by: str, source: str = "", source_naming: str = "") -> dict:
    """The record written into a converted file: the variant and every architecture knob."""
    v = get_variant(variant)
    arch = {k: _plain(getattr(v, k)) for k in ARCH_KEYS}
    return {"variant": _canonical(variant), "arch": arch, "decided_by": decided_by,
            "source": os.path.basename(str(source)), "source_naming": source_naming, "writer": writer()}


def model_record(trunk) -> dict:
    """The record of a built trunk (written into training checkpoints)."""
    arch = trunk.weight_arch()
    names = variants_matching(arch)
    return {"variant": names[0] if names else "custom", "arch": arch, "decided_by": "model", "source": "",
            "source_naming": "official", "writer": writer()}


def find_record(data: Any, path: str, metadata: Optional[Dict[str, str]] = None) -> Optional[dict]:
    """The record in what a file holds (None when it has none). A malformed record is an error: the
    file claims something we cannot check."""
    record = None
    if metadata and RECORD_KEY in metadata:  # safetensors
        try:
            record = json.loads(metadata[RECORD_KEY])
        except ValueError:
            raise CheckpointError(f"{path}: its '{RECORD_KEY}' metadata is not JSON: "
                                  f"{metadata[RECORD_KEY][:80]!r}") from None
    elif isinstance(data, dict) and RECORD_KEY in data and isinstance(data.get(RECORD_KEY), dict):
        record = data[RECORD_KEY]
    elif isinstance(data, dict) and isinstance(data.get("meta"), dict) and RECORD_KEY in data["meta"]:
        record = data["meta"][RECORD_KEY]
    if record is None:
        return None
    arch = record.get("arch") if isinstance(record, dict) else None
    if not isinstance(arch, dict) or not set(ARCH_KEYS) <= set(arch):
        raise CheckpointError(f"{path}: its '{RECORD_KEY}' architecture record is malformed (expected a dict "
                              f"with 'arch' holding {', '.join(ARCH_KEYS)}; got {str(record)[:160]})")
    return dict(record, arch={k: _plain(arch[k]) for k in ARCH_KEYS})


_HASH = re.compile(r"-[0-9a-f]{6,}$")


def variant_from_filename(path: str) -> Optional[str]:
    """The variant the official / timm naming conventions put in a file's name, or None.

    `resnest50-528c19ca.pth`, `resnest50_fast_2s1x64d-44938639.pth` (official); `resnest50d_4s2x40d-
    41d14ed0.pth`, `gluon_resnest50.pth` (timm); a Hugging Face cache folder `models--timm--resnest26d.
    gluon_in1k/.../model.safetensors` (timm's hub files are all called model.safetensors)."""
    parts = [p for p in os.path.normpath(os.fspath(path)).split(os.sep) if p][-6:]
    for depth, part in enumerate(reversed(parts)):
        name = part.lower()
        if name.endswith(".pth.tar"):
            name = name[:-len(".pth.tar")]
        elif depth == 0:
            name = os.path.splitext(name)[0]
        name = name.split("models--")[-1].split("--")[-1]  # Hugging Face cache: models--timm--NAME
        name = name.split(".")[0]  # timm's tags: resnest26d.gluon_in1k
        name = _HASH.sub("", name)
        for prefix in ("gluon_", "timm_", "timm-"):
            name = name[len(prefix):] if name.startswith(prefix) else name
        key = _named_variant(name)
        if key is not None:
            return key
    return None


_ABLATION = re.compile(r"fast|\d+s\d+x\d+d")


def _named_variant(name: str) -> Optional[str]:
    """A variant name, or one followed by a user's suffix (`resnest50_d2`, `resnest101-mmdet`): the longest
    variant name that ends at a separator, unless the suffix itself names an ablation (`_fast`, `2s1x64d`)
    that no row matches."""
    key = ALIASES.get(name, name)
    if key in VARIANTS:
        return key
    best = None
    for candidate in list(VARIANTS) + list(ALIASES):
        if name.startswith(candidate) and name[len(candidate):len(candidate) + 1] in ("_", "-"):
            if _ABLATION.search(name[len(candidate) + 1:]):
                continue
            if best is None or len(candidate) > len(best):
                best = candidate
    return ALIASES.get(best, best) if best else None


def check_arch(path: str, evidence: Optional[dict], model: dict, where: str = "the model",
               override: str = "", keys=ARCH_KEYS) -> None:
    """Refuse (CheckpointError naming both) when the evidence about a file's architecture contradicts the
    model's in any of `keys`. `evidence` is a record (find_record / file_evidence) or None (no evidence:
    shapes alone decide). Loaders compare shapes first (the more telling message when they differ) and
    call this when they fit, or with keys=INVISIBLE when they load partially."""
    if not evidence:
        return
    arch = evidence["arch"]
    different = arch_differences(arch, model, keys)
    if not different:
        return
    if evidence.get("evidence") == "file name":
        said = "its file name says"
    elif evidence.get("decided_by") == "model":
        said = "it was saved from a model of"
    else:
        said = f"it records (decided by {evidence.get('decided_by', '?')} at conversion)"
    names = variants_matching(model)
    model_name = names[0] if names else "a custom ResNeSt"
    raise CheckpointError(
        f"{path}: {said} {evidence.get('variant', '?')} ({', '.join(f'{k}={_show(arch[k])}' for k in different)}) "
        f"but {where} is {model_name} ({', '.join(f'{k}={_show(model[k])}' for k in different)}); nothing "
        "was loaded. Build the model as the checkpoint's variant"
        + (", or re-convert the file with --variant if the recorded one is wrong" if evidence.get("decided_by")
           != "model" else "") + (f" ({override})" if override else "") + ".")


def file_evidence(path: str, record: Optional[dict]) -> Optional[dict]:
    """A file's record, or failing that what its file name says (as a record), or None."""
    if record:
        return dict(record, evidence="record")
    named = variant_from_filename(path)
    return dict(make_record(named, "file name", path), evidence="file name") if named else None


def _canonical(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    return value


__all__ = ["ARCH_KEYS", "INVISIBLE", "RECORD_KEY", "SHAPE_KEYS", "check_arch", "describe_foreign",
           "file_evidence", "find_record", "fmt_arch", "make_record", "model_record",
           "read_arch", "variant_from_filename", "variants_matching"]
