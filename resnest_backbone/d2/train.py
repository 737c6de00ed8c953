"""Training and evaluation with detectron2's trainer, for every ResNeSt config of this project.

    build_trainer      the step trainer for SOLVER.AMP: AMPTrainer (float16, CUDA) or AutocastTrainer (bfloat16,
                       CPU or GPU: autocast forward, no loss scaling), SimpleTrainer without AMP
    Trainer            DefaultTrainer + what a ResNeSt run needs: COCOEvaluator / SemSegEvaluator chosen from
                       the dataset, the DeepLab data pipeline and poly LR for semantic segmentation, the safe
                       atomic checkpointer, the optimizer state, data stream position and seeds in
                       checkpoints (bit-exact resume: resume.py), CPU DDP
    setup_cfg          config from a yaml + overrides (MODEL.RESNEST.* and DeepLab keys known), adapted to the
                       device, checked against the datasets on disk, then detectron2's default_setup
    launch             detectron2's launch, plus CPU multi-process runs on the gloo backend
    default_argument_parser   detectron2's (--config-file --resume --eval-only --num-gpus --num-machines
                       --machine-rank --dist-url opts)

tools/train_net.py is these pieces put together.
"""
import logging
import os
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import detectron2.data.transforms as T
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup, hooks
from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import launch as d2_launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..core.precision import autocast_forward
from .checkpoint import SafeDetectionCheckpointer
from .config import add_resnest_config
from .deeplab import add_resnest_deeplab_config
from .resume import ExactResumeMixin, build_resumable_train_loader
from .hooks import ResNeStPreciseBN, build_dropblock_hook
from .model_zoo import get_config_file

__all__ = ["AMP_PRECISIONS", "AutocastTrainer", "CpuDistributedDataParallel", "DEPLOY_CHOICES", "Trainer",
           "adapt_cfg_to_device", "build_sem_seg_train_aug", "build_trainer", "ddp_model", "default_argument_parser",
           "deploy_for_eval", "get_resnest_cfg", "has_fast_coco_eval", "launch", "resnest_default_setup", "setup_cfg"]

# Norm options detectron2 maps to torch's nn.SyncBatchNorm, which refuses CPU tensors in a process group.
_HEAD_NORM_KEYS = ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM", "MODEL.SEM_SEG_HEAD.NORM",
                   "MODEL.RETINANET.NORM")


def get_resnest_cfg():
    """detectron2's default config + MODEL.RESNEST.* + the DeepLab keys (when the DeepLab project imports)."""
    cfg = get_cfg()
    add_resnest_config(cfg)
    try:
        add_resnest_deeplab_config(cfg)
    except ImportError:
        pass
    return cfg


def has_fast_coco_eval() -> bool:
    """True when detectron2's C++ extension, and with it the fast COCO evaluation, is built. Without it
    (upstream main, and this project's v0.6 build: tools/env/patch_sdists.py) `import detectron2._C` fails and
    COCOEvaluator falls back to pycocotools by itself; older builds need use_fast_impl=False."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


def adapt_cfg_to_device(cfg) -> None:
    """Run a GPU config on a machine without CUDA: MODEL.DEVICE cpu, and head norms "SyncBN" -> "naiveSyncBN"
    (detectron2's all-reduce SyncBN, which works on CPU process groups; the backbone's and FPN's SyncBN are
    the ResNeSt core's, which already does)."""
    logger = logging.getLogger("resnest_backbone")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: training on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu":
        for key in _HEAD_NORM_KEYS:
            node, leaf = cfg, key.split(".")
            for part in leaf[:-1]:
                node = node.get(part) if node is not None else None
            if node is not None and node.get(leaf[-1]) == "SyncBN":
                node[leaf[-1]] = "naiveSyncBN"
                logger.info(f"{key}: SyncBN -> naiveSyncBN (torch's SyncBatchNorm needs CUDA)")


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


class CpuDistributedDataParallel(DistributedDataParallel):
    """DDP for CPU (gloo) runs that accepts the ResNeSt core's SyncBatchNorm.

    torch refuses any nn.SyncBatchNorm in a CPU module; the core's SyncBatchNorm is one (so code that looks
    for SyncBN finds it) but synchronises CPU batches itself with an all-reduce. torch's own SyncBatchNorm
    is still refused, as it would fail in the forward."""

    def _passing_sync_batchnorm_handle(self, module):
        from ..core import SyncBatchNorm as CoreSyncBatchNorm

        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, CoreSyncBatchNorm):
                raise ValueError(f"{type(layer).__name__}: torch's SyncBatchNorm only works with GPU modules; use "
                                 "norm 'SyncBN' in the ResNeSt backbone / FPN or 'naiveSyncBN' in heads on the CPU")


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


class Trainer(ExactResumeMixin, DefaultTrainer):
    """detectron2's DefaultTrainer (same hooks, writers, evaluation loop) for ResNeSt models.

    Resume is exact (resume.py): the training data stream is a ResumableTrainLoader whose position is in
    the checkpoints, and each step's RNGs are seeded from (SEED, rank, iteration). `exact_resume = False`
    gives detectron2's stock data loader and RNG handling."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with two changes: DDP without device_ids on CPU (gloo), and the safe
        # atomic checkpointer (a killed run never leaves a half-written checkpoint or last_checkpoint).
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = ddp_model(model, on_cpu=not cfg.MODEL.DEVICE.startswith("cuda"), broadcast_buffers=False)
        self._trainer = build_trainer(model, data_loader, optimizer, cfg.MODEL.DEVICE,
                                      amp=cfg.SOLVER.AMP.ENABLED, precision=cfg.SOLVER.AMP.get("PRECISION", ""))
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, config=cfg,
                                                      trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Checkpoints carry the optimizer (momentum) too, so a resumed run continues exactly; detectron2 0.6's
    # DefaultTrainer saves only the iteration and the hooks' state.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        # DropBlock ramp (MODEL.RESNEST.DROPBLOCK_PROB > 0): first, so it sets drop_prob before each step.
        # PreciseBN (TEST.PRECISE_BN): detectron2's, keeping the stats of norms it cannot recompute.
        ret = [ResNeStPreciseBN.adopt(h) if type(h) is hooks.PreciseBN else h for h in super().build_hooks()]
        dropblock = build_dropblock_hook(self.cfg)
        return ([dropblock] if dropblock is not None else []) + ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        kind = meta.get("evaluator_type", "sem_seg" if _is_semantic(cfg) else "coco")
        if kind == "sem_seg":  # mIoU, fwIoU, mACC, pACC
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        if kind == "coco":  # box AP (+ mask AP for Mask R-CNN); the C++ evaluation only where it is built
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

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = None
        if _is_semantic(cfg):
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
        if cls.exact_resume:
            return build_resumable_train_loader(cfg, mapper=mapper)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR":
            from detectron2.projects.deeplab import build_lr_scheduler

            return build_lr_scheduler(cfg, optimizer)
        return super().build_lr_scheduler(cfg, optimizer)


def _panoptic_quality_unavailable(meta) -> str:
    """Why COCOPanopticEvaluator cannot run for a dataset, or "" when it can."""
    try:
        import panopticapi  # noqa: F401
    except ImportError:
        return "the panopticapi package is not installed"
    if not meta.get("panoptic_json", None):
        return "the dataset has no panoptic_json (a subset of a panoptic set)"
    return ""


def resnest_default_setup(cfg, args) -> None:
    """detectron2's default_setup (logging, config dump, seeds). Its environment report asks the C++
    extension for its compiler; this project's pure-Python detectron2 build has none, so that one line is
    replaced by a short report instead of failing."""
    import detectron2.engine.defaults as d2_defaults

    full = d2_defaults.collect_env_info

    def collect_env_info():
        try:
            return full()
        except NotImplementedError:
            import platform

            import detectron2

            return (f"Python {platform.python_version()}, torch {torch.__version__}, detectron2 "
                    f"{detectron2.__version__} (pure-Python build: no C++ extension), CUDA available: "
                    f"{torch.cuda.is_available()}, threads: {torch.get_num_threads()}")

    d2_defaults.collect_env_info = collect_env_info
    try:
        default_setup(cfg, args)
    finally:
        d2_defaults.collect_env_info = full


def setup_cfg(args, default_setup_fn=resnest_default_setup):
    """Config from args.config_file + args.opts, adapted to the device, datasets checked, frozen."""
    from .datasets import check_datasets

    cfg = get_resnest_cfg()
    if args.config_file:
        cfg.merge_from_file(get_config_file(args.config_file))  # a path, or a project config's name
    cfg.merge_from_list(args.opts or [])
    adapt_cfg_to_device(cfg)
    cfg.freeze()
    if default_setup_fn is not None:
        default_setup_fn(cfg, args)
    names = list(cfg.DATASETS.TEST) + ([] if getattr(args, "eval_only", False) else list(cfg.DATASETS.TRAIN))
    check_datasets(names)
    return cfg


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
                             "ResNeSt trunk in post-training static int8 (core.quant.quantize_int8, CPU), "
                             "calibrated on --calibration-images images of the first training set")
    parser.add_argument("--calibration-images", type=int, default=16, metavar="N",
                        help="int8: how many training images (test-time resizing) calibrate it (default 16)")
    return parser


DEPLOY_CHOICES = ("fp32", "bf16", "int8")


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
def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(),
           timeout=timedelta(minutes=30), backend=None):
    """detectron2's `launch` when CUDA is there; otherwise the same contract on CPU with the gloo backend
    (num_gpus_per_machine = processes per machine): detectron2 0.6's launch insists on NCCL and CUDA.

    backend: "nccl" / "gloo", default by torch.cuda.is_available()."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    world_size = num_machines * num_gpus_per_machine
    if backend == "nccl":
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
    global_rank = machine_rank * num_per_machine + local_rank
    # Share the cores: each process would otherwise start one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
                            timeout=timeout)
    # The per-machine group detectron2's comm.get_local_rank() / get_local_size() read.
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    comm.synchronize()
    dist.destroy_process_group()
