"""Patch the two source distributions we build ourselves so they install on this stack.

    python patch_sdists.py detectron2 SRC_DIR   # unpacked pb1-detectron2-0.6 (upstream v0.6, no C++ sources)
    python patch_sdists.py mmcv SRC_DIR         # unpacked mmcv-2.1.0
    python patch_sdists.py key detectron2       # a digest of that package's patches (the wheel cache key)

Each patch is one small function with a comment saying why it is needed. Patching is idempotent: a patch
that finds its target already changed does nothing, and one that finds neither form fails loudly (the
sdist is not the one we know, so nothing is guessed).
"""
import pathlib
import re
import sys


def _replace(path: pathlib.Path, old: str, new: str, *, regex: bool = False, done: str = None) -> None:
    """Replace `old` by `new` in `path`. Already patched: `done` (default `new`) is in the file and `old` is
    not, or `done` is given and found (for a replacement that contains `old`, e.g. a guarded import)."""
    text = path.read_text()
    if done is not None and done in text:
        return
    patched = re.sub(old, new, text) if regex else text.replace(old, new)
    if patched == text and new not in text:
        sys.exit(f"patch_sdists: expected {old!r} in {path}, found neither it nor its replacement")
    path.write_text(patched)


# ----------------------------------------------------------------------------------------------------------
# detectron2 v0.6 (PyPI pb1-detectron2==0.6)
# ----------------------------------------------------------------------------------------------------------
def d2_no_extension(root: pathlib.Path) -> None:
    # The sdist ships setup.py's extension list but not the csrc/ it compiles. Without C++ sources the
    # build fails, so build a pure-Python package (d2_optional_extension makes it work without _C).
    _replace(root / "setup.py", "ext_modules=get_extensions(),", "ext_modules=[],")


def d2_ship_model_zoo_configs(root: pathlib.Path) -> None:
    # get_model_zoo_configs() globs a top-level configs/ that the sdist does not have (the configs already
    # sit in detectron2/model_zoo/configs), so the wheel would ship no yaml and model_zoo.get_config_file
    # would fail. Declare them as package data relative to the package instead.
    _replace(
        root / "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    )


def d2_pillow_10(root: pathlib.Path) -> None:
    # Pillow 10 removed Image.LINEAR (it was an alias of BILINEAR); ExtentTransform uses it as a default.
    _replace(root / "detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")


def d2_numpy_aliases(root: pathlib.Path) -> None:
    # NumPy 1.24 removed the deprecated aliases np.int/np.float/np.bool/np.object/np.str. They are plain
    # builtins with the same meaning, so replace them (only the exact alias, not np.int64 etc.).
    for path in (root / "detectron2").rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"\bnp\.(int|float|bool|object|str)\b(?!_|\d)", r"\1", text)
        if new != text:
            path.write_text(new)


def d2_optional_extension(root: pathlib.Path) -> None:
    # Upstream main works without the C++ extension: `import detectron2._C` fails, the environment report says
    # "detectron2._C not built correctly", COCOEvaluator falls back to pycocotools ("Fast COCO eval is not
    # built"), and only the ops that need the extension fail, when used. v0.6 imports _C at module level in three
    # layers modules and in the fast COCO evaluator, so without it nothing imports. Backport main's behaviour:
    # no detectron2/_C at all, a guarded import in the layers (an op that needs the extension raises ImportError
    # naming it), and main's fallback in COCOEvaluator.
    guard = (
        "try:\n"
        "    from detectron2 import _C\n"
        "except ImportError:  # resnest-backbone build: no C++ extension; fail when an op is used (as upstream main)\n"
        "    class _MissingExtension:\n"
        "        def __getattr__(self, name):\n"
        "            raise ImportError(f\"detectron2._C.{name} is not available: this detectron2 was built without \"\n"
        "                              \"its C++ extension (rotated boxes and deformable convs need it)\")\n"
        "\n"
        "    _C = _MissingExtension()\n"
    )
    for name in ("rotated_boxes.py", "roi_align_rotated.py", "deform_conv.py"):
        _replace(root / "detectron2/layers" / name, "from detectron2 import _C\n", guard, done="_MissingExtension")
    coco = root / "detectron2/evaluation/coco_evaluation.py"
    _replace(coco, "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
             "try:\n    from detectron2.evaluation.fast_eval_api import COCOeval_opt\n"
             "except ImportError:\n    COCOeval_opt = COCOeval\n", done="    COCOeval_opt = COCOeval\n")
    _replace(coco, "        self._use_fast_impl = use_fast_impl\n",
             "        if use_fast_impl and (COCOeval_opt is COCOeval):\n"
             "            self._logger.info(\"Fast COCO eval is not built. Falling back to official COCO eval.\")\n"
             "            use_fast_impl = False\n"
             "        self._use_fast_impl = use_fast_impl\n", done="Fast COCO eval is not built")


def d2_optional_caffe2(root: pathlib.Path) -> None:
    # detectron2.export imports its Caffe2 exporter, and with it caffe2 (no longer part of torch), at import
    # time, so detectron2.utils.analysis (tools/analyze_model.py: FLOP counting) cannot import. Upstream main
    # imports the Caffe2 API only when caffe2 is there; do the same.
    _replace(root / "detectron2/export/__init__.py", "from .api import *\n",
             "try:\n    from caffe2.proto import caffe2_pb2 as _tmp  # caffe2 is optional (as upstream main)\n"
             "except ImportError:\n    pass\nelse:\n    from .api import *\n", done="caffe2 is optional")


# ----------------------------------------------------------------------------------------------------------
# mmcv 2.1.0
# ----------------------------------------------------------------------------------------------------------
def mmcv_cxx20(root: pathlib.Path) -> None:
    # torch 2.14's C++ headers need C++20 (they refuse -std=c++17); the CPU ops build passes -std=c++17.
    _replace(root / "setup.py", r"'-std=c\+\+1[47]'", "'-std=c++20'", regex=True)


PATCHES = {
    "detectron2": [d2_no_extension, d2_ship_model_zoo_configs, d2_pillow_10, d2_numpy_aliases, d2_optional_extension,
                   d2_optional_caffe2],
    "mmcv": [mmcv_cxx20],
}

def patch_key(target: str) -> str:
    """A digest of the code that patches `target`: setup_env.sh keeps built wheels under it, so changing a
    package's patches rebuilds that package (and only that one)."""
    import hashlib
    import inspect

    sources = [inspect.getsource(f) for f in (_replace, *PATCHES[target])]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:12]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "key" and sys.argv[2] in PATCHES:
        print(patch_key(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) != 3 or sys.argv[1] not in PATCHES:
        sys.exit(__doc__)
    src = pathlib.Path(sys.argv[2])
    for patch in PATCHES[sys.argv[1]]:
        patch(src)
        print(f"patch_sdists: {sys.argv[1]}: {patch.__name__}")
