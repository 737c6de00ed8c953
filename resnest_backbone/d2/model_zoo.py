"""The project's configs as detectron2 configs (names: resnest_backbone.model_zoo)."""
from ..model_zoo import config_root, get_config_file, list_configs


def get_config(name: str):
    """A detectron2 config (get_resnest_cfg() + the yaml) for a project config name or path; a LazyConfig (a
    `.py` config, or the config.yaml a LazyConfig run saved) is loaded with detectron2's LazyConfig."""
    from .lazy import is_lazy_config

    path = get_config_file(name)
    if is_lazy_config(path):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from .train import get_resnest_cfg, merge_config

    cfg = get_resnest_cfg()
    merge_config(cfg, path)
    return cfg


__all__ = ["config_root", "get_config", "get_config_file", "list_configs"]
