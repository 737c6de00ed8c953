"""COCO and ADE20K the way detectron2 users have them: under $DETECTRON2_DATASETS (default ./datasets).

detectron2 registers its builtin names (coco_2017_train, coco_2017_val, ade20k_sem_seg_train,
ade20k_sem_seg_val, ...) when it is imported; this module checks, before a run starts, that the files
behind the names a config uses are on disk, and says which path is missing and what layout is expected.

ADE20K: detectron2 reads ADEChallengeData2016/annotations_detectron2 (labels shifted by one, 255 = ignore),
which detectron2's datasets/prepare_ade20k_sem_seg.py writes from the official annotations/;
`python -m resnest_backbone.data.prepare_ade20k` does the same.
"""
import os
from typing import Iterable, Optional

_LAYOUTS = {
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


def check_datasets(names: Iterable[str]) -> None:
    """Raise DatasetMissingError naming the first missing file or folder behind any of `names`. Demo sets are
    generated instead (they are made by code)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .demo import ensure_demo_data

    for name in names:
        if name.startswith("resnest_demo_") and name in DatasetCatalog.list():
            ensure_demo_data(MetadataCatalog.get(name).get("datasets_root", None))
            continue
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if n.startswith(("coco_2017", "ade20k", "resnest_demo")))
            raise KeyError(f"dataset {name!r} is not registered; known names include {', '.join(known)}")
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "image_root", "sem_seg_root", "panoptic_root", "panoptic_json"):
            path = meta.get(key, None)
            if path and not os.path.exists(path):
                raise DatasetMissingError(_missing_message(name, key, path))


def _missing_message(name: str, key: str, path: str) -> str:
    root = datasets_root()
    env = os.getenv("DETECTRON2_DATASETS")
    where = f"$DETECTRON2_DATASETS={env}" if env else "DETECTRON2_DATASETS is not set, so ./datasets is used"
    msg = f"dataset {name!r}: {key} {path} does not exist ({where}; looked under {os.path.abspath(root)})."
    layout = "ade20k" if "ade20k" in name else "coco" if name.startswith("coco") else None
    if layout:
        msg += f"\nExpected layout under {root}:\n{_LAYOUTS[layout]}"
    if "annotations_detectron2" in path and os.path.isdir(path.replace("annotations_detectron2", "annotations")):
        msg += ("\nThe official annotations are there: create annotations_detectron2 with "
                "`python -m resnest_backbone.data.prepare_ade20k`.")
    return msg


def prepare_ade20k(root: Optional[str] = None) -> str:
    """Write ADEChallengeData2016/annotations_detectron2 from annotations/ (label - 1, 0 -> 255)."""
    import cv2

    from .demo import ade_to_detectron2

    ade = os.path.join(root or datasets_root(), "ADEChallengeData2016")
    for split in ("training", "validation"):
        src, dst = os.path.join(ade, "annotations", split), os.path.join(ade, "annotations_detectron2", split)
        if not os.path.isdir(src):
            raise DatasetMissingError(f"{src} does not exist; expected layout:\n{_LAYOUTS['ade20k']}")
        os.makedirs(dst, exist_ok=True)
        for file_name in sorted(os.listdir(src)):
            if file_name.endswith(".png") and not os.path.exists(os.path.join(dst, file_name)):
                labels = cv2.imread(os.path.join(src, file_name), cv2.IMREAD_UNCHANGED)
                cv2.imwrite(os.path.join(dst, file_name), ade_to_detectron2(labels))
    return os.path.join(ade, "annotations_detectron2")
