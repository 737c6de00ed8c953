"""Training and evaluation of detectron2 LazyConfig (python) configs: upstream's
tools/lazyconfig_train_net.py flow (instantiate the model, optimizer and data loaders, Simple/AMPTrainer, the
same hooks), with this project's pieces:

- the safe atomic checkpointer (SafeDetectionCheckpointer) for train.init_checkpoint, --resume and the
  periodic checkpoints (detectron2's PeriodicCheckpointer hook saves through it);
- the device: train.device "cuda" without CUDA is an error naming `train.device=cpu`; on the CPU the "SyncBN" of
  detectron2's own layers (FPN, heads; they would be torch's nn.SyncBatchNorm, which refuses CPU tensors
  in a process group) becomes "naiveSyncBN", as adapt_cfg_to_device does for yaml configs; the ResNeSt trunk
  keeps its SyncBN (the core's, which works there); CPU multi-process runs use CpuDistributedDataParallel;
- COCOEvaluator without use_fast_impl uses the C++ evaluation only where it is built;
- two optional keys of `train` that upstream's tool ignores: precise_bn=dict(enabled, num_iter) (the
  yaml recipe's TEST.PRECISE_BN) and dropblock_ramp_iters (a ResNeStDropBlockHook is added when the
  model has DropBlock with a probability > 0, as the yaml Trainer does).

    cfg = setup_lazy_cfg(args)   # load + overrides ("key=value"), device, weights read safely, default_setup,
                                 # datasets checked
    lazy_main(args)              # train (or --eval-only), what tools/train_net.py runs for a .py config
"""
import logging
from typing import List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate

from ..core.dropblock import DropBlock2D
from .backbone import ResNeStBackbone
from .checkpoint import SafeDetectionCheckpointer
from .hooks import ResNeStDropBlockHook, ResNeStPreciseBN
from .compat import has_fast_coco_eval
from .train import build_trainer, check_device, ddp_model, refuse_unsafe_weights

__all__ = ["adapt_lazy_cfg_to_device", "do_test", "do_train", "is_lazy_config", "lazy_dataset_names", "lazy_device",
           "lazy_main", "load_lazy_config", "setup_lazy_cfg"]

logger = logging.getLogger("resnest_backbone")

_NORM_KEYS = ("norm", "conv_norm")  # detectron2's layers: FPN(norm=), FastRCNNConvFCHead(conv_norm=), ...


def is_lazy_config(path: str) -> bool:
    """True for a LazyConfig: a `.py` config, or a `.yaml` written by LazyConfig.save (a run's config.yaml,
    recognised by a top-level `model` with a `_target_`); yacs configs (MODEL: ...) are not."""
    if path.endswith(".py"):
        return True
    if not path.endswith((".yaml", ".yml")):
        return False
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "_target_" in data["model"]


def load_lazy_config(path: str, opts: Optional[List[str]] = None):
    """LazyConfig.load + LazyConfig.apply_overrides (`key=value` strings, hydra syntax)."""
    cfg = LazyConfig.load(path)
    return LazyConfig.apply_overrides(cfg, list(opts or []))


def _target(node) -> object:
    """The callable a config node instantiates (a `_target_` string is located), or None."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if isinstance(target, str):
        try:
            return locate(target)
        except ImportError:  # instantiate() will report it
            return None
    return target


def _is_subclass(target, cls) -> bool:
    return isinstance(target, type) and issubclass(target, cls)


def _nodes(node):
    """Every DictConfig under `node` (itself included), through dicts and lists."""
    if isinstance(node, DictConfig):
        yield node
        children = [node._get_node(k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        children = [node._get_node(i) for i in range(len(node))]
    else:
        return
    for child in children:
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _nodes(child)


def lazy_device(cfg) -> str:
    """train.device (default "cuda", as detectron2's common train config), checked: check_device."""
    train = cfg.get("train")
    device = str(train.get("device", "cuda")) if train is not None else "cuda"
    return check_device(device, "train.device", "train.device=cpu")


def adapt_lazy_cfg_to_device(cfg) -> None:
    """train.device checked (lazy_device); on the CPU, "SyncBN" -> "naiveSyncBN" in every model node but the
    ResNeSt trunk; a COCOEvaluator without use_fast_impl gets it from has_fast_coco_eval()."""
    train = cfg.get("train")
    if train is not None:
        lazy_device(cfg)
        if train.get("device") == "cpu" and "model" in cfg:
            for node in _nodes(cfg.model):
                target = _target(node)
                if _is_subclass(target, ResNeStBackbone):
                    continue
                for key in _NORM_KEYS:
                    if key in node and not OmegaConf.is_missing(node, key) \
                            and not OmegaConf.is_interpolation(node, key) and node[key] == "SyncBN":
                        node[key] = "naiveSyncBN"
                        logger.info(f"{getattr(target, '__name__', target)}({key}=...): SyncBN -> naiveSyncBN "
                                    "(torch's SyncBatchNorm refuses CPU tensors in a process group)")
    evaluator = OmegaConf.select(cfg, "dataloader.evaluator", default=None)
    if isinstance(evaluator, DictConfig) and _is_subclass(_target(evaluator), COCOEvaluator) \
            and "use_fast_impl" not in evaluator:
        evaluator.use_fast_impl = has_fast_coco_eval()


def lazy_dataset_names(cfg, train: bool = True) -> List[str]:
    """The dataset names of dataloader.test (and .train), where the config names them
    (get_detection_dataset_dicts(names=...)); other dataset definitions are not inspected."""
    names = []
    for split in (("train", "test") if train else ("test",)):
        value = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, (list, tuple, ListConfig)):
            names += [str(v) for v in value]
    return names


def setup_lazy_cfg(args, default_setup_fn=default_setup):
    """args.config_file + args.opts, adapted to the device, the weights to load read safely before anything is
    written (refuse_unsafe_weights), detectron2's default_setup (logging, the config saved to
    train.output_dir/config.yaml, seeds), the datasets checked (demo sets generated)."""
    from .datasets import check_datasets

    cfg = load_lazy_config(args.config_file, args.opts)
    adapt_lazy_cfg_to_device(cfg)
    refuse_unsafe_weights(cfg.train.get("init_checkpoint", ""), cfg.train.get("output_dir", ""),
                          getattr(args, "resume", False))
    if default_setup_fn is not None:
        default_setup_fn(cfg, args)
    check_datasets(lazy_dataset_names(cfg, train=not getattr(args, "eval_only", False)))
    return cfg


def _ddp(model, cfg):
    return ddp_model(model, on_cpu=cfg.train.device == "cpu", **dict(cfg.train.get("ddp") or {}))


def do_test(cfg, model):
    """Evaluate on dataloader.test with dataloader.evaluator (as upstream's tool); None without an evaluator."""
    if "evaluator" in cfg.dataloader:
        ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
        print_csv_format(ret)
        return ret
    return None


def _dropblock_hook(cfg, model) -> Optional[ResNeStDropBlockHook]:
    if any(isinstance(m, DropBlock2D) and m.target_prob > 0 for m in model.modules()):
        return ResNeStDropBlockHook(drop_prob=None, ramp_iters=cfg.train.get("dropblock_ramp_iters", 0))
    return None


def _precise_bn_hook(cfg, model):
    spec = cfg.train.get("precise_bn")
    if not spec or not spec.get("enabled", False):
        return None
    from fvcore.nn.precise_bn import get_bn_modules

    if not get_bn_modules(model):
        return None
    return ResNeStPreciseBN(cfg.train.eval_period, model, instantiate(cfg.dataloader.train),
                            spec.get("num_iter", 200))


def do_train(args, cfg):
    """Train as upstream's lazyconfig_train_net.do_train; returns the last evaluation's results (main
    process; None without an evaluator)."""
    model = instantiate(cfg.model)
    logging.getLogger("detectron2").info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = _ddp(model, cfg)
    trainer = build_trainer(model, train_loader, optim, cfg.train.device, amp=cfg.train.amp.enabled,
                            precision=cfg.train.amp.get("precision", ""))
    # The trainer's state holds the optimizer (SimpleTrainer.state_dict), the iteration and the LR scheduler.
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, config=cfg, trainer=trainer)
    results = {}

    def test_and_keep():
        results["last"] = do_test(cfg, model)
        return results["last"]

    trainer.register_hooks([
        _dropblock_hook(cfg, model),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        _precise_bn_hook(cfg, model),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint stores the iteration that just finished: start at the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results.get("last")


def lazy_main(args):
    """tools/train_net.py's main for a LazyConfig: --eval-only evaluates train.init_checkpoint (or, with
    --resume, the last checkpoint in train.output_dir); otherwise trains."""
    cfg = setup_lazy_cfg(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = _ddp(model, cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.train.output_dir, config=cfg).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)
