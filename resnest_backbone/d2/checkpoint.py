"""A DetectionCheckpointer that never executes a checkpoint and never leaves a half-written one.

- Loading: `.pkl` through an unpickler that admits only numpy arrays and plain containers, `.pth` through
  torch.load(weights_only=True), `.safetensors` through safetensors (detectron2's own loader pickle.loads
  `.pkl` files, which runs whatever code they carry).
- Saving: to a temporary file in the same folder, then renamed over the target (also the
  `last_checkpoint` tag), so a run killed at any moment leaves the previous checkpoint loadable.
"""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..convert.io import CheckpointError, atomic_write, read_checkpoint


class SafeDetectionCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename: str) -> dict:
        data = read_checkpoint(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename}: holds a {type(data).__name__}, not a checkpoint dict")
        if filename.endswith(".pkl"):
            if "model" in data and "__author__" in data:  # detectron2 model-zoo format
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if "model" not in data:
            data = {"model": data}
        return data

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
        atomic_write(save_file, lambda tmp: torch.save(data, tmp), force=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(last_filename_basename)

        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), write, force=True)
