"""Safe checkpoint reading and atomic writing.

Nothing we are handed is executed: `.pth`/`.pt`/`.bin` go through torch.load(weights_only=True), detectron2
`.pkl` through an unpickler that admits only numpy arrays and plain containers, and `.safetensors` through
safetensors (no pickle at all). A file that needs anything else is refused with a message naming it.
"""
import os
import pickle
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Dict

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not what was expected."""


# (module, name) pairs a detectron2 / Detectron .pkl of weights legitimately needs.
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.dtypes", "Float32DType"), ("numpy.dtypes", "Float64DType"), ("numpy.dtypes", "Int64DType"),
    ("numpy.dtypes", "Float16DType"), ("numpy.dtypes", "Int32DType"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a weights file should hold only numpy arrays and plain "
            "containers, and loading this object could run code")


def _read_pkl(path: str) -> Any:
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _read_torch(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: str) -> Any:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


_READERS = {".pkl": _read_pkl, ".pth": _read_torch, ".pt": _read_torch, ".bin": _read_torch,
            ".ckpt": _read_torch, ".safetensors": _read_safetensors}


def read_checkpoint(path: str) -> Any:
    """Read a checkpoint file safely and return what it holds (dicts, lists, tensors, arrays, numbers).

    Raises CheckpointError naming the file and the reason: missing, unknown extension, unsafe content,
    truncated or corrupt."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if ext not in _READERS:
        raise CheckpointError(f"{path}: unknown checkpoint format {ext or '(no extension)'}; "
                              f"expected one of {', '.join(sorted(_READERS))}")
    try:
        data = _READERS[ext](path)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused: {exc}. Only weights are loaded from checkpoints; "
                              "nothing in the file was executed.") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a {ext} checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot be read as a {ext} checkpoint: {type(exc).__name__}: {exc}") \
            from None
    return data


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint safely and return its flat {name: tensor} weights.

    Accepts a bare state_dict or one wrapped in "state_dict" / "model" (detectron2, mmdet, timm training
    checkpoints), with numpy arrays or tensors."""
    return _unwrap(read_checkpoint(path), path)


def _unwrap(data: Any, path: str) -> Dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model", "blobs"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of weights")
    weights = OrderedDict()
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a weight tensor")
        weights[key] = value
    return weights


def atomic_write(path: str, write, force: bool = False) -> None:
    """Write through `write(tmp_path)` to a temporary file in the same folder, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one. Refuses to replace an existing
    file unless `force`."""
    if os.path.exists(path) and not force:
        raise CheckpointError(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_d2_pkl(weights: Dict[str, torch.Tensor], path: str, force: bool = False, **meta) -> None:
    """detectron2 format: {"model": {name: ndarray}, "__author__", "matching_heuristics": True}.

    matching_heuristics lets DetectionCheckpointer match our backbone-relative names to the model's
    (backbone.bottom_up.* in FPN models, backbone.* in others) by longest dot-separated suffix."""
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in weights.items()},
               "__author__": "resnest-backbone", "matching_heuristics": True, **meta}

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)

    atomic_write(path, write, force)


def save_torch(weights: Dict[str, torch.Tensor], path: str, force: bool = False, **meta) -> None:
    """A .pth with {"state_dict": ..., "meta": ...} (mmengine's layout), or a .safetensors file."""
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(weights, tmp, metadata={k: str(v) for k, v in meta.items()}),
                     force)
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": weights, "meta": meta}, tmp), force)
