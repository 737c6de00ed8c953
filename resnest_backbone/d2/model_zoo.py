"""The project's configs by name, from any working directory, in a checkout or a pip install (in the spirit
of detectron2.model_zoo).

    from resnest_backbone.d2 import get_config, get_config_file
    get_config_file("faster_rcnn_resnest50_fpn.yaml")   # -> the file's path
    cfg = get_config("faster_rcnn_resnest50_fpn")        # a detectron2 CfgNode with MODEL.RESNEST.* added
    cfg = get_config("lazy/mask_rcnn_resnest50_fpn")     # a LazyConfig (python config, configs/lazy/)

`tools/train_net.py --config faster_rcnn_resnest50_fpn.yaml` resolves the name the same way. A path that
exists is used as it is; otherwise the name (with or without `.yaml` / `.py`, with or without a leading
`configs/`) is looked up among the project's configs: those shipped inside the package by setup.py (a pip
install), else the checkout's top-level `configs/` folder. yaml configs are at the top, the LazyConfig python
configs under `lazy/` (same model names: `lazy/faster_rcnn_resnest50_fpn.py`), mmdet / mmseg configs under
`mmdet/` / `mmseg/`; list_configs() names them all.
"""
import os
from typing import List

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOTS = (os.path.join(_PACKAGE, "configs"),  # pip install (setup.py ships configs/ inside the package)
          os.path.join(os.path.dirname(_PACKAGE), "configs"))  # a checkout (or an editable install)
_EXTENSIONS = (".yaml", ".py")


def config_root() -> str:
    """The folder the project's configs are read from."""
    for root in _ROOTS:
        if os.path.isdir(root):
            return os.path.realpath(root)
    raise FileNotFoundError(f"the project's configs are not installed (looked in {', '.join(_ROOTS)})")


def list_configs() -> List[str]:
    """Names of the project's configs, relative to config_root() (detectron2 at the top, mmdet/, mmseg/)."""
    root = config_root()
    names = []
    for folder, _, files in os.walk(root):
        names += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(_EXTENSIONS)]
    return sorted(names, key=lambda n: (os.sep in n, n))


def get_config_file(name: str) -> str:
    """The path of config `name`: an existing file as given, or one of the project's configs by name.
    Raises FileNotFoundError listing the available names."""
    name = os.fspath(name)
    if os.path.isfile(name):
        return name
    root = config_root()
    bare = name[len("configs/"):] if name.startswith("configs/") else name
    candidates = [bare] if bare.endswith(_EXTENSIONS) else [bare + ext for ext in _EXTENSIONS]
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"config {name!r}: no such file, and not one of the project's configs ({root}): "
                            + ", ".join(list_configs()))


def get_config(name: str):
    """A detectron2 config (get_resnest_cfg() + the yaml) for a project config name or path; a LazyConfig (a
    `.py` config, or the config.yaml a LazyConfig run saved) is loaded with detectron2's LazyConfig."""
    from .lazy import is_lazy_config

    path = get_config_file(name)
    if is_lazy_config(path):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from .train import get_resnest_cfg, merge_config

    cfg = get_resnest_cfg()
    merge_config(cfg, path)
    return cfg


__all__ = ["config_root", "get_config", "get_config_file", "list_configs"]
