"""Patch the two source distributions we build ourselves so they install on this stack.

    python patch_sdists.py detectron2 SRC_DIR   # unpacked pb1-detectron2-0.6 (upstream v0.6, no C++ sources)
    python patch_sdists.py mmcv SRC_DIR         # unpacked mmcv-2.1.0

Each patch is one small function with a comment saying why it is needed. Patching is idempotent: a patch
that finds its target already changed does nothing, and one that finds neither form fails loudly (the
sdist is not the one we know, so nothing is guessed).
"""
import pathlib
import re
import sys


def _replace(path: pathlib.Path, old: str, new: str, *, regex: bool = False) -> None:
    text = path.read_text()
    patched = re.sub(old, new, text) if regex else text.replace(old, new)
    if patched == text and new not in text:
        sys.exit(f"patch_sdists: expected {old!r} in {path}, found neither it nor its replacement")
    path.write_text(patched)


# ----------------------------------------------------------------------------------------------------------
# detectron2 v0.6 (PyPI pb1-detectron2==0.6)
# ----------------------------------------------------------------------------------------------------------
def d2_no_extension(root: pathlib.Path) -> None:
    # The sdist ships setup.py's extension list but not the csrc/ it compiles. Without C++ sources the
    # build fails, so build a pure-Python package and provide detectron2/_C.py below instead.
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


_C_STANDIN = '''"""Pure-Python stand-in for detectron2's C++ extension (this build has no C++ sources).

Every op of the real extension is named here and raises NotImplementedError saying which op and what to
use instead, so an unsupported path fails clearly instead of with an AttributeError deep in a model.
Nothing on the ResNeSt detection / segmentation path needs these ops (torchvision provides nms and
roi_align); only rotated boxes, deformable convs and the fast COCO evaluator do.
"""

_ALTERNATIVES = {
    "InstanceAnnotation": "COCOEvaluator(..., use_fast_impl=False)",
    "COCOevalEvaluateImages": "COCOEvaluator(..., use_fast_impl=False)",
    "COCOevalAccumulate": "COCOEvaluator(..., use_fast_impl=False)",
}


def _missing(name):
    def op(*args, **kwargs):
        hint = _ALTERNATIVES.get(name, "a detectron2 build with its C++ extension")
        raise NotImplementedError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its C++ "
            f"extension (resnest-backbone's pure-Python build). Use {hint}."
        )

    op.__name__ = name
    return op


for _name in [
    "InstanceAnnotation", "COCOevalEvaluateImages", "COCOevalAccumulate",
    "box_iou_rotated", "nms_rotated", "roi_align_rotated_forward", "roi_align_rotated_backward",
    "deform_conv_forward", "deform_conv_backward_input", "deform_conv_backward_filter",
    "modulated_deform_conv_forward", "modulated_deform_conv_backward",
    "get_compiler_version", "get_cuda_version",
]:
    globals()[_name] = _missing(_name)


def has_cuda():
    return False
'''


def d2_python_C(root: pathlib.Path) -> None:
    # detectron2.layers imports `from detectron2 import _C` at module level; give it a module whose ops
    # raise a clear NotImplementedError naming the op.
    (root / "detectron2/_C.py").write_text(_C_STANDIN)


# ----------------------------------------------------------------------------------------------------------
# mmcv 2.1.0
# ----------------------------------------------------------------------------------------------------------
def mmcv_cxx20(root: pathlib.Path) -> None:
    # torch 2.14's C++ headers need C++20 (they refuse -std=c++17); the CPU ops build passes -std=c++17.
    _replace(root / "setup.py", r"'-std=c\+\+1[47]'", "'-std=c++20'", regex=True)


PATCHES = {
    "detectron2": [d2_no_extension, d2_ship_model_zoo_configs, d2_pillow_10, d2_numpy_aliases, d2_python_C],
    "mmcv": [mmcv_cxx20],
}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in PATCHES:
        sys.exit(__doc__)
    src = pathlib.Path(sys.argv[2])
    for patch in PATCHES[sys.argv[1]]:
        patch(src)
        print(f"patch_sdists: {sys.argv[1]}: {patch.__name__}")
