"""Safe checkpoint reading and atomic writing.

Nothing we are handed is executed:
- torch files (zip or legacy `.pth`/`.pt`/`.bin`/`.ckpt`/`.pyth`/`.pth.tar`) go through
  torch.load(weights_only=True), which admits tensors and plain containers (plus, here, numpy arrays and
  argparse.Namespace, both data only); refused on torch < 2.6, where that loading has a known bypass;
- pickles (detectron2 `.pkl`) go through an unpickler that admits only numpy arrays and plain containers;
- `.safetensors` go through safetensors (no pickle at all).
The reader is chosen from the file's first bytes, not its name (a detectron2 pickle renamed `.pth` is still
read with the restricted unpickler), and anything that is not a checkpoint (an HTML page from a failed
download, a Git LFS pointer, an image, an empty or truncated file) is named as such. A file that needs
anything else is refused with a message naming it; nothing in it runs.

Writing: to a temporary file in the destination's folder, flushed to disk, then renamed over the target, so
a crash leaves the old file or the new one, never half of one.
"""
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not what was expected."""


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler met a global it does not admit (the file asked for code, not data)."""


# (module, name) pairs a detectron2 / Detectron .pkl of weights legitimately needs: numpy arrays, dtypes,
# scalars, written by numpy 1 (numpy.core) or numpy 2 (numpy._core), pickle protocols 2 to 5.
_NUMPY_CORE = ("numpy.core", "numpy._core")
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol 2 written by Python 3 encodes bytes as _codecs.encode(str, "latin1")
    *{(f"{core}.multiarray", name) for core in _NUMPY_CORE for name in ("_reconstruct", "scalar")},
    *{(f"{core}.numeric", "_frombuffer") for core in _NUMPY_CORE},  # protocol 5
    *{("numpy.dtypes", f"{kind}DType") for kind in ("Float16", "Float32", "Float64", "Int8", "Int16",
                                                    "Int32", "Int64", "UInt8", "UInt16", "UInt32",
                                                    "UInt64", "Bool")},
}
# Extensions we read. The reader itself is picked from the content.
_EXTENSIONS = (".pkl", ".pth", ".pt", ".bin", ".ckpt", ".pyth", ".tar", ".safetensors")
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's legacy magic number
_MIN_SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) before 2.6 could be bypassed (CVE-2025-32434)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {str(pid)[:40]!r} (torch storages pickled outside torch.save)")


def _read_pkl(path: str) -> Any:
    with open(path, "rb") as f:
        return _ArraysOnlyUnpickler(f, encoding="latin1").load()


def _torch_version() -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])


def _torch_safe_globals() -> list:
    """numpy arrays (as the .pkl reader admits) and argparse.Namespace (timm/mmcv training checkpoints
    store their arguments in one): data-only classes, allowlisted for weights_only loading."""
    import argparse

    entries = [argparse.Namespace, np.ndarray, np.dtype]
    for module, name in sorted(_PKL_ALLOWED):
        if module.startswith("numpy"):
            obj = _numpy_global(module, name)
            if obj is not None:
                entries.append((obj, f"{module}.{name}"))
    return entries


def _numpy_global(module: str, name: str):
    import importlib

    for candidate in (module, module.replace("numpy.core", "numpy._core"),
                      module.replace("numpy._core", "numpy.core")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    return None


def _read_torch(path: str, allow: Sequence = (), map_location="cpu") -> Any:
    if _torch_version() < _MIN_SAFE_TORCH:
        raise CheckpointError(f"{path}: refused: torch {torch.__version__} cannot read pickled torch files safely "
                              "(torch.load(weights_only=True) has a known bypass before torch 2.6, CVE-2025-32434); "
                              "upgrade torch (>= 2.6), or convert the file to .safetensors where it is trusted")
    with torch.serialization.safe_globals(_torch_safe_globals() + list(allow)):
        return torch.load(path, map_location=map_location, weights_only=True)


def verify_weights_only(path: str) -> None:
    """Check that a file just written with torch.save reads back with the safe reader (memory-mapped, so
    cheap): a checkpoint that holds other objects could never be resumed from. Raises CheckpointError."""
    try:
        safe_globals = getattr(torch.serialization, "safe_globals", None)
        if safe_globals is None:
            torch.load(path, map_location="cpu", weights_only=True)
            return
        with safe_globals(_torch_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        what = _torch_refusal(exc) or str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refusing to save a checkpoint that holds {what}: it could not be "
                              "loaded back by the weights-only reader (keep checkpoint state to tensors, "
                              "numbers, strings and plain containers)") from None


def _read_safetensors(path: str) -> Any:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _sniff(path: str) -> str:
    """What the file is, from its first bytes: a reader name, or a description of what it is instead."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        return "an empty file"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch"  # torch's zip format (torch.save since 1.6)
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"  # torch's legacy (pre-1.6) format
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 10 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 27:
        if int.from_bytes(head[:8], "little") > size - 8:
            return "a truncated safetensors file (an interrupted download or copy?)"
        return "safetensors"
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull` in the repository it came from)"
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML/XML page, not a checkpoint (a failed or redirected download?)"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head.startswith(b"GIF8"):
        return "an image, not a checkpoint"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive, not a checkpoint (decompress it first)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive, not a checkpoint (extract it first)"
    if head[:1] in (b"(", b"}", b"]", b"c"):  # protocol 0/1 pickles (Python 2 era)
        return "pickle"
    if head.startswith((b"{", b"[")):
        return "a JSON/text file, not a checkpoint"
    return "unknown"


_READERS: Dict[str, Callable[[str], Any]] = {"torch": _read_torch, "pickle": _read_pkl,
                                             "safetensors": _read_safetensors}
_BY_EXTENSION = {".pkl": "pickle", ".safetensors": "safetensors"}  # others: torch


def _torch_refusal(exc: Exception) -> Optional[str]:
    """The global a weights_only load refused, from torch's (long) message; None if it was no refusal."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global: ([\w.]+)", text, re.I)
    if match:
        return match.group(1)
    match = re.search(r"checkpoint asks for (getattr\(.*?\))", text)  # an allowlisted gadget refused it
    if match:
        return match.group(1)
    return None


def read_checkpoint(path: str, allow: Sequence = (), map_location="cpu") -> Any:
    """Read a checkpoint file safely and return what it holds (dicts, lists, tensors, arrays, numbers).

    `allow`: extra globals admitted for torch files, each a data-only class or a (function, "module.name")
    pair, exactly as torch.serialization.safe_globals takes them (mmengine's checkpoints need a few: see
    mm/compat.py). `map_location` is passed to torch.load.
    Raises CheckpointError naming the file and the reason: missing, not a checkpoint, unsafe content,
    truncated or corrupt."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    ext = _extension(path)
    if ext not in _EXTENSIONS:
        kind = _sniff(path)
        what = "" if kind in _READERS or kind == "unknown" else f" (it is {kind})"
        raise CheckpointError(f"{path}: unknown checkpoint format {ext or '(no extension)'}{what}; expected "
                              f"one of {', '.join(_EXTENSIONS)}")
    kind = _sniff(path)
    if kind == "unknown":
        kind = _BY_EXTENSION.get(ext, "torch")
    if kind not in _READERS:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: it is {kind}")
    try:
        if kind == "torch":
            return _read_torch(path, allow, map_location)
        return _READERS[kind](path)
    except CheckpointError:
        raise
    except _Refused as exc:
        raise CheckpointError(_refused_message(path, str(exc))) from None
    except pickle.UnpicklingError as exc:
        refused = _torch_refusal(exc) if kind == "torch" else None
        if refused:
            raise CheckpointError(_refused_message(path, refused)) from None
        raise CheckpointError(_corrupt_message(path, kind, exc)) from None
    except MemoryError:
        raise CheckpointError(f"{path}: ran out of memory reading it (a corrupt size field?)") from None
    except Exception as exc:  # EOFError, zip/RuntimeError, OSError, safetensors' own errors, ...
        raise CheckpointError(_corrupt_message(path, kind, exc)) from None


def _extension(path: str) -> str:
    name = os.path.basename(path).lower()
    return ".tar" if name.endswith(".pth.tar") else os.path.splitext(name)[1]


def _refused_message(path: str, what: str) -> str:
    return (f"{path}: refused: the file asks for {what}, which is not weight data (a checkpoint may hold "
            "only tensors, numpy arrays and plain containers) and loading it could run code. Nothing in the "
            "file was executed. If you trust its origin, re-save just its weights (state_dict) with "
            "torch.save or safetensors.")


def _corrupt_message(path: str, kind: str, exc: Exception) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = detail.split(". ")[0]
    if isinstance(exc, EOFError) or "truncated" in detail or "central directory" in detail:
        why = "truncated (an interrupted download or copy?)"
    else:
        why = "corrupt or not a checkpoint"
    return (f"{path}: cannot be read as a {kind} checkpoint: {why} ({type(exc).__name__}: "
            f"{detail[:200]}). Re-download or re-create it.")


@dataclass
class Checkpoint:
    """A checkpoint read safely: what the file holds, its flat weights, and its safetensors metadata."""
    path: str
    data: Any
    weights: Dict[str, torch.Tensor]
    metadata: Optional[Dict[str, str]] = None


def open_checkpoint(path: str) -> Checkpoint:
    """read_checkpoint + the flat {name: tensor} weights (unwrapped as load_state_dict does) + metadata."""
    data = read_checkpoint(path)
    return Checkpoint(os.fspath(path), data, _unwrap(data, path), safetensors_metadata(path))


def safetensors_metadata(path: str) -> Optional[Dict[str, str]]:
    """The string metadata of a .safetensors file (None for other files)."""
    if _sniff(os.fspath(path)) != "safetensors":
        return None
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata()


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint safely and return its flat {name: tensor} weights.

    Accepts a bare state_dict or one wrapped in "state_dict" / "model" / "model_state" / "blobs"
    (detectron2, mmdet, timm, pycls, Detectron checkpoints), with numpy arrays or tensors."""
    return _unwrap(read_checkpoint(path), path)


_WRAPPERS = ("state_dict", "model", "model_state", "blobs")


def _unwrap(data: Any, path: str) -> Dict[str, torch.Tensor]:
    for wrapper in _WRAPPERS:
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data:
        what = "an empty dict" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a dict of weights")
    weights = OrderedDict()
    for key, value in data.items():
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise CheckpointError(f"{path}: entry {key!r} is a numpy array of dtype {value.dtype}, "
                                      "not numeric weights")
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a weight tensor")
        weights[key] = value
    return weights


def atomic_write(path: str, write, force: bool = False) -> None:
    """Write through `write(tmp_path)` to a temporary file in the same folder, then rename over `path`.

    A crash leaves either the old file or the new one, never half of one (temporary files are named
    `<name>.<random>.tmp` and are removed unless the process is killed). Refuses to replace an existing
    file unless `force` (also when it appears while writing). The new file gets the usual permissions
    (0666 minus the umask; those of the file it replaces, if any)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; give a file name")
    if os.path.lexists(path) and not force:
        raise CheckpointError(f"{path} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        os.chmod(tmp, _new_file_mode(path))
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
        _fsync_folder(folder)
    except OSError as exc:  # writing `path` failed: name it, not the temporary file
        raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _new_file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _rename_no_replace(tmp: str, path: str) -> None:
    # link() fails if the target exists, so a file created meanwhile is never replaced.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise CheckpointError(f"{path} exists; pass --force to overwrite it") from None
    except OSError:  # a filesystem without hard links
        if os.path.lexists(path):
            raise CheckpointError(f"{path} exists; pass --force to overwrite it") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def _fsync_folder(folder: str) -> None:
    # Make the rename itself durable (a power cut right after it must not bring the old entry back).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_d2_pkl(weights: Dict[str, torch.Tensor], path: str, force: bool = False, **meta) -> None:
    """detectron2 format: {"model": {name: ndarray}, "__author__", "matching_heuristics": True, **meta}.

    matching_heuristics lets DetectionCheckpointer match our backbone-relative names to the model's
    (backbone.bottom_up.* in FPN models, backbone.* in others) by longest dot-separated suffix."""
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in weights.items()},
               "__author__": "resnest-backbone", "matching_heuristics": True, **meta}

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)

    atomic_write(path, write, force)


def save_torch(weights: Dict[str, torch.Tensor], path: str, force: bool = False, **meta) -> None:
    """A .pth with {"state_dict": ..., "meta": ...} (mmengine's layout), or a .safetensors file (metadata
    values that are not strings are stored as JSON)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    if path.endswith(".safetensors"):
        import json

        from safetensors.torch import save_file

        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=text), force)
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": weights, "meta": meta}, tmp), force)
