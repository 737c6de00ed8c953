"""Checkpoint conversion: safe reading, naming tables, variant detection, detectron2/mmdet writers, and
loading into a built model with a report (load_weights)."""
from .convert import (FORMATS, Report, convert_checkpoint, describe_foreign, mismatches, read_arch, to_official,
                      variants_matching)
from .io import CheckpointError, atomic_write, load_state_dict, read_checkpoint, save_d2_pkl, save_torch
from .load import LoadReport, find_trunk, load_weights
from .naming import D2FORK, MMDET, NAMINGS, OFFICIAL, Naming, detect_naming

__all__ = ["D2FORK", "FORMATS", "MMDET", "NAMINGS", "OFFICIAL", "CheckpointError", "LoadReport", "Naming",
           "Report", "atomic_write", "convert_checkpoint", "describe_foreign", "detect_naming", "find_trunk",
           "load_state_dict", "load_weights", "mismatches", "read_arch", "read_checkpoint", "save_d2_pkl",
           "save_torch", "to_official", "variants_matching"]
