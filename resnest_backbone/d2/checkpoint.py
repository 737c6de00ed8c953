"""A DetectionCheckpointer that never executes a checkpoint, never half-loads the ResNeSt trunk, and never
leaves a half-written checkpoint.

- Loading: every file goes through resnest_backbone.convert.read_checkpoint: `.pkl` through an unpickler
  that admits only numpy arrays and plain containers, `.pth` through torch.load(weights_only=True),
  `.safetensors` through safetensors (detectron2's own loader pickle.loads `.pkl` files, which runs
  whatever code they carry).
- Naming: a bare ResNeSt trunk in any known naming (official/timm `.pth`, `.safetensors`, our converter's
  `.pkl`, mmdet, the detectron2-ResNeSt fork) is renamed to the model's own keys (e.g.
  `backbone.bottom_up.layer1.0.conv2.fc1.weight`), so it loads by exact name instead of by detectron2's
  suffix heuristics (which skip a wrong-shape tensor with only a log line).
- Strict trunk: when the model holds a ResNeSt trunk, a checkpoint that leaves any trunk tensor missing or
  of the wrong shape is refused (CheckpointError naming the file and the first keys with shapes) before
  anything is copied. Heads may still differ (fine-tuning to other classes). Set
  `checkpointer.strict_backbone = False` to load such a file partially (detectron2 then logs what it
  skipped).
- Saving: to a temporary file in the same folder, checked to read back with the weights-only reader, then
  renamed over the target; `last_checkpoint` likewise. A run killed at any moment leaves the previous
  checkpoint and tag intact (stray `*.tmp` files are never picked up: detectron2 only lists `*.pth`).
"""
import os
from typing import Dict, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..convert.convert import describe_foreign, read_arch, variants_matching
from ..convert.io import CheckpointError, _unwrap, atomic_write, read_checkpoint, verify_weights_only
from ..convert.naming import OFFICIAL, detect_naming

_TRUNK_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "fc.")


class SafeDetectionCheckpointer(DetectionCheckpointer):
    strict_backbone = True  # refuse checkpoints that do not fill the ResNeSt trunk completely

    def _load_file(self, filename: str) -> dict:
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
            return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
        elif isinstance(data.get("model"), dict):  # detectron2 training checkpoint
            out = data
        else:  # a bare state_dict, or one wrapped in "state_dict" (mmdet, timm)
            out = {"model": dict(_unwrap(data, filename))}
        self._place_trunk(out, filename)
        return out

    def _trunk_name(self) -> Optional[str]:
        from ..core import ResNeSt

        names = [name for name, m in self.model.named_modules() if isinstance(m, ResNeSt)]
        return names[0] if len(names) == 1 else None

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
        trunk = self._trunk_name()
        if self.strict_backbone and trunk is not None and not checkpoint.get("matching_heuristics", False):
            self._check_trunk(checkpoint["model"], trunk)  # before anything is copied
        incompatible = super()._load_model(checkpoint)
        if self.strict_backbone and trunk is not None and incompatible is not None:
            prefix = trunk + "." if trunk else ""
            missing = [k for k in incompatible.missing_keys
                       if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
            shapes = [f"{k}: checkpoint {list(a)}, model {list(b)}" for k, a, b in incompatible.incorrect_shapes
                      if k.startswith(prefix)]
            if missing or shapes:
                unexpected = [f"unexpected {k}" for k in incompatible.unexpected_keys
                              if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
                raise self._trunk_error(trunk, shapes, [f"missing {k}" for k in missing], unexpected, {},
                                        after_load=True)
        return incompatible

    def _check_trunk(self, weights: Dict[str, torch.Tensor], trunk: str) -> None:
        prefix = trunk + "." if trunk else ""
        state = self.model.state_dict()
        found = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
        missing, shapes = [], []
        unexpected = [f"unexpected {k} {list(v.shape)}" for k, v in found.items()
                      if k.startswith(prefix) and k not in state and not k.endswith("num_batches_tracked")]
        for key, value in state.items():
            if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
                continue
            if key not in found:
                missing.append(f"missing {key} {list(value.shape)}")
            elif tuple(found[key].shape) != tuple(value.shape):
                shapes.append(f"{key}: checkpoint {list(found[key].shape)}, model {list(value.shape)}")
        if missing or shapes or unexpected:
            ckpt_trunk = {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}
            raise self._trunk_error(trunk, shapes, missing, unexpected, ckpt_trunk or found)

    def _trunk_error(self, trunk, shapes, missing, unexpected, ckpt_trunk, after_load=False) -> CheckpointError:
        detected = "?"
        if ckpt_trunk:
            try:
                detected = ", ".join(variants_matching(read_arch(ckpt_trunk))) or "no known ResNeSt variant"
            except (CheckpointError, ValueError, TypeError) as exc:
                detected = (f"a ResNeSt trunk of unreadable architecture ({exc})" if _is_resnest(ckpt_trunk)
                            else describe_foreign(ckpt_trunk))
        problems = shapes + missing + unexpected
        return CheckpointError(
            f"{getattr(self, '_loading', 'checkpoint')}: does not fill the model's ResNeSt trunk "
            f"'{trunk or 'model'}': {len(shapes)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected "
            "(detected in the file: "
            f"{detected}); " + ("the model must be discarded" if after_load else "nothing was loaded")
            + ". Set checkpointer.strict_backbone = False to load it partially. First:\n  "
            + "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""))

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
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


def _is_trunk_key(key: str) -> bool:
    return key.startswith(_TRUNK_ROOTS)


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
