"""Every workaround for a detectron2 (or torch) version that the detectron2 adapter needs, in one place.

Importing this module changes nothing. Each entry says which upstream version and behaviour it works around
and is called explicitly by the code that needs it; tests/test_d2_compat.py checks that importing
resnest_backbone.d2 leaves every detectron2 module attribute as it was (only the registries gain entries).
"""
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

__all__ = ["TRAINER_SAVES_OPTIMIZER", "CpuDistributedDataParallel", "create_local_process_group",
           "has_fast_coco_eval", "reset_parsed_url", "use_plugin_in_unmodified_tools"]

# detectron2 v0.6 (2021-10): DefaultTrainer's checkpoints hold the iteration and the hooks only; upstream
# ac6774f (2021-11-15, on main and sal-detectron2 0.7) adds the step trainer's state (optimizer, grad scaler)
# as "_trainer". ExactResumeMixin adds it where it is missing.
TRAINER_SAVES_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


def create_local_process_group(num_per_machine: int) -> None:
    """The per-machine process group that comm.get_local_rank() / get_local_size() read. detectron2 main (650c60e,
    2023-01) has comm.create_local_process_group; v0.6 has none, and its launch writes comm._LOCAL_PROCESS_GROUP,
    as this does there."""
    if hasattr(comm, "create_local_process_group"):
        return comm.create_local_process_group(num_per_machine)
    assert comm._LOCAL_PROCESS_GROUP is None
    machine = dist.get_rank() // num_per_machine
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group


def has_fast_coco_eval() -> bool:
    """True when detectron2's C++ extension, and with it the fast COCO evaluation, is built. Without it
    detectron2 main (and this project's v0.6 build: tools/env/patch_sdists.py) fall back to pycocotools by
    themselves; a v0.6 build without that patch needs COCOEvaluator(use_fast_impl=False)."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class CpuDistributedDataParallel(DistributedDataParallel):
    """DDP for CPU (gloo) process groups that accepts the ResNeSt core's SyncBatchNorm.

    torch (1.x to 2.14) refuses any nn.SyncBatchNorm in a CPU module, in DDP's private
    `_passing_sync_batchnorm_handle`; the core's SyncBatchNorm is one (so code that looks for SyncBN finds
    it) but synchronises CPU batches itself with an all-reduce. torch's own SyncBatchNorm is still refused,
    as it would fail in the forward."""

    def _passing_sync_batchnorm_handle(self, module):
        from ..core import SyncBatchNorm as CoreSyncBatchNorm

        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, CoreSyncBatchNorm):
                raise ValueError(f"{type(layer).__name__}: torch's SyncBatchNorm only works with GPU modules; use "
                                 "norm 'SyncBN' in the ResNeSt backbone / FPN or 'naiveSyncBN' in heads on the CPU")


def reset_parsed_url(checkpointer) -> None:
    """detectron2 main (since 3f785c5, 2022-12) sets DetectionCheckpointer._parsed_url_during_load in load()
    and resets it only on success (asserting it is None on entry): after a load that raised, every later
    load fails. Called in a `finally` around the load (v0.6 has no such attribute: nothing to do)."""
    if getattr(checkpointer, "_parsed_url_during_load", None) is not None:
        checkpointer._parsed_url_during_load = None


def use_plugin_in_unmodified_tools() -> None:
    """For `python -m resnest_backbone.d2.run TOOL.py` only (the launcher's documented purpose), in its process:

    - MODEL.RESNEST.* are added to detectron2's *default* config (detectron2.config.defaults._C), so that a tool
      that builds its config with get_cfg() knows the keys (every detectron2 version: get_cfg() clones _C);
    - the name DetectionCheckpointer in detectron2.checkpoint and detectron2.engine.defaults (where the
      tools and DefaultTrainer take it from) is the project's SafeDetectionCheckpointer (a subclass: the one
      safe reader and the architecture checks), because upstream's DetectionCheckpointer unpickles .pkl files
      (v0.6 and main alike)."""
    import detectron2.checkpoint
    import detectron2.engine.defaults
    from detectron2.config.defaults import _C as defaults

    from .checkpoint import SafeDetectionCheckpointer
    from .config import add_resnest_config

    add_resnest_config(defaults)
    for module in (detectron2.checkpoint, detectron2.engine.defaults):
        module.DetectionCheckpointer = SafeDetectionCheckpointer
