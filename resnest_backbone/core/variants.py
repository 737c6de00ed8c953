"""The variant table: one row per published ResNeSt. Adding a variant = adding a row.

Values are the official constructors' (resnest==0.0.5 `resnest.py` / `ablation.py`) and timm's
(`models/resnest.py`). All rows: deep stem, avg_down, avd. NsKxWd = radix N, cardinality K, width W.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Variant:
    layers: Tuple[int, int, int, int]
    stem_width: int
    radix: int = 2
    cardinality: int = 1
    bottleneck_width: int = 64
    avd_first: bool = False
    deep_stem: bool = True
    avg_down: bool = True
    avd: bool = True
    source: str = "official"  # where the architecture is defined (and checkpoints come from)

    def arch(self) -> dict:
        """Constructor kwargs for core.ResNeSt."""
        kwargs = asdict(self)
        kwargs.pop("source")
        return kwargs


R50 = (3, 4, 6, 3)
VARIANTS: Dict[str, Variant] = {
    # timm (weights ported from GluonCV)
    "resnest14d": Variant((1, 1, 1, 1), 32, source="timm"),
    "resnest26d": Variant((2, 2, 2, 2), 32, source="timm"),
    # the paper's models (official torch code; timm: resnest50d, resnest101e, resnest200e, resnest269e)
    "resnest50": Variant(R50, 32),
    "resnest101": Variant((3, 4, 23, 3), 64),
    "resnest200": Variant((3, 24, 36, 3), 64),
    "resnest269": Variant((3, 30, 48, 8), 64),
    # official ablation.py: the `fast` variants put the avd pool before the 3x3 conv
    "resnest50_fast_1s1x64d": Variant(R50, 32, radix=1, cardinality=1, bottleneck_width=64, avd_first=True),
    "resnest50_fast_2s1x64d": Variant(R50, 32, radix=2, cardinality=1, bottleneck_width=64, avd_first=True),
    "resnest50_fast_4s1x64d": Variant(R50, 32, radix=4, cardinality=1, bottleneck_width=64, avd_first=True),
    "resnest50_fast_1s2x40d": Variant(R50, 32, radix=1, cardinality=2, bottleneck_width=40, avd_first=True),
    "resnest50_fast_2s2x40d": Variant(R50, 32, radix=2, cardinality=2, bottleneck_width=40, avd_first=True),
    "resnest50_fast_4s2x40d": Variant(R50, 32, radix=4, cardinality=2, bottleneck_width=40, avd_first=True),
    "resnest50_fast_1s4x24d": Variant(R50, 32, radix=1, cardinality=4, bottleneck_width=24, avd_first=True),
    # timm's names for two of the ablation architectures (identical rows, kept so both names work)
    "resnest50d_4s2x40d": Variant(R50, 32, radix=4, cardinality=2, bottleneck_width=40, avd_first=True,
                                  source="timm"),
    "resnest50d_1s4x24d": Variant(R50, 32, radix=1, cardinality=4, bottleneck_width=24, avd_first=True,
                                  source="timm"),
}

# Other published names of the same architectures.
ALIASES = {"resnest50d": "resnest50", "resnest101e": "resnest101", "resnest200e": "resnest200",
           "resnest269e": "resnest269"}


def get_variant(name: str) -> Variant:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in VARIANTS:
        raise ValueError(f"unknown ResNeSt variant {name!r}; known: {', '.join(sorted(VARIANTS))} "
                         f"(aliases: {', '.join(sorted(ALIASES))})")
    return VARIANTS[key]


def build_resnest(variant: str, **overrides):
    """Build a core ResNeSt trunk for a named variant; keyword arguments override or add knobs
    (output_stride, norm, out_features, dropblock_prob, num_classes, ...)."""
    from .trunk import ResNeSt

    return ResNeSt(**{**get_variant(variant).arch(), **overrides})
