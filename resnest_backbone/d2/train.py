"""Training and evaluation with detectron2's trainer: the parts any detectron2 Trainer can take, one line each,
and the project's Trainer, which only composes them.

    class Trainer(ExactResumeMixin, DefaultTrainer)       bit-exact resume (resume.py)
    class Trainer(ResNeStHooksMixin, DefaultTrainer)      DropBlock ramp + PreciseBN that keeps the pooled
                                                          attention norms (hooks.py); or register_hooks([...])
    class Trainer(DeviceTrainerMixin, DefaultTrainer)     CPU DDP, bf16 autocast (SOLVER.AMP.PRECISION), the
                                                          safe checkpointer with its random-heads and
                                                          input-format guards
    build_evaluator = staticmethod(resnest_evaluator)     COCO / SemSeg / panoptic evaluators by dataset
    launch(main, n, ..., device=cfg.MODEL.DEVICE)         detectron2's launch; CPU runs on gloo
    setup_cfg(args)                                       config from a yaml + overrides, device checked,
                                                          weights read safely before anything is written

tools/train_net.py is these pieces put together.
"""
import logging
import os
import weakref
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import detectron2.data.transforms as T
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import launch as d2_launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..convert.io import read_checkpoint
from ..convert.sources import resolve_checkpoint
from ..core.precision import autocast_forward
from .checkpoint import SafeDetectionCheckpointer
from .compat import CpuDistributedDataParallel, create_local_process_group, has_fast_coco_eval
from .config import add_resnest_config
from .deeplab import add_resnest_deeplab_config, deeplab_key_error
from .hooks import ResNeStHooksMixin
from .model_zoo import get_config_file
from .resume import ExactResumeMixin, build_resumable_train_loader

__all__ = ["AMP_PRECISIONS", "AutocastTrainer", "CpuDistributedDataParallel", "DEPLOY_CHOICES", "DeviceError",
           "DeviceTrainerMixin", "Trainer", "adapt_cfg_to_device", "build_sem_seg_train_aug", "build_trainer",
           "check_deploy", "check_device", "config_device", "ddp_model", "default_argument_parser",
           "deploy_for_eval", "get_resnest_cfg", "has_fast_coco_eval", "launch", "merge_config",
           "process_group_backend", "refuse_unsafe_weights", "resnest_evaluator", "setup_cfg"]

# Norm options detectron2 maps to torch's nn.SyncBatchNorm, which refuses CPU tensors in a process group.
_HEAD_NORM_KEYS = ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.SEM_SEG_HEAD.NORM",
                   "MODEL.RETINANET.NORM")


# ---------------------------------------------------------------------------------------------------- config
class DeviceError(ValueError):
    """The run asks for a device it cannot have here; the message names the one-line fix."""


def get_resnest_cfg():
    """detectron2's default config + MODEL.RESNEST.* + the DeepLab keys (when the DeepLab project imports:
    merge_config names its import error if a config then needs them)."""
    cfg = get_cfg()
    add_resnest_config(cfg)
    try:
        add_resnest_deeplab_config(cfg)
    except ImportError:
        pass
    return cfg


def merge_config(cfg, config_file: Optional[str], opts=()) -> None:
    """cfg.merge_from_file (a path, or a project config's name) and merge_from_list. A key detectron2 does not
    know that a DeepLab config sets, while detectron2's DeepLab project does not import, raises ImportError with
    that import's error instead of detectron2's bare "Non-existent config key"."""
    try:
        if config_file:
            cfg.merge_from_file(get_config_file(config_file))
        cfg.merge_from_list(list(opts or []))
    except KeyError as exc:
        error = deeplab_key_error(exc, config_file or "the overrides")
        if error is None:
            raise
        raise error from exc


def check_device(device: str, key: str = "MODEL.DEVICE", fix: str = "MODEL.DEVICE cpu",
                 cuda_available: Optional[bool] = None) -> str:
    """`device` if this machine has it; a CUDA device without CUDA raises DeviceError naming `fix` (a run
    hundreds of times slower on the CPU is never chosen silently: a broken driver shows as an error)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if torch.device(device).type == "cuda" and not cuda_available:
        built = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise DeviceError(f"{key} is {device!r}, but CUDA is not available here (torch {torch.__version__}, built "
                          f"{built}): to run on the CPU, add `{fix}`")
    return device


def adapt_cfg_to_device(cfg) -> None:
    """Check MODEL.DEVICE (check_device); on the CPU, head norms "SyncBN" -> "naiveSyncBN" (detectron2's
    all-reduce SyncBN, which works on CPU process groups; the backbone's and FPN's SyncBN are the ResNeSt
    core's, which already does)."""
    check_device(cfg.MODEL.DEVICE)
    if cfg.MODEL.DEVICE == "cpu":
        for key in _HEAD_NORM_KEYS:
            node, leaf = cfg, key.split(".")
            for part in leaf[:-1]:
                node = node.get(part) if node is not None else None
            if node is not None and node.get(leaf[-1]) == "SyncBN":
                node[leaf[-1]] = "naiveSyncBN"
                logging.getLogger("resnest_backbone").info(
                    f"{key}: SyncBN -> naiveSyncBN (torch's SyncBatchNorm needs CUDA)")


def refuse_unsafe_weights(weights: str, output_dir: str, resume: bool) -> None:
    """Read the file a run will load (OUTPUT_DIR's last checkpoint with resume, else `weights`) through the safe
    reader before anything is written into OUTPUT_DIR: a crafted file is refused (CheckpointError naming it)
    and the output folder stays as it was. The checkpointer reads it again to load it into the model."""
    tag = os.path.join(output_dir, "last_checkpoint")
    if resume and os.path.isfile(tag):
        with open(tag) as f:
            path = os.path.join(output_dir, f.read().strip())
    else:
        path = (weights or "").split("?")[0]  # detectron2's "file.pkl?matching_heuristics=True"
    if path:
        read_checkpoint(PathManager.get_local_path(resolve_checkpoint(path)[0]))


def setup_cfg(args, default_setup_fn=default_setup):
    """Config from args.config_file + args.opts, device checked (adapt_cfg_to_device), frozen; the weights to
    load read safely (refuse_unsafe_weights); then detectron2's default_setup (logging, config.yaml, seeds) and
    the datasets checked."""
    from .datasets import check_datasets

    cfg = get_resnest_cfg()
    merge_config(cfg, args.config_file, args.opts)
    adapt_cfg_to_device(cfg)
    cfg.freeze()
    refuse_unsafe_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, getattr(args, "resume", False))
    if default_setup_fn is not None:
        default_setup_fn(cfg, args)
    names = list(cfg.DATASETS.TEST) + ([] if getattr(args, "eval_only", False) else list(cfg.DATASETS.TRAIN))
    check_datasets(names)
    return cfg


def config_device(args) -> str:
    """The device a tools/train_net.py run asks for (MODEL.DEVICE, or a LazyConfig's train.device), checked,
    read before any process starts: the process-group backend follows it."""
    from .lazy import is_lazy_config, lazy_device, load_lazy_config

    if args.config_file and is_lazy_config(args.config_file):
        return lazy_device(load_lazy_config(args.config_file, args.opts))
    cfg = get_resnest_cfg()
    merge_config(cfg, args.config_file, args.opts)
    return check_device(cfg.MODEL.DEVICE)


# --------------------------------------------------------------------------------------------- training parts
def build_sem_seg_train_aug(cfg):
    """The DeepLab project's training augmentation: multi-scale resize, crop (no class over
    SINGLE_CATEGORY_MAX_AREA of it), horizontal flip."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.get("SINGLE_CATEGORY_MAX_AREA", 1.0),
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    augs.append(T.RandomFlip())
    return augs


def _is_semantic(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"


def ddp_model(model: nn.Module, on_cpu: bool, **kwargs) -> nn.Module:
    """The model for training in this process group: itself in one process; in several, detectron2's
    create_ddp_model on GPUs, CpuDistributedDataParallel on CPU process groups (gloo: no device_ids, no fp16
    gradient compression)."""
    if comm.get_world_size() == 1:
        return model
    if on_cpu:
        kwargs.pop("fp16_compression", None)
        return CpuDistributedDataParallel(model, **kwargs)
    return create_ddp_model(model, **kwargs)


class AutocastTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer with the model's forward (the losses) under torch.autocast(device_type,
    precision): mixed precision in bfloat16, which has float32's exponent range, so needs no loss scaling
    (detectron2's AMPTrainer needs CUDA and always scales for float16). The score / box predictors
    (core.precision.FP32_HEADS) run in float32, as in the bf16 inference path. Backward and the optimizer step run
    outside autocast, on the float32 parameters, as in AMPTrainer."""

    def __init__(self, model, data_loader, optimizer, device_type: str = "cpu",
                 precision: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.device_type, self.precision = device_type, precision

    def run_step(self):
        with autocast_forward(self.model, self.device_type, self.precision):
            super().run_step()


AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def build_trainer(model, data_loader, optimizer, device: str, amp: bool = False, precision: str = ""):
    """The step trainer for SOLVER.AMP.ENABLED / PRECISION (LazyConfig: train.amp.enabled / precision):
    SimpleTrainer without AMP; detectron2's AMPTrainer for float16 on CUDA (the default there); AutocastTrainer
    for bfloat16 (the default elsewhere). float16 off CUDA is refused: it needs a GradScaler, which
    detectron2's AMPTrainer only runs on CUDA."""
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    device_type = torch.device(device).type
    name = precision or ("float16" if device_type == "cuda" else "bfloat16")
    if name not in AMP_PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION={precision!r}: use one of {sorted(AMP_PRECISIONS)} "
                         "(or '' for float16 on CUDA, bfloat16 on CPU)")
    if name == "float16":
        if device_type != "cuda":
            raise ValueError(f"SOLVER.AMP.PRECISION={precision!r} on device {device!r}: float16 training needs "
                             "loss scaling, which detectron2's AMPTrainer runs only on CUDA; use bfloat16")
        trainer = AMPTrainer(model, data_loader, optimizer)
    else:
        trainer = AutocastTrainer(model, data_loader, optimizer, device_type, AMP_PRECISIONS[name])
    logging.getLogger("detectron2").info(f"mixed precision: {name} autocast on {device_type} "
                                         f"({type(trainer).__name__})")
    return trainer


class DeviceTrainerMixin:
    """DefaultTrainer.__init__ with the parts that follow the run: `class Trainer(DeviceTrainerMixin,
    DefaultTrainer)`. It takes the place of DefaultTrainer.__init__ (same steps, same order, same attributes),
    so it goes after any class whose own __init__ calls super().__init__(cfg). Three changes:

    - DDP fits MODEL.DEVICE (ddp_model): on CPU process groups CpuDistributedDataParallel (detectron2's
      create_ddp_model gives a CPU model device_ids, which torch refuses);
    - the step trainer follows SOLVER.AMP.ENABLED / PRECISION (build_trainer): bfloat16 autocast on the CPU;
    - the checkpointer is SafeDetectionCheckpointer: the one safe reader, the architecture checks, atomic
      saves, and the random-heads / input-format guards on every load (MODEL.WEIGHTS, --resume)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = ddp_model(model, on_cpu=torch.device(cfg.MODEL.DEVICE).type != "cuda", broadcast_buffers=False)
        self._trainer = build_trainer(model, data_loader, optimizer, cfg.MODEL.DEVICE,
                                      amp=cfg.SOLVER.AMP.ENABLED, precision=cfg.SOLVER.AMP.get("PRECISION", ""))
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, config=cfg,
                                                      trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())


def resnest_evaluator(cfg, dataset_name, output_folder=None):
    """The evaluator for a dataset's evaluator_type: SemSegEvaluator (mIoU, fwIoU, mACC, pACC), COCOEvaluator
    (box AP, + mask AP for Mask R-CNN; the C++ evaluation only where it is built) or, for panoptic sets, both
    plus COCOPanopticEvaluator (PQ) where panopticapi and the panoptic json are there (a warning says when
    not). For a Trainer: `build_evaluator = staticmethod(resnest_evaluator)`."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", "sem_seg" if _is_semantic(cfg) else "coco")
    if kind == "sem_seg":
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    if kind == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_fast_coco_eval())
    if kind == "coco_panoptic_seg":  # Panoptic FPN, as detectron2's train_net: stuff mIoU, box/mask AP, PQ
        evaluators = [SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
                      COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=has_fast_coco_eval())]
        reason = _panoptic_quality_unavailable(meta)
        if reason:
            logging.getLogger("resnest_backbone").warning(f"{dataset_name}: no PQ ({reason}); evaluating "
                                                          "sem_seg (stuff) and bbox / segm (things) only")
        else:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        return DatasetEvaluators(evaluators)
    raise NotImplementedError(f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}); "
                              "this project evaluates COCO-format detection, panoptic (separated) and "
                              "semantic segmentation")


def _panoptic_quality_unavailable(meta) -> str:
    """Why COCOPanopticEvaluator cannot run for a dataset, or "" when it can."""
    try:
        import panopticapi  # noqa: F401
    except ImportError:
        return "the panopticapi package is not installed"
    if not meta.get("panoptic_json", None):
        return "the dataset has no panoptic_json (a subset of a panoptic set)"
    return ""


class Trainer(ExactResumeMixin, ResNeStHooksMixin, DeviceTrainerMixin, DefaultTrainer):
    """detectron2's DefaultTrainer (same hooks, writers, evaluation loop) with this package's parts: exact
    resume, the DropBlock ramp and PreciseBN hooks, CPU DDP / bf16 autocast / the safe checkpointer, the
    evaluator by dataset; plus the DeepLab data pipeline and poly LR for semantic segmentation."""

    build_evaluator = staticmethod(resnest_evaluator)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = None
        if _is_semantic(cfg):
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
        build = build_resumable_train_loader if cls.exact_resume else build_detection_train_loader
        return build(cfg, mapper=mapper)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
            from detectron2.projects.deeplab import build_lr_scheduler

            return build_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)


# ------------------------------------------------------------------------------------------------ evaluation
def default_argument_parser(epilog=None):
    """detectron2's parser (--config-file --resume --eval-only --num-gpus ...), plus `--config` as another
    name for --config-file; both take a path or a project config's name (model_zoo.get_config_file)."""
    parser = d2_argument_parser(epilog)
    parser.add_argument("--config", dest="config_file", metavar="FILE_OR_NAME",
                        help="same as --config-file: a path, or a project config's name "
                             "(e.g. faster_rcnn_resnest50_fpn.yaml)")
    parser.add_argument("--deploy", choices=DEPLOY_CHOICES, default=None,
                        help="with --eval-only: evaluate the inference form of the model: fp32 = BN folded + "
                             "channels_last (core.fuse.deploy), bf16 = that under bf16 autocast, int8 = the "
                             "ResNeSt trunk in post-training static int8 (core.quant.quantize_int8, CPU: "
                             "MODEL.DEVICE cpu), calibrated on --calibration-images images of the first "
                             "training set")
    parser.add_argument("--calibration-images", type=int, default=16, metavar="N",
                        help="int8: how many training images (test-time resizing) calibrate it (default 16)")
    return parser


DEPLOY_CHOICES = ("fp32", "bf16", "int8")


def check_deploy(how: Optional[str], eval_only: bool, device: str) -> None:
    """Refuse a --deploy request that cannot run, before any process starts: --deploy without --eval-only,
    and int8 (torch's x86 int8 kernels: CPU only) on a CUDA device."""
    if how and not eval_only:
        raise DeviceError("--deploy is for evaluation: add --eval-only")
    if how == "int8" and torch.device(device).type != "cpu":
        raise DeviceError(f"--deploy int8 runs on the CPU (torch's x86 int8 kernels), and the model is on "
                          f"{device!r}: add `MODEL.DEVICE cpu`")


def deploy_for_eval(cfg, model: nn.Module, how: str, calibration_images: int = 16) -> nn.Module:
    """The model in the inference form `how` (DEPLOY_CHOICES; see default_argument_parser's --deploy), for
    evaluation with Trainer.test. int8 calibrates on the first `calibration_images` images of
    cfg.DATASETS.TRAIN[0], mapped as the test loader maps images (DatasetMapper(cfg, is_train=False): no
    augmentation, test-size resizing); the same images in every process, so all ranks get one int8 model."""
    from ..core.fuse import deploy

    if how == "fp32":
        return deploy(model, channels_last=True)
    if how == "bf16":
        return deploy(model, channels_last=True, dtype=torch.bfloat16)
    if how != "int8":
        raise ValueError(f"--deploy {how!r}: choose one of {DEPLOY_CHOICES}")
    check_deploy(how, True, cfg.MODEL.DEVICE)
    from detectron2.data import DatasetCatalog, build_detection_test_loader

    from ..core.quant import quantize_int8

    if calibration_images < 1:
        raise ValueError(f"--calibration-images {calibration_images}: int8 needs at least one image")
    if not cfg.DATASETS.TRAIN:
        raise ValueError("--deploy int8 calibrates on DATASETS.TRAIN[0], and DATASETS.TRAIN is empty")
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:calibration_images]
    # an explicit sampler: the default (InferenceSampler) would give each process its own shard
    batches = list(build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False),
                                               sampler=list(range(len(dicts)))))
    logging.getLogger("detectron2.resnest_backbone").info(  # detectron2's console and log.txt
        "int8: calibrating on %d image(s) of %s", len(batches), cfg.DATASETS.TRAIN[0])
    return quantize_int8(model, batches)


# ---------------------------------------------------------------------------------------------------- launch
def process_group_backend(device: Optional[str] = None) -> str:
    """NCCL for a CUDA run, gloo for any other; device None: CUDA when available (detectron2's choice)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30), device: Optional[str] = None):
    """detectron2's `launch`, with the process-group backend following the run's `device` (MODEL.DEVICE,
    train.device; process_group_backend): CUDA runs go to detectron2's launch (NCCL); CPU runs start
    num_gpus_per_machine processes per machine on the gloo backend, each with its share of the cores.
    detectron2 main's launch also runs on the CPU, but picks NCCL whenever CUDA is there, so a
    `MODEL.DEVICE cpu` run on a GPU machine would pair NCCL with CPU tensors; v0.6's needs CUDA."""
    world_size = num_machines * num_gpus_per_machine
    if process_group_backend(device) == "nccl":
        return d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout)
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url=auto works only on one machine")
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_gpus_per_machine, daemon=False,
             args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout))


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    # Share the cores: each process would otherwise start one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * num_per_machine + local_rank, timeout=timeout)
    create_local_process_group(num_per_machine)  # what comm.get_local_rank() / get_local_size() read
    comm.synchronize()
    main_func(*args)
    comm.synchronize()
    dist.destroy_process_group()
