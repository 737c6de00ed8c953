"""COCO and ADE20K the way detectron2 users have them: under $DETECTRON2_DATASETS (default ./datasets), with
detectron2's folder layout. Framework-free: what the layouts are, where the root is, and the ADE20K label
conversion. The check that a run's datasets are on disk is detectron2's part (resnest_backbone.d2.datasets).

ADE20K: detectron2 reads ADEChallengeData2016/annotations_detectron2 (labels shifted by one, 255 = ignore),
which detectron2's datasets/prepare_ade20k_sem_seg.py writes from the official annotations/;
`python -m resnest_backbone.data.prepare_ade20k` does the same.
"""
import os
from typing import Optional

import numpy as np

LAYOUTS = {
    "coco": """  coco/
    annotations/instances_{train,val}2017.json
    {train,val}2017/       (images)""",
    "ade20k": """  ADEChallengeData2016/
    images/{training,validation}/*.jpg
    annotations/{training,validation}/*.png            (official labels, 0 = other)
    annotations_detectron2/{training,validation}/*.png (python -m resnest_backbone.data.prepare_ade20k)""",
}


def datasets_root() -> str:
    return os.getenv("DETECTRON2_DATASETS", "datasets")


class DatasetMissingError(FileNotFoundError):
    pass


def ade_to_detectron2(labels: np.ndarray) -> np.ndarray:
    """ADE20K label map (0 = other, 1..K) -> detectron2's (0..K-1, 255 = ignore), as detectron2's
    datasets/prepare_ade20k_sem_seg.py does."""
    out = labels.astype(np.int32) - 1
    out[out < 0] = 255
    return out.astype(np.uint8)


def prepare_ade20k(root: Optional[str] = None) -> str:
    """Write ADEChallengeData2016/annotations_detectron2 from annotations/ (label - 1, 0 -> 255)."""
    import cv2

    ade = os.path.join(root or datasets_root(), "ADEChallengeData2016")
    for split in ("training", "validation"):
        src, dst = os.path.join(ade, "annotations", split), os.path.join(ade, "annotations_detectron2", split)
        if not os.path.isdir(src):
            raise DatasetMissingError(f"{src} does not exist; expected layout:\n{LAYOUTS['ade20k']}")
        os.makedirs(dst, exist_ok=True)
        for file_name in sorted(os.listdir(src)):
            if file_name.endswith(".png") and not os.path.exists(os.path.join(dst, file_name)):
                labels = cv2.imread(os.path.join(src, file_name), cv2.IMREAD_UNCHANGED)
                cv2.imwrite(os.path.join(dst, file_name), ade_to_detectron2(labels))
    return os.path.join(ade, "annotations_detectron2")
