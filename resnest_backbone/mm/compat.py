"""Every mmengine workaround of the package, each applied explicitly by what needs it.

mmengine's local checkpoint loader (mmengine <= 0.10.7, the newest release; `runner/checkpoint.py`
`load_from_local`) calls `torch.load(filename, map_location)`:
- with torch >= 2.6 (`weights_only=True` by default) it cannot read back mmengine's own training checkpoints
  (`load_from=`, `resume=True`: "Weights only load failed"): they hold the message hub's `HistoryBuffer`s
  (numpy arrays, and references to `HistoryBuffer.min/max/...` pickled as `getattr(HistoryBuffer, 'min')`);
- with torch < 2.6 it unpickles whatever a file holds, which runs the code a crafted file carries.

`allow_mmengine_checkpoints()` registers the project's safe reader (resnest_backbone.convert.read_checkpoint,
weights-only; refused on torch < 2.6, whose weights-only loading has a known bypass) as mmengine's loader for
local files, through mmengine's own `CheckpointLoader.register_scheme`. For mmengine's checkpoints it admits,
only for the duration of that load, exactly these extra globals: mmengine.logging.HistoryBuffer; numpy's
array/scalar reconstruction (`_reconstruct`, `ndarray`, `dtype`, the concrete numeric dtype classes,
`scalar`); and a `getattr` that resolves only the statistics methods mmengine registers on HistoryBuffer by
default (min, max, mean, current). Nothing else: `register_statistics` (which would let a file change
HistoryBuffer's class-level method table), private names and other objects are refused, and other classes
with torch's own message. Applied by importing resnest_backbone.mm (what `custom_imports` in a config does),
as the documented purpose of that import besides the registries.
"""
import os.path as osp
import pickle

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


def allow_mmengine_checkpoints() -> None:
    """Register load_from_local as mmengine's loader for local paths (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)


__all__ = ["HISTORY_BUFFER_METHODS", "allow_mmengine_checkpoints", "load_from_local", "mmengine_safe_globals"]
