"""Convert a ResNeSt classification checkpoint (official, timm, mmdet, detectron2-ResNeSt fork, ours) into
detectron2 `.pkl`, mmdet `.pth` or official-named `.pth`/`.safetensors`, checking the architecture first.

The variant is read from the weights (blocks per stage, stem width, radix / cardinality / width: see
arch.read_arch). avd_first (the `fast` ablations) moves a parameter-free pool and cannot be read from
weights, so it is decided by evidence, in this order: --variant; the record of a file we wrote; the official
or timm file name (`resnest50_fast_2s1x64d-44938639.pth`, `resnest50d_4s2x40d-41d14ed0.pth`); the weights
alone when every variant of that layout agrees. Otherwise the conversion is refused with the candidates
listed (never a silent guess). The decision is written into the output (arch.make_record), and every
loader checks it against the model it loads into.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..core.variants import VARIANTS, build_resnest, get_variant
from .arch import (INVISIBLE, RECORD_KEY, describe_foreign, find_record, fmt_arch, make_record, read_arch,
                   variant_from_filename, variants_matching)
from .io import CheckpointError, open_checkpoint, save_d2_pkl, save_torch
from .load import LoadReport, compare_with_model, detected_variants, mismatch_error, not_resnest_error
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
    decided_by: str = ""  # --variant, record, file name, weights
    dropped: List[str] = field(default_factory=list)  # keys not carried to the output
    tensors: int = 0
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"source: {self.source}", f"naming: {self.naming}" + (f" under prefix {self.prefix!r}" if
                                                                     self.prefix else ""),
               f"variant: {self.variant} (decided by: {self.decided_by})"
               + (f" (same weights layout: {', '.join(self.variant_candidates)})"
                  if len(self.variant_candidates) > 1 else ""),
               f"tensors written: {self.tensors}"]
        if self.dropped:
            shown = ", ".join(self.dropped[:6]) + (" ..." if len(self.dropped) > 6 else "")
            out.append(f"dropped {len(self.dropped)} keys: {shown}")
        return out  # notes go to stderr (cli)


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


def mismatches(weights: Dict[str, torch.Tensor], variant: str) -> LoadReport:
    """Compare official-named weights with a variant's trunk (the classifier is not compared)."""
    with torch.device("meta"):
        expected = build_resnest(variant).state_dict()
    report = LoadReport(source="", detected=detected_variants(weights))
    compare_with_model(expected, weights, report, skip=lambda key: key.startswith(CLASSIFIER_PREFIX))
    return report


def decide_variant(src: str, arch: dict, record: Optional[dict], variant: Optional[str] = None,
                   given_by: str = "--variant") -> tuple:
    """(variant, decided_by) from the evidence, in the order of the module docstring; CheckpointError when
    the evidence is contradictory or cannot decide (listing the candidates). `given_by` says where a given
    `variant` comes from ("--variant", or "variant name" for weights fetched by name)."""
    if variant is not None:
        get_variant(variant)  # unknown name -> ValueError with the list
        return variant, given_by
    candidates = variants_matching(arch)
    if not candidates:
        plain = " (radix=0: no split attention, e.g. a ResNet-D)" if arch["radix"] == 0 else ""
        raise CheckpointError(f"{src}: the weights match no known ResNeSt variant (detected: {fmt_arch(arch)})"
                              f"{plain}; pass --variant to check against one; nothing was written")
    if record is not None:
        return record["variant"], "record"  # a file we wrote: its own evidence was checked then
    named = variant_from_filename(src)
    if named is not None:
        if named not in candidates:
            raise CheckpointError(
                f"{src}: its file name says {named} but its weights are {', '.join(candidates)} "
                f"({fmt_arch(arch)}); pass --variant to say which is right; nothing was written")
        return named, "file name"
    layouts = {tuple(getattr(VARIANTS[c], k) for k in INVISIBLE): c for c in candidates}
    if len(layouts) == 1:
        return candidates[0], "weights"
    listed = "; ".join(f"--variant {c} ({', '.join(f'{k}={v}' for k, v in zip(INVISIBLE, key))})"
                       for key, c in layouts.items())
    raise CheckpointError(
        f"{src}: the weights fit {len(candidates)} variants that differ only in {', '.join(INVISIBLE)}, which "
        f"weights cannot show ({', '.join(candidates)}), and the file name does not say which; choose: "
        f"{listed}. Nothing was written. (Official `fast` checkpoints are named "
        "resnest50_fast_NsKxWd-*.pth; keep that name or pass --variant.)")


def check_output(dst: str, fmt: str, force: bool = False) -> None:
    """Refuse an output that cannot be written (unknown format, wrong extension, exists without force)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not dst.endswith(FORMATS[fmt]):
        raise CheckpointError(f"{dst}: a {fmt} checkpoint must end with {' or '.join(FORMATS[fmt])}")
    if os.path.lexists(dst) and not force:
        raise CheckpointError(f"{dst} exists; pass --force to overwrite it")


def convert_checkpoint(src: str, dst: str, fmt: str = "d2", variant: Optional[str] = None,
                       force: bool = False, keep_classifier: bool = False,
                       given_by: str = "--variant") -> Report:
    """Read `src` safely, check it, write `dst` in `fmt`. Raises CheckpointError (nothing written).
    `given_by`: where `variant` comes from, recorded in the output ("--variant" or "variant name")."""
    check_output(dst, fmt, force)
    report = Report(source=src)
    ckpt = open_checkpoint(src)
    try:
        official = to_official(ckpt.weights, report)
    except ValueError:
        raise not_resnest_error(src, ckpt.weights, "nothing was written") from None
    try:
        arch = read_arch(official)
    except CheckpointError as exc:
        raise CheckpointError(f"{src} is not a usable ResNeSt checkpoint ({report.naming} naming"
                              f"{' under ' + repr(report.prefix) if report.prefix else ''}): {exc}. First "
                              f"keys: {_first_keys(official)}; nothing was written") from None
    report.variant_candidates = variants_matching(arch)
    record = find_record(ckpt.data, src, ckpt.metadata)
    variant, decided_by = decide_variant(src, arch, record, variant, given_by)
    if record is not None and variant_arch(variant) != record["arch"]:
        raise CheckpointError(f"{src} records variant {record['variant']} ({fmt_arch(record['arch'])}) but "
                              f"--variant {variant} differs; nothing was written")
    named = variant_from_filename(src)
    if decided_by == given_by and named and variant_arch(named) != variant_arch(variant):
        report.notes.append(f"{src}: the file name says {named}; converted as {variant} ({given_by}) as asked")
    check = mismatches(official, variant)
    if not check.complete:
        raise mismatch_error(src, f"variant {variant}", check, "nothing was written",
                             hint="read from the weights: " + fmt_arch(arch))
    report.variant, report.decided_by = variant, decided_by
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
    meta = {RECORD_KEY: make_record(variant, decided_by, src, report.naming)}
    if fmt == "d2":
        save_d2_pkl(out, dst, force=force, **meta)
    else:
        save_torch(out, dst, force=force, **meta)
    return report


def variant_arch(variant: str) -> dict:
    return make_record(variant, "")["arch"]


def _first_keys(weights: Dict[str, torch.Tensor], n: int = 5) -> str:
    shown = [f"{k} {list(v.shape)}" for k, v in list(weights.items())[:n]]
    return ", ".join(shown) + (f" ... ({len(weights)} tensors)" if len(weights) > n else "")


__all__ = ["FORMATS", "NAMINGS", "OFFICIAL", "Report", "check_output", "convert_checkpoint", "decide_variant",
           "describe_foreign", "mismatches", "read_arch", "to_official", "variants_matching"]
