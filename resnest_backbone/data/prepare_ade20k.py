"""python -m resnest_backbone.data.prepare_ade20k [ROOT]: write ADEChallengeData2016/annotations_detectron2
(the label layout detectron2's ade20k_sem_seg_* datasets read) under ROOT (default $DETECTRON2_DATASETS)."""
import sys

from .layout import prepare_ade20k

if __name__ == "__main__":
    print(prepare_ade20k(sys.argv[1] if len(sys.argv) > 1 else None))
