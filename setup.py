import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def package_configs():
    """Ship the top-level configs/ inside the package (resnest_backbone/configs), so that
    resnest_backbone.d2.get_config_file("faster_rcnn_resnest50_fpn.yaml") works after a pip install: a
    symlink in a checkout, a copy where symlinks are not possible (as detectron2 ships its model zoo)."""
    source = os.path.join(HERE, "configs")
    target = os.path.join(HERE, "resnest_backbone", "configs")
    if os.path.isdir(source):
        if os.path.islink(target):
            os.unlink(target)
        elif os.path.isdir(target):
            shutil.rmtree(target)
        try:
            os.symlink(os.path.join("..", "configs"), target)
        except OSError:
            shutil.copytree(source, target)
    files = [p for ext in ("yaml", "py") for p in glob.glob(os.path.join(target, "**", f"*.{ext}"), recursive=True)]
    return [os.path.relpath(p, os.path.join(HERE, "resnest_backbone")) for p in files]


setup(
    name="resnest-backbone",
    version="0.1.0",
    description="ResNeSt (split-attention networks) backbone for detectron2 and mmdetection/mmsegmentation",
    packages=find_packages(include=["resnest_backbone", "resnest_backbone.*"]),
    package_data={"resnest_backbone": package_configs()},
    python_requires=">=3.9",
    install_requires=["torch>=1.10", "numpy"],
    extras_require={
        # detectron2 itself is not on PyPI: tools/env/setup_env.sh builds it (see README).
        "detectron2": ["fvcore", "pycocotools", "opencv-python-headless", "matplotlib", "tqdm"],
        # setuptools<82: mmengine 0.10's Config resolves `mmdet::` / `mmseg::` bases through pkg_resources
        # (utils/package_utils.is_installed), which setuptools 82 removed; the configs here inherit mmdet's.
        "mm": ["mmengine>=0.10,<1", "mmdet==3.3.0", "mmsegmentation==1.2.2", "ftfy", "regex", "setuptools<82"],
        "export": ["onnx", "onnxruntime"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "resnest==0.0.5", "timm", "safetensors", "onnx", "onnxruntime",
                 "fvcore", "pycocotools", "opencv-python-headless", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["resnest-convert=resnest_backbone.convert.cli:main"]},
)
