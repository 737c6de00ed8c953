"""Checkpoint conversion: safe reading, naming tables, variant detection, detectron2/mmdet writers."""
from .convert import FORMATS, Report, convert_checkpoint, mismatches, read_arch, to_official, variants_matching
from .io import CheckpointError, atomic_write, load_state_dict, read_checkpoint, save_d2_pkl, save_torch
from .naming import D2FORK, MMDET, NAMINGS, OFFICIAL, Naming, detect_naming

__all__ = ["D2FORK", "FORMATS", "MMDET", "NAMINGS", "OFFICIAL", "CheckpointError", "Naming", "Report",
           "atomic_write", "convert_checkpoint", "detect_naming", "load_state_dict", "mismatches",
           "read_arch", "read_checkpoint", "save_d2_pkl", "save_torch", "to_official", "variants_matching"]
