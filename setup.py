from setuptools import find_packages, setup

setup(
    name="resnest-backbone",
    version="0.1.0",
    description="ResNeSt (split-attention networks) backbone for detectron2 and mmdetection/mmsegmentation",
    packages=find_packages(include=["resnest_backbone", "resnest_backbone.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=1.10", "numpy"],
    extras_require={
        # detectron2 itself is not on PyPI: tools/env/setup_env.sh builds it (see README).
        "detectron2": ["fvcore", "pycocotools", "opencv-python-headless", "matplotlib", "tqdm"],
        "mm": ["mmengine>=0.10,<1", "mmdet==3.3.0", "mmsegmentation==1.2.2", "ftfy", "regex"],
        "export": ["onnx", "onnxruntime"],
        "test": ["pytest", "hypothesis", "resnest==0.0.5", "timm", "safetensors", "onnx", "onnxruntime",
                 "fvcore", "pycocotools", "opencv-python-headless", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["resnest-convert=resnest_backbone.convert.cli:main"]},
)
