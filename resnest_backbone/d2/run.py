"""Run one of detectron2's own tools, unmodified, with the ResNeSt plugin registered.

    python -m resnest_backbone.d2.run TOOL.py [the tool's own arguments]

    python -m resnest_backbone.d2.run detectron2/tools/train_net.py --config-file faster_rcnn_resnest50_fpn.yaml
    python -m resnest_backbone.d2.run detectron2/tools/plain_train_net.py --config-file CFG.yaml --eval-only ...
    python -m resnest_backbone.d2.run detectron2/tools/analyze_model.py --config-file CFG.yaml --tasks flop

A project registers the plugin with three lines (README, "Using it from a detectron2 project"): import
resnest_backbone.d2, add_resnest_config(cfg), MODEL.BACKBONE.NAME. A tool you do not edit builds its config
with `get_cfg()`, so before running TOOL as `__main__` this:

- imports resnest_backbone.d2, which registers the backbones and the generated demo datasets (resnest_demo_*);
- adds MODEL.RESNEST.* to detectron2's *default* config, so that the tool's get_cfg() knows the keys (only in
  this process: detectron2 itself is not changed);
- resolves `--config-file NAME` (or `--config NAME`) to a project config by name when NAME is not a file;
- makes the tool load weights through the project's SafeDetectionCheckpointer (never plain unpickling).

LazyConfig files (configs/lazy/*.py) import the plugin themselves, so upstream's lazyconfig_train_net.py runs
them with or without this launcher. Runs of several processes (`--num-gpus 2`) start fresh interpreters that
run only the tool: use tools/train_net.py of this project for those, or add the plugin import to the tool.
"""
import os
import runpy
import sys


def register_plugin() -> None:
    """The plugin's backbones, demo datasets and config keys, for code that calls detectron2's get_cfg(), and
    the safe checkpointer under detectron2's name (compat.use_plugin_in_unmodified_tools), in this process."""
    import resnest_backbone.d2  # noqa: F401  (registers the backbones and the demo datasets)
    from resnest_backbone.d2.compat import use_plugin_in_unmodified_tools

    use_plugin_in_unmodified_tools()


def _resolve_config_names(argv):
    from resnest_backbone.model_zoo import get_config_file

    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--config-file", "--config"):
            argv[i] = "--config-file"
            argv[i + 1] = get_config_file(argv[i + 1])
    return argv


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or not argv[0].endswith(".py"):
        sys.exit(__doc__)
    tool, args = argv[0], argv[1:]
    if not os.path.isfile(tool):
        sys.exit(f"resnest_backbone.d2.run: error: no such tool: {tool}")
    register_plugin()
    try:
        args = _resolve_config_names(args)
    except FileNotFoundError as exc:
        sys.exit(f"resnest_backbone.d2.run: error: {exc}")
    sys.argv = [tool, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(tool)))  # as `python TOOL.py` would
    runpy.run_path(tool, run_name="__main__")


if __name__ == "__main__":
    main()
