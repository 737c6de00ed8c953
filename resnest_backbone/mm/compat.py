"""mmengine 0.10.7 with torch >= 2.6: let the Runner read back its own checkpoints, without unsafe pickle.

Since torch 2.6 `torch.load` defaults to `weights_only=True`. mmengine 0.10.7 (the newest release) calls
`torch.load(filename, map_location)` for local files, and its training checkpoints hold more than tensors:
the message hub's `HistoryBuffer`s (numpy arrays, and references to `HistoryBuffer.min/max/...` pickled as
`getattr(HistoryBuffer, 'min')`). So `load_from=` / `resume=True` fail with "Weights only load failed".

`allow_mmengine_checkpoints()` replaces mmengine's local-file loader by the project's safe reader
(resnest_backbone.convert.read_checkpoint, weights_only=True), allowing, only for the duration of that
load, exactly these extra globals:
  mmengine.logging.HistoryBuffer; numpy's array/scalar reconstruction (`_reconstruct`, `ndarray`, `dtype`,
  the concrete numeric dtype classes, `scalar`); and a `getattr` that resolves only the statistics methods
  mmengine registers on HistoryBuffer by default (min, max, mean, current), which are what its checkpoints
  reference. Nothing else: `register_statistics` (which would let a file change HistoryBuffer's class-level
  method table), private names and other objects are refused, and other classes with torch's own message. Applied when
`resnest_backbone.mm` is imported (what `custom_imports` in our configs does), only where needed.
"""
import os.path as osp
import pickle

import torch

_PATCHED = False


# The HistoryBuffer attributes mmengine's own checkpoints reference (its default statistics methods).
HISTORY_BUFFER_METHODS = ("min", "max", "mean", "current")


def _restricted_getattr(obj, name):
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer's "
                                 f"statistics methods {', '.join(HISTORY_BUFFER_METHODS)} are allowed")


def mmengine_safe_globals() -> list:
    """The extra globals an mmengine training checkpoint needs under torch.load(weights_only=True)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = getattr(np, "_core", None)
    multiarray = multiarray.multiarray if multiarray is not None else np.core.multiarray
    allowed = [HistoryBuffer, np.ndarray, np.dtype, (_restricted_getattr, "builtins.getattr")]
    for module in {multiarray.__name__, "numpy.core.multiarray", "numpy._core.multiarray"}:
        # numpy 1.x writes numpy.core.multiarray, numpy 2.x numpy._core.multiarray: accept both spellings
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: concrete dtype classes are pickled by name
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")
                    and name not in ("ObjectDType", "VoidDType")]
    return allowed


def load_from_local(filename, map_location=None):
    """mmengine's local checkpoint loader: the project's safe reader, with mmengine's own types allowed."""
    from ..convert.io import read_checkpoint

    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return read_checkpoint(filename, allow=mmengine_safe_globals(),
                           map_location="cpu" if map_location is None else map_location)


def allow_mmengine_checkpoints() -> bool:
    """Install the loader above for local paths in mmengine's CheckpointLoader (once). Returns whether it
    is installed: not on torch without `safe_globals` (< 2.5), whose default still reads everything."""
    global _PATCHED
    if _PATCHED:
        return True
    if not hasattr(torch.serialization, "safe_globals"):
        return False
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
    _PATCHED = True
    return True


__all__ = ["allow_mmengine_checkpoints", "load_from_local", "mmengine_safe_globals"]
