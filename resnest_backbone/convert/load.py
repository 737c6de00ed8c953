"""Load ResNeSt weights into a built model, with a report of what did and did not load.

    from resnest_backbone.convert import load_weights
    report = load_weights(model, "resnest50-528c19ca.pth")          # strict: raises unless all fit
    report = load_weights(model, "partial.pkl", strict=False)       # loads what fits, says what did not
    report = load_weights(model, "resnest50")                       # the published weights, by name
    print("\\n".join(report.lines()))

`model` is a core ResNeSt trunk, or any module holding exactly one (the detectron2 ResNeSt backbone, an FPN
over it, a whole detector). The file is read safely (see io.py) in any supported naming (official, timm,
mmdet, detectron2-ResNeSt fork, ours; under any wrapper prefix such as `module.` or
`backbone.bottom_up.`) and renamed to the model's (official) names before loading.

This module is the one place that compares weights with a model and reports the differences: the
converter, `load_weights`, the detectron2 checkpointer and the mmdet/mmseg `init_cfg` loader all call
`compare_with_model` and raise `mismatch_error`, and check the architecture evidence with
`arch.check_arch` through `match_trunk` (or directly).

Deformable (DCN) trunks: a file without any offset branch (`conv2_offset`, e.g. an ImageNet trunk) fills a DCN
model; its offset branches are reported as newly initialised (zero: zero offsets) rather than missing. A file
that has offset branches must have all of the model's, like any other tensor.
"""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.deform import is_offset_key
from .arch import (ARCH_KEYS, INVISIBLE, check_arch, describe_foreign, file_evidence, find_record, fmt_arch,
                   read_arch, variants_matching)
from .io import Checkpoint, CheckpointError, open_checkpoint
from .naming import detect_naming
from .sources import resolve_checkpoint


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
    # "key [shape]" of DCN offset branches the model has and a file without any offset branch lacks: they
    # start at zero (zero offsets); not a problem (see the module docstring)
    initialised: List[str] = field(default_factory=list)
    record: Optional[dict] = None  # the architecture the file records (or its file name says)

    @property
    def complete(self) -> bool:
        """Every trunk tensor was loaded and nothing in the file's trunk was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> List[str]:
        return self.mismatched + [f"missing {k}" for k in self.missing] + \
            [f"unexpected {k}" for k in self.unexpected]

    def lines(self, limit: int = 8) -> List[str]:
        where = f" into {self.target}" if self.target else ""
        out = [f"loaded {len(self.loaded)} tensors from {self.source}{where} ({self.naming} naming"
               + (f" under {self.prefix!r}" if self.prefix else "") + f"; detected: {self.detected})"]
        if self.record:
            out.append(f"architecture: {self.record.get('variant')} (from the file's "
                       + ("name" if self.record.get("evidence") == "file name" else "record") + ")")
        for title, items in (("wrong shape (not loaded)", self.mismatched), ("missing", self.missing),
                             ("unexpected", self.unexpected), ("ignored (not part of the trunk)", self.ignored)):
            if items:
                shown = ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit
                                                    else "")
                out.append(f"{title}: {len(items)}: {shown}")
        if self.initialised:
            out.append(f"newly initialised (DCN offset branches, not in the file; zero = zero offsets): "
                       f"{len(self.initialised)}: " + ", ".join(self.initialised[:limit])
                       + (f" ... ({len(self.initialised) - limit} more)" if len(self.initialised) > limit else ""))
        return out

    def initial_values(self, expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Zero tensors for the newly initialised keys (their values in a freshly built model), shaped and
        typed as `expected` (the model's state_dict)."""
        keys = [item.split(" ", 1)[0] for item in self.initialised]
        return {k: torch.zeros_like(expected[k]) for k in keys}

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


def ignorable(key: str) -> bool:
    """BN step counters: FrozenBN and detectron2 files have none, BN trunks do; they are not weights."""
    return key.endswith("num_batches_tracked")


def detected_variants(official: Mapping[str, torch.Tensor]) -> str:
    """Which variants official-named trunk weights match, for messages."""
    try:
        arch = read_arch(official)
        return ", ".join(variants_matching(arch)) or f"no known variant ({fmt_arch(arch)})"
    except CheckpointError as exc:
        return f"unreadable architecture ({exc})"
    except (ValueError, TypeError, AttributeError):
        return describe_foreign(official)


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
    report.detected = detected_variants(official)
    return official


def compare_with_model(expected: Mapping[str, Sequence[int]], found: Mapping[str, torch.Tensor],
                       report: LoadReport, skip: Callable[[str], bool] = lambda key: False
                       ) -> Dict[str, torch.Tensor]:
    """THE comparison of weights with a model: fill report.missing / mismatched / unexpected and return the
    tensors that fit. `expected` maps the model's keys to tensors or shapes; step counters are loaded when
    both sides have them and never reported when only one side has them; keys for which `skip` is true
    (e.g. a classifier the output does not carry) are neither compared nor reported. The model's DCN offset
    branches go to report.initialised when `found` has no offset branch at all (a plain trunk)."""
    to_load = {}
    plain_file = not any(is_offset_key(k) for k in found)
    for key, want in expected.items():
        want = tuple(want.shape) if isinstance(want, torch.Tensor) else tuple(want)
        if key not in found:
            if plain_file and is_offset_key(key):
                report.initialised.append(f"{key} {list(want)}")
            elif not ignorable(key):
                report.missing.append(f"{key} {list(want)}")
        elif tuple(found[key].shape) != want:
            if not ignorable(key):
                report.mismatched.append(f"{key}: checkpoint {list(found[key].shape)}, model {list(want)}")
        else:
            to_load[key] = found[key]
    report.unexpected = [f"{k} {list(v.shape)}" for k, v in found.items()
                         if k not in expected and not ignorable(k) and not skip(k)]
    return to_load


def mismatch_error(path: str, target: str, report: LoadReport, consequence: str = "nothing was loaded",
                   hint: str = "strict=False loads what fits", limit: int = 8) -> CheckpointError:
    """THE message for weights that do not fit: file, target, counts, what the file holds, first keys."""
    problems = report.problems()
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return CheckpointError(
        f"{path} does not fit {target}: {len(report.mismatched)} wrong shapes, {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected (detected in the file: {report.detected}); {consequence}"
        + (f" ({hint})" if hint else "") + ". First:\n  " + "\n  ".join(problems[:limit]) + more)


def not_resnest_error(path: str, weights: Mapping[str, torch.Tensor], consequence: str) -> CheckpointError:
    shown = [f"{k} {list(v.shape)}" for k, v in list(weights.items())[:5]]
    first = ", ".join(shown) + (f" ... ({len(weights)} tensors)" if len(weights) > 5 else "")
    return CheckpointError(f"{path} is not a ResNeSt checkpoint (detected: {describe_foreign(weights)}; no ResNeSt "
                           f"deep stem conv1.0 / stem.0 / stem.conv1_1 under any prefix); {consequence}. "
                           f"First keys: {first}")


def match_trunk(trunk: nn.Module, ckpt: Checkpoint, target: str = "", prefix: str = "",
                rename: Optional[Callable[[str], Optional[str]]] = None,
                check_architecture: bool = True) -> Tuple[LoadReport, Dict[str, torch.Tensor]]:
    """Check a read checkpoint against a trunk: the architecture the file records (or its name says)
    against the trunk's, then every tensor by name and shape. Returns the report and the tensors that fit
    (under the trunk's own names); raises CheckpointError for a foreign file or a contradicting record."""
    report = LoadReport(source=ckpt.path, target=target)
    report.record = file_evidence(ckpt.path, find_record(ckpt.data, ckpt.path, ckpt.metadata))
    weights = ckpt.weights
    if prefix:
        report.ignored = [k for k in weights if not k.startswith(prefix)]
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not weights:
            raise CheckpointError(f"{ckpt.path}: no keys start with prefix {prefix!r}; nothing was loaded")
    try:
        naming, found = detect_naming(weights.keys())
    except ValueError:
        raise not_resnest_error(ckpt.path, weights, "nothing was loaded") from None
    report.naming, report.prefix = naming.name, prefix + found
    expected = trunk.state_dict()
    official = trunk_weights(weights, naming, found, expected, report, rename)
    to_load = compare_with_model(expected, official, report)
    if check_architecture:  # all of it when the shapes fit; what shapes cannot show when they do not
        check_arch(ckpt.path, report.record, trunk.weight_arch(),
                   where=f"the model's ResNeSt trunk{' (' + target + ')' if target else ''}",
                   keys=ARCH_KEYS if report.complete else INVISIBLE)
    return report, to_load


def load_weights(model: nn.Module, path: str, strict: bool = True) -> LoadReport:
    """Read `path` safely, rename it to the model's names and load it into the model's ResNeSt trunk.

    strict=True: any missing, unexpected or wrong-shape trunk tensor raises CheckpointError (naming the
    file, the detected variant and the first offending keys with shapes) and nothing is loaded.
    strict=False: loads every tensor that fits and returns the report of the rest (also logged).
    Either way, a file whose record (or official/timm file name) names another architecture than the
    model's (e.g. avd_first, invisible in the weights) is refused.
    A classifier (fc.*) in the file is ignored when the model has none; keys outside the trunk (a
    detector's heads) are listed as ignored. A DCN model's offset branches that a plain file lacks are set
    to zero and listed as newly initialised."""
    target, trunk = find_trunk(model)
    path = resolve_checkpoint(path)[0]  # a variant name: its published weights (sources.py)
    report, to_load = match_trunk(trunk, open_checkpoint(path), target)
    where = "the model's ResNeSt trunk" + (f" ({target})" if target else "")
    if strict and not report.complete:
        raise mismatch_error(str(path), where, report)
    result = trunk.load_state_dict({**to_load, **report.initial_values(trunk.state_dict())}, strict=False)
    leftover = [k for k in result.unexpected_keys if not ignorable(k)]
    if leftover:  # cannot happen with the checks above; never let it pass silently
        raise CheckpointError(f"{path}: torch did not accept {leftover[:5]}")
    report.loaded = sorted(to_load)
    if not report.complete:
        logging.getLogger(__name__).warning("partial load:\n%s", report)
    return report


__all__ = ["LoadReport", "compare_with_model", "find_trunk", "ignorable", "load_weights", "match_trunk",
           "mismatch_error", "not_resnest_error", "trunk_weights"]
