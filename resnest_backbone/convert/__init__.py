"""The only way in for weight files: safe reading (io), architecture evidence (arch), the one preparation
of weights for a model and its report (load), naming tables (naming), conversion and its CLI, and the
published weights by name (sources: verified download and cache)."""
from .arch import (ARCH_KEYS, RECORD_KEY, check_arch, describe_foreign, find_record, make_record, model_record,
                   read_arch, variant_from_filename, variants_matching)
from .convert import FORMATS, Report, convert_checkpoint, decide_variant, mismatches, to_official
from .io import (Checkpoint, CheckpointError, atomic_write, load_state_dict, open_checkpoint, read_checkpoint,
                 save_d2_pkl, save_torch)
from .load import (LoadReport, Prepared, compare_with_model, find_trunk, load_weights, mismatch_error,
                   prepare_state_dict)
from .naming import D2FORK, MMDET, NAMINGS, OFFICIAL, Naming, detect_naming
from .sources import WeightsUnavailable, fetch_weights, resolve_checkpoint, weights_table

__all__ = ["ARCH_KEYS", "D2FORK", "FORMATS", "MMDET", "NAMINGS", "OFFICIAL", "RECORD_KEY", "Checkpoint",
           "CheckpointError", "LoadReport", "Naming", "Prepared", "Report", "atomic_write", "check_arch",
           "compare_with_model", "convert_checkpoint", "decide_variant", "describe_foreign", "detect_naming",
           "find_record", "find_trunk", "load_state_dict", "load_weights", "make_record", "mismatch_error",
           "mismatches", "model_record", "open_checkpoint", "prepare_state_dict", "read_arch", "read_checkpoint",
           "save_d2_pkl", "save_torch", "to_official", "variant_from_filename", "variants_matching",
           "WeightsUnavailable", "fetch_weights", "resolve_checkpoint", "weights_table"]
