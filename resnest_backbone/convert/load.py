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

This module is the one place that prepares weights for a model: `prepare_state_dict` renames them to the
model's keys, compares the trunk (`compare_with_model`), refuses what does not fit (`mismatch_error`) and
checks the architecture evidence (`arch.check_arch`). `load_weights`, the detectron2 checkpointer, the
mmdet/mmseg `init_cfg` loader and ResNeStSA's whole-model loads call it and keep only their framework's
plumbing; the converter uses the same comparison and message.

Deformable (DCN) trunks: a file without any offset branch (`conv2_offset`, e.g. an ImageNet trunk) fills a DCN
model; its offset branches are reported as newly initialised (zero: zero offsets) rather than missing. A file
that has offset branches must have all of the model's, like any other tensor.
"""
import logging
from dataclasses import dataclass, field
import os
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

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


def detected_variants(weights: Mapping[str, torch.Tensor]) -> str:
    """Which variants trunk weights (any naming, under any wrapper prefix) match, or what the weights are
    instead, for messages."""
    try:
        naming, prefix = detect_naming(weights)
    except ValueError:
        try:
            return describe_foreign(weights)
        except Exception:  # odd values (not tensors): say nothing more than that
            return "not a ResNeSt"
    try:
        arch = read_arch({naming.to_official(k[len(prefix):]): v for k, v in weights.items() if k.startswith(prefix)})
        return ", ".join(variants_matching(arch)) or f"no known variant ({fmt_arch(arch)})"
    except CheckpointError as exc:
        return f"unreadable architecture ({exc})"
    except (ValueError, TypeError, AttributeError):
        return "not a ResNeSt"


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


_TRUNK_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")  # official names


class Prepared(NamedTuple):
    """What prepare_state_dict found: `weights` under the model's own keys (for its load_state_dict with
    strict=False), the report, and the architecture evidence checked (the file's record or what its
    official / timm name says; None: there was none)."""
    weights: Dict[str, torch.Tensor]
    report: LoadReport
    evidence: Optional[dict]


def prepare_state_dict(model: nn.Module, ckpt: Checkpoint, *, prefix: str = "", whole_model: bool = False,
                       strict: bool = True, align: Optional[Callable[[Dict], Dict]] = None,
                       hint: str = "strict=False loads what fits") -> Prepared:
    """THE preparation of a read checkpoint for a model holding one ResNeSt trunk; every loader calls it.

    1. Keys: those under `prefix` (e.g. a detector's `backbone.`; the rest is ignored). The trunk's naming
       (official/timm, mmdet, detectron2-ResNeSt fork) and wrapper prefix are detected and renamed to the
       model's keys. A file holding only a trunk goes to the model's trunk (a classifier and step counters
       the model lacks are dropped). Any other file gives its trunk (the rest: report.ignored), or with
       `whole_model` is a checkpoint of the whole model: its keys stay (a leading `module.` stripped, as the
       frameworks do), aligned by `align` (detectron2's matching heuristics) when given.
    2. Every trunk tensor is compared by name and shape (report). strict: anything missing, unexpected or of
       another shape refuses the file (CheckpointError naming it and the first keys; `hint`: how to opt
       out); nothing has been loaded.
    3. The architecture the file records (or its official / timm name says) is checked against the trunk's:
       all of it when the shapes fit, what shapes cannot show (avd, avd_first) otherwise; refused if it
       contradicts.
    4. A DCN trunk's offset branches that a plain file lacks are set to zero (report.initialised).
    Returns the weights to load (with `whole_model` all of them: the framework's loader deals with heads and
    reports what does not fit; otherwise the trunk tensors that fit), the report and the evidence."""
    target, trunk = find_trunk(model)
    report = LoadReport(source=ckpt.path, target=target)
    record = find_record(ckpt.data, ckpt.path, ckpt.metadata)
    # a file's name is evidence (official / timm conventions); a state_dict handed over in memory has none
    evidence = report.record = file_evidence(ckpt.path, record) if record or os.path.isfile(ckpt.path) else None
    weights = dict(ckpt.weights)
    if prefix:
        report.ignored = [k for k in weights if not k.startswith(prefix)]
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if not weights:
            raise CheckpointError(f"{ckpt.path}: no keys start with prefix {prefix!r}; nothing was loaded")
    if whole_model and weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    try:
        naming, found = detect_naming(weights)
    except ValueError:
        if not whole_model:
            raise not_resnest_error(ckpt.path, weights, "nothing was loaded") from None
        naming, found = None, ""  # not a ResNeSt: compared as it is (and refused when strict)
    report.naming, report.prefix = getattr(naming, "name", "none"), prefix + found
    expected = trunk.state_dict()
    lead = target + "." if target else ""
    as_trunk = naming is not None and (not whole_model or found in ("", "module.") and all(
        naming.to_official(k[len(found):]).startswith(_TRUNK_ROOTS) for k in weights if k.startswith(found)))
    if as_trunk:
        official: Dict[str, torch.Tensor] = {}
        for key, value in weights.items():
            name = naming.to_official(key[len(found):]) if key.startswith(found) else None
            if name is None or name.startswith("fc.") and name not in expected:
                report.ignored.append(key)  # outside the trunk, or the ImageNet classifier
            elif name in expected or not ignorable(name):
                official[name] = value
        weights = {lead + k: v for k, v in official.items()}
    else:
        weights = {found + naming.to_official(k[len(found):]) if naming and k.startswith(found) else k: v
                   for k, v in weights.items()}
        if align is not None:
            weights = align(weights)
        official = {k[len(lead):]: v for k, v in weights.items() if k.startswith(lead)}
    report.detected = detected_variants(official or weights)
    to_load = compare_with_model(expected, official, report)
    variant = (variants_matching(trunk.weight_arch()) or ["custom"])[0]
    at = f" at '{target}'" if target else ""
    if strict and not report.complete:
        raise mismatch_error(ckpt.path, f"{type(trunk).__name__}({variant}){at}", report, hint=hint)
    check_arch(ckpt.path, evidence, trunk.weight_arch(), where=f"the model's ResNeSt trunk{at}",
               keys=ARCH_KEYS if report.complete else INVISIBLE)
    if not whole_model:
        weights = {lead + k: v for k, v in to_load.items()}
    weights.update({lead + k: v for k, v in report.initial_values(expected).items()})
    report.loaded = sorted(to_load)
    return Prepared(weights, report, evidence)


def load_weights(model: nn.Module, path: str, strict: bool = True) -> LoadReport:
    """Read `path` safely, rename it to the model's names and load it into the model's ResNeSt trunk
    (prepare_state_dict, then the model's load_state_dict).

    strict=True: any missing, unexpected or wrong-shape trunk tensor raises CheckpointError (naming the
    file, the detected variant and the first offending keys with shapes) and nothing is loaded.
    strict=False: loads every tensor that fits and returns the report of the rest (also logged).
    Either way, a file whose record (or official/timm file name) names another architecture than the
    model's (e.g. avd_first, invisible in the weights) is refused.
    A classifier (fc.*) in the file is ignored when the model has none; keys outside the trunk (a
    detector's heads) are listed as ignored. A DCN model's offset branches that a plain file lacks are set
    to zero and listed as newly initialised."""
    path = resolve_checkpoint(path)[0]  # a variant name: its published weights (sources.py)
    prepared = prepare_state_dict(model, open_checkpoint(path), strict=strict)
    result = model.load_state_dict(prepared.weights, strict=False)
    leftover = [k for k in result.unexpected_keys if not ignorable(k)]
    if leftover:  # cannot happen with the checks above; never let it pass silently
        raise CheckpointError(f"{path}: torch did not accept {leftover[:5]}")
    if not prepared.report.complete:
        logging.getLogger(__name__).warning("partial load:\n%s", prepared.report)
    return prepared.report


__all__ = ["LoadReport", "Prepared", "compare_with_model", "detected_variants", "find_trunk", "ignorable",
           "load_weights", "mismatch_error", "not_resnest_error", "prepare_state_dict"]
