"""The project's configs by name, from any working directory, in a checkout or a pip install (in the spirit
of detectron2.model_zoo). Framework-free: mmdet / mmseg users need no detectron2 for it.

    from resnest_backbone import get_config_file
    get_config_file("faster_rcnn_resnest50_fpn.yaml")                 # -> the file's path
    Config.fromfile(get_config_file("mmdet/faster-rcnn_resnest50_fpn_1x_coco.py"))   # mmengine
    resnest_backbone.d2.get_config("faster_rcnn_resnest50_fpn")       # a detectron2 config (CfgNode / LazyConfig)

`tools/train_net.py --config faster_rcnn_resnest50_fpn.yaml` resolves the name the same way. A path that
exists is used as it is; otherwise the name (with or without `.yaml` / `.py`, with or without a leading
`configs/`) is looked up among the project's configs: those shipped inside the package by setup.py (a pip
install), else the checkout's top-level `configs/` folder. yaml configs are at the top, the LazyConfig python
configs under `lazy/` (same model names: `lazy/faster_rcnn_resnest50_fpn.py`), mmdet / mmseg configs under
`mmdet/` / `mmseg/`; list_configs() names them all.
"""
import os
from typing import List

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
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
    """Names of the project's configs, relative to config_root() (detectron2 at the top, lazy/, mmdet/, mmseg/);
    not the `_base_` files the mmdet configs inherit."""
    root = config_root()
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "_base_"]
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


__all__ = ["config_root", "get_config_file", "list_configs"]
