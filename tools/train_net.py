#!/usr/bin/env python
"""Train and evaluate a ResNeSt model with detectron2: detection (Faster / Mask / Cascade R-CNN, RetinaNet,
evaluated with COCOEvaluator) and semantic segmentation (DeepLabV3, evaluated with SemSegEvaluator), chosen
by the config.

    tools/train_net.py --config faster_rcnn_resnest50_fpn.yaml --num-gpus 8     # a project config, by name
    tools/train_net.py --config-file configs/faster_rcnn_resnest50_fpn.yaml --num-gpus 8
    tools/train_net.py --config-file configs/deeplabv3_resnest50_ade20k.yaml --num-gpus 8
    tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    tools/train_net.py --config-file CFG --eval-only --deploy int8 MODEL.WEIGHTS ...   # or fp32 / bf16: AP of
                                                        # the inference form (BN folded; bf16; int8 trunk)
    tools/train_net.py --config-file CFG --resume          # continue from OUTPUT_DIR/last_checkpoint
    tools/train_net.py --config-file configs/demo_faster_rcnn_resnest.yaml   # the generated demo set, CPU
    tools/train_net.py --config lazy/mask_rcnn_resnest50_fpn.py --num-gpus 8 train.init_checkpoint=X.pkl
                                                        # a LazyConfig (python config): key=value overrides

Datasets come from $DETECTRON2_DATASETS (default ./datasets) with detectron2's names (coco_2017_train,
ade20k_sem_seg_val, ...); the demo sets (resnest_demo_*) are generated on first use. The recipes ask for CUDA;
on a machine without it a run stops and says so: add `MODEL.DEVICE cpu` (LazyConfig: `train.device=cpu`) to
train on the CPU, where --num-gpus N starts N processes on the gloo backend. A refused weight file (unsafe,
unreadable) is refused before anything is written into the output folder.
"""
import os
import sys
import warnings

# On shared CPU cores torch's OpenMP threads otherwise spin-wait for each other (several times slower on a
# busy machine); set before torch loads. An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# detectron2 0.6 on torch 2.x: deprecation notices that say nothing about this run
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import resnest_backbone.d2  # noqa: E402,F401  (registers the ResNeSt backbones and the demo datasets)
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from resnest_backbone.convert import CheckpointError  # noqa: E402
from resnest_backbone.d2.checkpoint import SafeDetectionCheckpointer  # noqa: E402
from resnest_backbone.d2.lazy import is_lazy_config, lazy_main  # noqa: E402
from resnest_backbone.model_zoo import get_config_file  # noqa: E402
from resnest_backbone.d2.train import (DeviceError, Trainer, check_deploy, config_device,  # noqa: E402
                                       default_argument_parser, deploy_for_eval, launch, setup_cfg)


def main(args):
    if args.config_file and is_lazy_config(args.config_file):  # a LazyConfig (.py, or its saved config.yaml)
        if args.deploy:
            raise SystemExit("train_net: error: --deploy works with yaml configs (not a LazyConfig yet)")
        return lazy_main(args)
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR, config=cfg).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                             resume=args.resume)
        if args.deploy:  # the inference form: BN folded, bf16 or int8 (deploy_for_eval)
            model = deploy_for_eval(cfg, model, args.deploy, args.calibration_images)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(argv=None):
    args = default_argument_parser().parse_args(argv)
    if args.config_file:
        try:  # a path, or a project config's name: faster_rcnn_resnest50_fpn.yaml from any directory
            args.config_file = get_config_file(args.config_file)
        except FileNotFoundError as exc:
            print(f"train_net: error: {exc}", file=sys.stderr)
            sys.exit(2)
    print("Command Line Args:", args)
    try:
        device = config_device(args)  # the process-group backend follows it
        check_deploy(args.deploy, args.eval_only, device)
        return launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                      dist_url=args.dist_url, args=(args,), device=device)
    except (CheckpointError, DeviceError) as exc:  # a refused checkpoint; a device this machine does not have
        print(f"train_net: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
