"""A DetectionCheckpointer that never executes a checkpoint, never loads a trunk of another architecture or
half a trunk, and never leaves a half-written checkpoint. A thin shell over resnest_backbone.convert.

- Reading: every file goes through convert.read_checkpoint (`.pkl` through an unpickler that admits only
  numpy arrays and plain containers, `.pth` through torch.load(weights_only=True), `.safetensors` through
  safetensors); detectron2's own loader pickle.loads `.pkl` files, which runs whatever code they carry.
- Weights: prepared for the model by convert.prepare_state_dict, as by every loader. A bare ResNeSt trunk in
  any known naming (official/timm, our converter's `.pkl`, mmdet, the detectron2-ResNeSt fork) is renamed to
  the model's own keys (e.g. `backbone.bottom_up.layer1.0.conv2.fc1.weight`), so it loads by exact name
  instead of by detectron2's suffix heuristics (which skip a wrong-shape tensor with only a log line); files
  that ask for the heuristics (the `matching_heuristics` flag, or `file.pkl?matching_heuristics=True` as on
  detectron2 main) are aligned first. Then, before anything is copied, every trunk tensor is compared by
  name and shape and the architecture the file records (or its official / timm name says) with the trunk's:
  a missing or wrong-shape trunk tensor refuses the file (CheckpointError naming it and the first keys), as
  does another architecture (`avd_first` is invisible in the weights). Heads may still differ (fine-tuning
  to other classes). `checkpointer.strict_backbone = False` loads a partial trunk (detectron2 then logs
  what it skipped).
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
import functools
import logging
import os
from typing import List, Optional, Tuple
from urllib.parse import parse_qs, urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

from ..convert.arch import RECORD_KEY, model_record
from ..convert.io import (Checkpoint, CheckpointError, _unwrap, atomic_write, read_checkpoint, safetensors_metadata,
                          verify_weights_only)
from ..convert.load import find_trunk, prepare_state_dict
from ..convert.naming import detect_naming
from ..convert.sources import resolve_checkpoint
from ..guards import INPUT_KEY, RESNEST_INPUT, arm_random_heads, check_input, logger_log, random_parts
from .compat import reset_parsed_url

_OVERRIDE = "set checkpointer.strict_backbone = False to load what fits"
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
        """detectron2's formats read safely; the weights prepared for the model by convert (renamed to its
        keys, the trunk checked before anything is copied): convert.prepare_state_dict."""
        data = read_checkpoint(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename}: holds a {type(data).__name__}, not a checkpoint dict")
        self._loading = filename
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
        if self._trunk() is not None:
            self._convert_ndarray_to_tensor(out["model"])
            # detectron2's own alignment, run by prepare_state_dict before it compares the trunk
            align = functools.partial(align_and_update_state_dicts, self.model.state_dict(),
                                      c2_conversion=out.get("__author__") == "Caffe2")
            prepared = prepare_state_dict(
                self.model, Checkpoint(filename, data, out["model"], safetensors_metadata(filename)),
                whole_model=True, strict=self.strict_backbone, hint=_OVERRIDE,
                align=align if out.pop("matching_heuristics", False) else None)
            out["model"] = prepared.weights
            log = self.logger.info if prepared.report.complete else self.logger.warning
            log("\n".join(prepared.report.lines()))
        return out

    def _trunk(self):
        """(name, module) of the model's one ResNeSt trunk, or None."""
        try:
            return find_trunk(self.model)
        except CheckpointError:
            return None

    def _load_model(self, checkpoint):
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


def _inner(data: dict) -> dict:
    for wrapper in ("model", "blobs", "state_dict"):
        if isinstance(data.get(wrapper), dict):
            return data[wrapper]
    return data


def _is_resnest(weights: dict) -> bool:
    try:
        detect_naming(k for k in weights if isinstance(k, str))
        return True
    except ValueError:
        return False
