"""A DetectionCheckpointer that never executes a checkpoint, never loads a trunk of another architecture or
half a trunk, and never leaves a half-written checkpoint. A thin shell over resnest_backbone.convert.

- Reading: every file goes through convert.read_checkpoint (`.pkl` through an unpickler that admits only
  numpy arrays and plain containers, `.pth` through torch.load(weights_only=True), `.safetensors` through
  safetensors); detectron2's own loader pickle.loads `.pkl` files, which runs whatever code they carry.
- Architecture: the record a converted file or a training checkpoint carries (or an official / timm file
  name) is checked against the model's trunk (convert.check_arch): `avd_first`, invisible in weights,
  cannot slip through.
- Naming: a bare ResNeSt trunk in any known naming (official/timm `.pth`, `.safetensors`, our converter's
  `.pkl`, mmdet, the detectron2-ResNeSt fork) is renamed to the model's own keys (e.g.
  `backbone.bottom_up.layer1.0.conv2.fc1.weight`), so it loads by exact name instead of by detectron2's
  suffix heuristics (which skip a wrong-shape tensor with only a log line).
- Strict trunk, before anything is copied: files that ask for detectron2's matching heuristics (the
  `matching_heuristics` flag, or `file.pkl?matching_heuristics=True` as on detectron2 main) are aligned
  first, then every trunk tensor is compared by name and shape (convert.compare_with_model); a missing or
  wrong-shape trunk tensor refuses the file (CheckpointError naming it and the first keys) and the model
  is untouched. Heads may still differ (fine-tuning to other classes). `checkpointer.strict_backbone =
  False` loads such a file partially (detectron2 then logs what it skipped).
- `load()` is exception-safe: a refused load leaves the checkpointer usable (detectron2 main keeps
  `_parsed_url_during_load` set after an exception, failing every later load).
- Saving: to a temporary file in the same folder, checked to read back with the weights-only reader, then
  renamed over the target; `last_checkpoint` likewise. The trunk's architecture record is saved with it.
  A run killed at any moment leaves the previous checkpoint and tag intact (stray `*.tmp` files are never
  picked up: detectron2 only lists `*.pth`).
- The two classic mistakes (resnest_backbone.guards): a load that leaves detector heads at their random
  initialisation (an ImageNet trunk given for evaluation; decided from the keys the load filled against the
  model's) warns at the first forward in eval mode, unless training comes first; a load that fills the
  ResNeSt trunk checks the run's input format and mean/std (`config=`: the yacs or LazyConfig config, whose
  key names the warning gives; without it, the model's pixel_mean / pixel_std / input_format) against what
  the weights were trained on (RGB, ImageNet mean/std; or what a checkpoint of this project records).
"""
import logging
import os
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from ..convert.arch import RECORD_KEY, check_arch, file_evidence, find_record, model_record
from ..convert.io import (CheckpointError, _unwrap, atomic_write, read_checkpoint, safetensors_metadata,
                          verify_weights_only)
from ..convert.load import LoadReport, compare_with_model, detected_variants, mismatch_error
from ..convert.naming import OFFICIAL, detect_naming
from ..convert.sources import resolve_checkpoint
from ..guards import INPUT_KEY, RESNEST_INPUT, arm_random_heads, check_input, logger_log, random_parts
from .compat import reset_parsed_url

_TRUNK_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")
_OVERRIDE = "set checkpointer.strict_backbone = False to load it anyway"
# detectron2's logger (console and log.txt once setup_logger has run)
_GUARD_LOG = logger_log(logging.getLogger("detectron2.resnest_backbone"))
_ADVICE = ("Train first (such a file is the right MODEL.WEIGHTS / train.init_checkpoint to train from), or "
           "evaluate a trained detector: MODEL.WEIGHTS (yaml) / train.init_checkpoint (LazyConfig) = e.g. "
           "OUTPUT_DIR/model_final.pth.")


class SafeDetectionCheckpointer(DetectionCheckpointer):
    strict_backbone = True  # refuse checkpoints that do not fit the ResNeSt trunk completely

    def __init__(self, model, save_dir: str = "", *, config=None, **kwargs):
        """config: the run's config (yacs CfgNode or LazyConfig), read for the input-format check."""
        super().__init__(model, save_dir, **kwargs)
        self.config = config

    def load(self, path: str, *args, **kwargs):
        """detectron2's load, plus `?matching_heuristics=True` on every detectron2 line, variant names
        (`resnest50`: the published weights, downloaded once and verified, convert/sources.py), and
        exception-safe."""
        self._heuristics = False
        if path and "?" in path:
            parsed = urlparse(path)
            queries = parse_qs(parsed.query)
            flag = queries.pop("matching_heuristics", None)
            if queries:
                raise ValueError(f"{path}: unsupported query {queries} (only matching_heuristics=True)")
            self._heuristics = flag == ["True"]
            path = parsed._replace(query="").geturl()
        if path:
            path = resolve_checkpoint(path)[0]  # a variant name (MODEL.WEIGHTS resnest50): the verified file
        try:
            out = super().load(path, *args, **kwargs)
            if not path:  # detectron2: "No checkpoint found. Initializing model from scratch"
                self._guard(set(), source="no checkpoint (MODEL.WEIGHTS / train.init_checkpoint empty)")
            return out
        finally:
            self._heuristics = False
            reset_parsed_url(self)  # detectron2 main resets it only on success

    def _load_file(self, filename: str) -> dict:
        data = read_checkpoint(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename}: holds a {type(data).__name__}, not a checkpoint dict")
        self._loading = filename
        self._evidence = file_evidence(filename, find_record(data, filename, safetensors_metadata(filename)))
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format (also our converter's)
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            out = dict(data)
        elif "model_state" in data:  # pycls .pyth
            out = {"model": {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")},
                   "__author__": "pycls", "matching_heuristics": True}
        elif filename.endswith(".pkl") and not _is_resnest(_inner(data)):  # Caffe2 / Detectron1 model zoo
            weights = {k: v for k, v in _inner(data).items() if not k.endswith("_momentum")}
            out = {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        elif isinstance(data.get("model"), dict):  # detectron2 training checkpoint
            out = data
        else:  # a bare state_dict, or one wrapped in "state_dict" (mmdet, timm)
            out = {"model": dict(_unwrap(data, filename))}
        if getattr(self, "_heuristics", False):  # set by load() from `?matching_heuristics=True`
            out["matching_heuristics"] = True
        if "Caffe2" != out.get("__author__"):
            self._place_trunk(out, filename)
        return out

    def _trunk(self):
        """(name, module) of the model's one ResNeSt trunk, or None."""
        from ..core import ResNeSt

        found = [(name, m) for name, m in self.model.named_modules() if isinstance(m, ResNeSt)]
        return found[0] if len(found) == 1 else None

    def _trunk_name(self) -> Optional[str]:
        trunk = self._trunk()
        return None if trunk is None else trunk[0]

    def _place_trunk(self, checkpoint: dict, filename: str) -> None:
        """Rename a bare ResNeSt trunk (any known naming) to the model's keys, and a trunk in another
        naming inside a full detector (the detectron2-ResNeSt fork, mmdet) to official names."""
        weights = checkpoint["model"]
        if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
            return
        try:
            naming, prefix = detect_naming(weights.keys())
        except ValueError:
            return
        trunk = self._trunk_name()
        state = self.model.state_dict()
        renamed = {}
        bare = prefix in ("", "module.") and all(
            _is_trunk_key(naming.to_official(k[len(prefix):])) for k in weights if k.startswith(prefix))
        for key, value in weights.items():
            if not key.startswith(prefix):
                renamed[key] = value
                continue
            name = naming.to_official(key[len(prefix):])
            if bare and trunk is not None:
                target = f"{trunk}.{name}" if trunk else name
                # An ImageNet classifier has no place in a detector; FrozenBN has no step counter.
                if target not in state and (name.startswith("fc.") or name.endswith("num_batches_tracked")):
                    continue
                renamed[target] = value
            else:
                renamed[prefix + name] = value
        if bare and trunk is not None:
            checkpoint["matching_heuristics"] = False
            self.logger.info(f"{filename}: ResNeSt trunk ({naming.name} naming) loaded into '{trunk or 'model'}'")
        elif naming is not OFFICIAL:
            self.logger.info(f"{filename}: renamed the trunk from {naming.name} to official names")
        checkpoint["model"] = renamed

    def _load_model(self, checkpoint):
        found = self._trunk()
        if checkpoint.get("matching_heuristics", False):
            # detectron2's own alignment, done here so the trunk is checked before anything is copied
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
            checkpoint["matching_heuristics"] = False
        if self.strict_backbone and found is not None:
            trunk, module = found
            report = self._check_trunk(checkpoint["model"], trunk)  # shapes first: the more telling message
            if report.initialised:  # a plain trunk into a DCN model: the offset branches start at zero
                weights = checkpoint["model"]
                lead = "module." if weights and all(k.startswith("module.") for k in weights) else ""
                prefix = lead + (trunk + "." if trunk else "")
                weights.update({prefix + k: v for k, v in
                                report.initial_values(module.state_dict()).items()})
                self.logger.info(f"{self._loading}: " + report.lines()[-1])
            check_arch(self._loading, getattr(self, "_evidence", None), module.weight_arch(),
                       where=f"the model's ResNeSt trunk '{trunk or 'model'}'", override=_OVERRIDE)
        incompatible = super()._load_model(checkpoint)
        filled = {n for n, _ in self.model.named_parameters()} - set(incompatible.missing_keys)
        self._guard(filled, getattr(self, "_loading", "the checkpoint"), checkpoint.get(INPUT_KEY))
        return incompatible

    def _guard(self, filled, source: str, recorded_input: Optional[dict] = None) -> None:
        """The two warnings of resnest_backbone.guards for a load that filled the parameters `filled`."""
        found = self._trunk()
        trunk = found[0] if found is not None else None
        unfilled = {n for n, _ in self.model.named_parameters()} - set(filled)
        parts, count = random_parts(self.model, unfilled, trunk)
        parts = [p[len("module."):] if p.startswith("module.") else p for p in parts]
        trunk_filled = found is not None and any(
            (trunk + "." + n if trunk else n) in filled for n, _ in found[1].named_parameters())
        arm_random_heads(_unwrap_model(self.model), lambda: (parts, count, trunk_filled), source, _ADVICE,
                         _GUARD_LOG)
        if trunk_filled:
            expected, origin = RESNEST_INPUT, ""
            if isinstance(recorded_input, dict) and set(RESNEST_INPUT) <= set(recorded_input):
                expected = recorded_input
                origin = (f"the input its training recorded ({expected['format']}, mean {expected['pixel_mean']}, "
                          f"std {expected['pixel_std']})")
            check_input(_input_rows(_unwrap_model(self.model), self.config, expected), source, _GUARD_LOG, origin)

    def _check_trunk(self, weights: Dict[str, torch.Tensor], trunk: str) -> LoadReport:
        """Every trunk tensor present with the model's shape, nothing extra in the trunk; else refuse.
        Returns the report (DCN offset branches a plain file lacks: report.initialised)."""
        prefix = trunk + "." if trunk else ""
        found = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
        expected = {k[len(prefix):]: v for k, v in self.model.state_dict().items() if k.startswith(prefix)}
        in_trunk = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
        report = LoadReport(source=self._loading)
        compare_with_model(expected, in_trunk, report)
        if not report.complete:
            held = in_trunk or found
            report.detected = detected_variants(held) if _is_resnest(held) else _foreign(held)
            raise mismatch_error(self._loading, f"the model's ResNeSt trunk '{trunk or 'model'}'", report,
                                 hint=_OVERRIDE)
        return report

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        trunk = self._trunk()
        if trunk is not None:
            data[RECORD_KEY] = model_record(trunk[1])
            current = _current_input(_unwrap_model(self.model), self.config)
            if current is not None:
                data[INPUT_KEY] = current
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))

        def write(tmp):
            torch.save(data, tmp)
            verify_weights_only(tmp)

        atomic_write(save_file, write, force=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(last_filename_basename)

        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), write, force=True)


def _unwrap_model(model):
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                               torch.nn.DataParallel)) else model


def _buffer(model, name) -> Optional[List[float]]:
    value = getattr(model, name, None)
    return [float(v) for v in value.flatten()] if isinstance(value, torch.Tensor) else None


def _input_rows(model, config, expected: dict) -> List[Tuple[str, object, object]]:
    """(config key, value, expected) for the input format and mean/std of a run: from a yacs config (INPUT.FORMAT,
    MODEL.PIXEL_MEAN/STD), a LazyConfig (model.pixel_mean/std, model.input_format, the data loaders' mapper
    image_format), or without a config from the model (pixel_mean / pixel_std buffers, input_format)."""
    fmt, mean, std = expected["format"], expected["pixel_mean"], expected["pixel_std"]
    if config is not None and hasattr(config, "INPUT") and hasattr(config, "MODEL"):  # yacs
        return [("INPUT.FORMAT", config.INPUT.FORMAT, fmt), ("MODEL.PIXEL_MEAN", config.MODEL.PIXEL_MEAN, mean),
                ("MODEL.PIXEL_STD", config.MODEL.PIXEL_STD, std)]
    if config is not None:  # LazyConfig
        from omegaconf import OmegaConf

        def get(key):
            value = OmegaConf.select(config, key, default=None)
            return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value

        return [(key, get(key), want) for key, want in (
            ("model.pixel_mean", mean), ("model.pixel_std", std), ("model.input_format", fmt),
            ("dataloader.train.mapper.image_format", fmt), ("dataloader.test.mapper.image_format", fmt))]
    return [("MODEL.PIXEL_MEAN / model.pixel_mean", _buffer(model, "pixel_mean"), mean),
            ("MODEL.PIXEL_STD / model.pixel_std", _buffer(model, "pixel_std"), std),
            ("INPUT.FORMAT / model.input_format", getattr(model, "input_format", None), fmt)]


def _current_input(model, config) -> Optional[dict]:
    """The input a run trains on (format, pixel_mean, pixel_std), recorded in its checkpoints; None if unknown."""
    rows = {key.split(" ")[0]: value for key, value, _ in _input_rows(model, config, RESNEST_INPUT)}
    fmt = rows.get("INPUT.FORMAT") or rows.get("dataloader.train.mapper.image_format") or rows.get(
        "model.input_format")
    mean, std = _buffer(model, "pixel_mean"), _buffer(model, "pixel_std")
    if not isinstance(fmt, str) or mean is None or std is None:
        return None
    return {"format": fmt, "pixel_mean": mean, "pixel_std": std}


def _is_trunk_key(key: str) -> bool:
    return key.startswith(_TRUNK_ROOTS)


def _inner(data: dict) -> dict:
    for wrapper in ("model", "blobs", "state_dict"):
        if isinstance(data.get(wrapper), dict):
            return data[wrapper]
    return data


def _foreign(weights: dict) -> str:
    from ..convert.arch import describe_foreign

    try:
        return describe_foreign(weights)
    except Exception:  # odd values (not tensors): say nothing more than that
        return "not a ResNeSt"


def _is_resnest(weights: dict) -> bool:
    try:
        detect_naming(k for k in weights if isinstance(k, str))
        return True
    except ValueError:
        return False
