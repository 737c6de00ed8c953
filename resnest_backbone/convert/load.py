"""Load ResNeSt weights into a built model, with a report of what did and did not load.

    from resnest_backbone.convert import load_weights
    report = load_weights(model, "resnest50-528c19ca.pth")          # strict: raises unless all fit
    report = load_weights(model, "partial.pkl", strict=False)       # loads what fits, says what did not
    print("\\n".join(report.lines()))

`model` is a core ResNeSt trunk, or any module holding exactly one (the detectron2 ResNeSt backbone, an FPN
over it, a whole detector). The file is read safely (see io.py) in any supported naming (official, timm,
mmdet, detectron2-ResNeSt fork, ours; under any wrapper prefix such as `module.` or
`backbone.bottom_up.`) and renamed to the model's (official) names before loading.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .convert import _first_keys, _fmt_arch, describe_foreign, read_arch, variants_matching
from .io import CheckpointError, load_state_dict
from .naming import detect_naming


@dataclass
class LoadReport:
    source: str
    target: str = ""  # where in the model the trunk is ("" = the model itself)
    naming: str = ""
    prefix: str = ""
    detected: str = ""  # the variant(s) the weights match, or what was read from them
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # "key [shape]" the model has and the file lacks
    unexpected: List[str] = field(default_factory=list)  # "key [shape]" the file has and the model lacks
    mismatched: List[str] = field(default_factory=list)  # "key: checkpoint [..], model [..]"
    ignored: List[str] = field(default_factory=list)  # keys outside the trunk (heads, classifier, ...)

    @property
    def complete(self) -> bool:
        """Every trunk tensor was loaded and nothing in the file's trunk was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self, limit: int = 8) -> List[str]:
        where = f" into {self.target}" if self.target else ""
        out = [f"loaded {len(self.loaded)} tensors from {self.source}{where} ({self.naming} naming"
               + (f" under {self.prefix!r}" if self.prefix else "") + f"; detected: {self.detected})"]
        for title, items in (("wrong shape (not loaded)", self.mismatched), ("missing", self.missing),
                             ("unexpected", self.unexpected), ("ignored (not part of the trunk)", self.ignored)):
            if items:
                shown = ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit
                                                    else "")
                out.append(f"{title}: {len(items)}: {shown}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def find_trunk(model: nn.Module) -> Tuple[str, nn.Module]:
    """(name, module) of the one ResNeSt trunk in `model` (name "" when `model` is the trunk)."""
    from ..core import ResNeSt

    trunks = [(name, m) for name, m in model.named_modules() if isinstance(m, ResNeSt)]
    if not trunks:
        raise CheckpointError(f"the model ({type(model).__name__}) contains no ResNeSt trunk to load into")
    if len(trunks) > 1:
        raise CheckpointError(f"the model holds {len(trunks)} ResNeSt trunks ({', '.join(n for n, _ in trunks)});"
                              " pass the one to load into")
    return trunks[0]


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BN step counters: FrozenBN and detectron2 files have none


def trunk_weights(weights: Dict[str, torch.Tensor], naming, prefix: str, expected, report: LoadReport,
                  rename: Optional[Callable[[str], Optional[str]]] = None) -> Dict[str, torch.Tensor]:
    """The file's trunk tensors under the model's (official) names. Keys outside `prefix` and a classifier
    the model lacks go to report.ignored; report.detected says which variants the tensors match.
    `rename` maps an official name to the model's own where they differ (None: keep it)."""
    official: Dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            report.ignored.append(key)
            continue
        name = naming.to_official(key[len(prefix):])
        if rename is not None:
            name = rename(name) or name
        if name.startswith("fc.") and name not in expected:
            report.ignored.append(key)  # the ImageNet classifier
            continue
        official[name] = value
    try:
        arch = read_arch(official)
        report.detected = ", ".join(variants_matching(arch)) or f"no known variant ({_fmt_arch(arch)})"
    except CheckpointError as exc:
        report.detected = f"unreadable architecture ({exc})"
    return official


def compare_with_model(expected: Dict[str, torch.Tensor], official: Dict[str, torch.Tensor],
                       report: LoadReport) -> Dict[str, torch.Tensor]:
    """Fill report.missing / mismatched / unexpected and return the tensors that fit (step counters
    included when both sides have them, never reported when only one side has them)."""
    to_load = {}
    for key, want in expected.items():
        if key not in official:
            if not _ignorable(key):
                report.missing.append(f"{key} {list(want.shape)}")
        elif official[key].shape != want.shape:
            if not _ignorable(key):
                report.mismatched.append(f"{key}: checkpoint {list(official[key].shape)}, model "
                                         f"{list(want.shape)}")
        else:
            to_load[key] = official[key]
    report.unexpected = [f"{k} {list(v.shape)}" for k, v in official.items()
                         if k not in expected and not _ignorable(k)]
    return to_load


def load_weights(model: nn.Module, path: str, strict: bool = True) -> LoadReport:
    """Read `path` safely, rename it to the model's names and load it into the model's ResNeSt trunk.

    strict=True: any missing, unexpected or wrong-shape trunk tensor raises CheckpointError (naming the
    file, the detected variant and the first offending keys with shapes) and nothing is loaded.
    strict=False: loads every tensor that fits and returns the report of the rest (also logged).
    A classifier (fc.*) in the file is ignored when the model has none; keys outside the trunk (a
    detector's heads) are listed as ignored."""
    target, trunk = find_trunk(model)
    weights = load_state_dict(path)
    report = LoadReport(source=str(path), target=target)
    try:
        naming, prefix = detect_naming(weights.keys())
    except ValueError:
        raise CheckpointError(f"{path} is not a ResNeSt checkpoint (detected: {describe_foreign(weights)}); "
                              f"nothing was loaded. First keys: {_first_keys(weights)}") from None
    report.naming, report.prefix = naming.name, prefix
    expected = trunk.state_dict()
    official = trunk_weights(weights, naming, prefix, expected, report)
    to_load = compare_with_model(expected, official, report)
    if strict and not report.complete:
        problems = report.mismatched + [f"missing {k}" for k in report.missing] + \
            [f"unexpected {k}" for k in report.unexpected]
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(
            f"{path} does not fit the model's ResNeSt trunk{' (' + target + ')' if target else ''}: "
            f"{len(report.mismatched)} wrong shapes, {len(report.missing)} missing, {len(report.unexpected)} "
            f"unexpected (detected in the file: {report.detected}); nothing was loaded (strict=False loads "
            "what fits). First:\n  " + "\n  ".join(problems[:8]) + more)
    result = trunk.load_state_dict(to_load, strict=False)
    leftover = [k for k in result.unexpected_keys if not _ignorable(k)]
    if leftover:  # cannot happen with the checks above; never let it pass silently
        raise CheckpointError(f"{path}: torch did not accept {leftover[:5]}")
    report.loaded = sorted(to_load)
    if not report.complete:
        import logging

        logging.getLogger(__name__).warning("partial load:\n%s", report)
    return report


__all__ = ["LoadReport", "compare_with_model", "find_trunk", "load_weights", "trunk_weights"]
