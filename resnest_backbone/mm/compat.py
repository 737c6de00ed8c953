"""mmengine 0.10.7 with torch >= 2.6: let the Runner read back its own checkpoints, without unsafe pickle.

Since torch 2.6 `torch.load` defaults to `weights_only=True`. mmengine 0.10.7 (the newest release) calls
`torch.load(filename, map_location)` for local files, and its training checkpoints hold more than tensors:
the message hub's `HistoryBuffer`s (numpy arrays, and references to `HistoryBuffer.min/max/...` pickled as
`getattr(HistoryBuffer, 'min')`). So `load_from=` / `resume=True` fail with "Weights only load failed".

`allow_mmengine_checkpoints()` replaces mmengine's local-file loader by one that still loads with
`weights_only=True`, allowing, only for the duration of that load, exactly these extra globals:
  mmengine.logging.HistoryBuffer; numpy's array/scalar reconstruction (`_reconstruct`, `ndarray`, `dtype`,
  the concrete dtype classes, `scalar`); and a `getattr` that resolves only public methods of
  HistoryBuffer (a general getattr would be a code-execution gadget).
Nothing else changes: other classes are still refused with torch's own message. Applied when
`resnest_backbone.mm` is imported (what `custom_imports` in our configs does), only where needed.
"""
import os.path as osp
import pickle

import torch

_PATCHED = False


def _restricted_getattr(obj, name):
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith("_") \
            and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}); only HistoryBuffer's "
                                 "statistics methods are allowed")


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
    """mmengine's local checkpoint loader, with weights_only=True and mmengine's own types allowed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


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
