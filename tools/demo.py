#!/usr/bin/env python
"""`make demo`: train a small ResNeSt Faster R-CNN from scratch on the generated shapes set, on the CPU,
evaluate it on the val split (COCO box AP), and write PNGs.

    .venv/bin/python tools/demo.py                       # what `make demo` runs (a few minutes on 2 cores)
    .venv/bin/python tools/demo.py --max-iter 20 --val-limit 16 --output /tmp/demo   # a quick look
    .venv/bin/python tools/demo.py SOLVER.BASE_LR 0.01   # trailing KEY VALUE pairs override the config

Writes under --output (default ./output/demo): eval_results.json (the AP table), loss_curve.png,
val_predictions.png (val images with predicted boxes, detectron2 Visualizer) and the per-image PNGs in
val_predictions/, plus detectron2's usual log.txt, metrics.json, config.yaml and model_final.pth.
The data is generated once under $DETECTRON2_DATASETS/resnest_demo (default ./datasets) and reused.
"""
import os

# Cores shared with other work: without this, torch's OpenMP threads spin-wait for each other and a
# contended 2-core machine runs several times slower. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# detectron2 0.6 on torch 2.x: deprecation notices that say nothing about this run
warnings.filterwarnings("ignore", message=r"torch\.meshgrid")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, ROOT)  # run from a checkout

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo_faster_rcnn_resnest.yaml")
TARGET_AP50 = 50.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "--config", default=DEFAULT_CONFIG,
                        help="a path, or a project config's name")
    parser.add_argument("--output", default=os.path.join("output", "demo"))
    parser.add_argument("--max-iter", type=int, default=None, help="training iterations (default: the config's)")
    parser.add_argument("--val-limit", type=int, default=0, help="evaluate on the first N val images (0: all)")
    parser.add_argument("--num-vis", type=int, default=8, help="val images drawn with their predictions")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="score of the boxes drawn")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def _fresh_output(folder: str) -> None:
    """A demo run starts from scratch: drop the previous run's checkpoints, metrics and results."""
    os.makedirs(folder, exist_ok=True)
    patterns = ["model_*.pth", "last_checkpoint", "metrics.json", "events.out.tfevents.*", "eval_results.json",
                "loss_curve.png", "val_predictions.png", "val_predictions/*.png", "inference/*/*"]
    for pattern in patterns:
        for path in glob.glob(os.path.join(folder, pattern)):
            if os.path.isfile(path):
                os.remove(path)


def plot_loss_curve(metrics_file: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(metrics_file) as f:
        for line in f:
            row = json.loads(line)
            if "total_loss" in row:
                rows.append(row)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = ["total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"]
    for key in keys:
        points = [(r["iteration"], r[key]) for r in rows if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=key, linewidth=2.2 if key == "total_loss" else 1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.set_title("ResNeSt Faster R-CNN on the demo shapes set (from scratch, CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def draw_predictions(cfg, model, dataset_name: str, out_dir: str, grid_png: str, count: int, thresh: float):
    """The first `count` images of `dataset_name` with the model's boxes (score >= thresh)."""
    import numpy as np
    import torch
    from detectron2.data import MetadataCatalog, build_detection_test_loader
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    os.makedirs(out_dir, exist_ok=True)
    meta = MetadataCatalog.get(dataset_name)
    loader = build_detection_test_loader(cfg, dataset_name)
    tiles = []
    model.eval()
    with torch.no_grad():
        for index, inputs in enumerate(loader):
            if index >= count:
                break
            instances = model(inputs)[0]["instances"].to("cpu")
            instances = instances[instances.scores >= thresh]
            # The loader's image is resized and in cfg.INPUT.FORMAT; draw on the original file.
            image = read_image(inputs[0]["file_name"], format="RGB")
            vis = Visualizer(image, meta, scale=2.0).draw_instance_predictions(instances)
            tile = vis.get_image()
            name = os.path.splitext(os.path.basename(inputs[0]["file_name"]))[0]
            _save_png(os.path.join(out_dir, f"{name}.png"), tile)
            tiles.append(tile)
    if tiles:
        cols = min(4, len(tiles))
        rows = (len(tiles) + cols - 1) // cols
        h, w = tiles[0].shape[:2]
        grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, cols)
            grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile[:h, :w]
        _save_png(grid_png, grid)
    return len(tiles)


def _save_png(path: str, rgb) -> None:
    import cv2

    cv2.imwrite(path, rgb[:, :, ::-1])


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def format_table(results: dict) -> str:
    bbox = results.get("bbox", {})
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    head = "| " + " | ".join(f"{k:>6}" for k in keys) + " |"
    line = "|" + "|".join(["-" * 8] * len(keys)) + "|"
    vals = "| " + " | ".join(f"{bbox.get(k, float('nan')):6.2f}" for k in keys) + " |"
    per_class = [f"  {k[3:]:<10} AP {v:6.2f}" for k, v in bbox.items() if k.startswith("AP-")]
    return "\n".join([head, line, vals] + (["per class:"] + per_class if per_class else []))


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    import torch

    from detectron2.engine import default_setup

    from resnest_backbone.d2 import register_demo_subset  # registers the ResNeSt backbones and the demo sets
    from resnest_backbone.d2.train import Trainer, setup_cfg
    from resnest_backbone.data import ensure_demo_data

    print("[demo] generating / reusing the demo data ...", flush=True)
    t = time.time()
    data_folder = ensure_demo_data()
    print(f"[demo] data: {data_folder} ({time.time() - t:.1f} s)", flush=True)

    opts = list(args.opts or [])
    if args.max_iter is not None:
        # LR drops at 75% and 92%, each once and inside the run (short runs would repeat a milestone)
        steps = sorted({s for s in (int(args.max_iter * 0.75), int(args.max_iter * 0.92)) if 0 < s < args.max_iter})
        opts += ["SOLVER.MAX_ITER", str(args.max_iter), "SOLVER.STEPS", str(tuple(steps)),
                 "SOLVER.WARMUP_ITERS", str(min(100, max(1, args.max_iter // 5)))]
    test_name = "resnest_demo_det_val"
    if args.val_limit > 0:
        test_name = register_demo_subset(test_name, args.val_limit)
    # Evaluated once, after training (below), rather than also by the trainer's end-of-training hook.
    opts += ["OUTPUT_DIR", args.output, "DATASETS.TEST", "()"]
    run_args = argparse.Namespace(config_file=args.config_file, opts=opts, eval_only=False, resume=False)
    cfg = setup_cfg(run_args, default_setup_fn=None)  # MODEL.WEIGHTS is refused here, before anything is written
    _fresh_output(cfg.OUTPUT_DIR)
    default_setup(cfg, run_args)
    print(f"[demo] training {cfg.MODEL.RESNEST.VARIANT} Faster R-CNN from scratch for {cfg.SOLVER.MAX_ITER} "
          f"iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, on {cfg.MODEL.DEVICE} ({torch.get_num_threads()} threads)"
          " - progress is logged every 20 iterations", flush=True)
    t = time.time()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.time() - t

    print("[demo] evaluating on the val split ...", flush=True)
    t = time.time()
    test_cfg = cfg.clone()
    test_cfg.defrost()
    test_cfg.DATASETS.TEST = (test_name,)
    results = Trainer.test(test_cfg, trainer.model)
    eval_s = time.time() - t
    results = {k: dict(v) for k, v in results.items()}

    print("[demo] writing PNGs ...", flush=True)
    plot_loss_curve(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), os.path.join(cfg.OUTPUT_DIR, "loss_curve.png"))
    drawn = draw_predictions(test_cfg, trainer.model, test_name, os.path.join(cfg.OUTPUT_DIR, "val_predictions"),
                             os.path.join(cfg.OUTPUT_DIR, "val_predictions.png"), args.num_vis, args.score_thresh)
    total_s = time.time() - start
    summary = {"results": results, "dataset": test_name, "max_iter": cfg.SOLVER.MAX_ITER,
               "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
               "total_seconds": round(total_s, 1), "threads": torch.get_num_threads(),
               "target_ap50": TARGET_AP50}
    with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=2)  # NaN (e.g. APl: no large objects) -> null

    ap50 = results.get("bbox", {}).get("AP50", float("nan"))
    print("\n[demo] COCO box AP on the demo val split:\n" + format_table(results))
    reached = "reached" if ap50 >= TARGET_AP50 else "NOT reached"
    print(f"\n[demo] AP50 {ap50:.1f} (target >= {TARGET_AP50:.0f}: {reached}); training {train_s / 60:.1f} min, "
          f"evaluation {eval_s:.0f} s, total {total_s / 60:.1f} min")
    print(f"[demo] wrote {os.path.join(cfg.OUTPUT_DIR, 'eval_results.json')}, loss_curve.png, "
          f"val_predictions.png and {drawn} images in val_predictions/")
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # CheckpointError (a refused MODEL.WEIGHTS), DeviceError and invalid config values
        if type(exc).__name__ not in ("CheckpointError", "DeviceError"):
            raise
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
