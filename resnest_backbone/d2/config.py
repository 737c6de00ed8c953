"""detectron2 config keys for ResNeSt: MODEL.RESNEST.*

A variant name gives every architecture knob; any knob set to a non-None value overrides it. Keys that
detectron2 already has keep their usual meaning: MODEL.BACKBONE.FREEZE_AT, MODEL.RESNETS.OUT_FEATURES,
MODEL.RESNETS.NORM (used unless MODEL.RESNEST.NORM is set) and, as in the official ResNeSt detectron2 wrapper,
MODEL.RESNETS.DEFORM_ON_PER_STAGE / DEFORM_MODULATED / DEFORM_NUM_GROUPS (deformable split attention per stage
res2..res5, DCNv2 when modulated, offset groups; torchvision's deform_conv2d, no detectron2 C++ op needed).
"""
from detectron2.config import CfgNode as CN


def add_resnest_config(cfg) -> None:
    """Add MODEL.RESNEST to a detectron2 config (idempotent)."""
    if "RESNEST" in cfg.MODEL:
        return
    # Mixed-precision training (SOLVER.AMP.ENABLED): the autocast dtype, "float16" or "bfloat16"; "" = float16
    # on CUDA (detectron2's AMPTrainer, with its GradScaler), bfloat16 elsewhere (CPU). detectron2 has no key
    # for it (upstream main's AMPTrainer takes a `precision` argument): resnest_backbone.d2.train.build_trainer.
    if "PRECISION" not in cfg.SOLVER.AMP:
        cfg.SOLVER.AMP.PRECISION = ""
    _C = cfg.MODEL.RESNEST = CN()
    _C.VARIANT = "resnest50"  # a row of resnest_backbone.VARIANTS (or an alias such as resnest50d)
    # Architecture overrides; None = take the variant's value.
    _C.LAYERS = None  # e.g. [3, 4, 6, 3]
    _C.RADIX = None  # 0 plain conv, 1 sigmoid gate, >= 2 softmax over splits
    _C.CARDINALITY = None
    _C.BOTTLENECK_WIDTH = None
    _C.STEM_WIDTH = None
    _C.DEEP_STEM = None
    _C.AVG_DOWN = None
    _C.AVD = None
    _C.AVD_FIRST = None
    # Norm for the trunk; "" = use MODEL.RESNETS.NORM. "SyncBN" runs in one process as BN (with a warning).
    _C.NORM = ""
    _C.OUTPUT_STRIDE = 32  # 32, 16 (dilated res5) or 8 (dilated res4 + res5)
    _C.RES5_MULTI_GRID = None  # e.g. [1, 2, 4] (DeepLab)
    # DropBlock (block 3) in res4/res5, the final drop probability. When > 0, resnest_backbone.d2.Trainer adds
    # ResNeStDropBlockHook, which ramps it linearly from 0 over DROPBLOCK_RAMP_ITERS iterations
    # (0 = over the whole training, SOLVER.MAX_ITER).
    _C.DROPBLOCK_PROB = 0.0
    _C.DROPBLOCK_RAMP_ITERS = 0
    _C.LAST_GAMMA = False  # zero-init the last norm of each block
    # Gradient checkpointing per bottleneck in training: less activation memory (deep variants such as
    # resnest200/269 in detectors), one more forward of the trunk's blocks per step; same gradients.
    _C.GRAD_CHECKPOINT = False
