"""Checkpoint namings of ResNeSt, as short declarative tables, and conversion to/from the official one.

The official names (zhanghang1989/ResNeSt, identical in timm) are the hub: our core modules carry them, and
every other naming is a table of renames relative to them:

  official / timm      conv1.{0,1,3,4,6}  bn1   layer1.0.bn1   layer1.0.conv2.bn1   layer1.0.downsample.1
  mmdet / mmseg        stem.{0,1,3,4,6}   stem.7  (blocks unchanged; with GroupNorm mmcv spells a block's
                       norms gn1 / gn3 / conv2.gn0 / conv2.gn1, read as bn*)
  d2fork               stem.conv1_1 ...   stem.conv1_3.norm   res2.0.conv1.norm   res2.0.conv2.bn1   res2.0.shortcut
                       (the detectron2-ResNeSt fork)

Renames are by prefix, separately for the stem and inside a block, so `conv2.bn1` (the attention's norm)
is never confused with a block's `bn1` or the stem's `bn1` (detectron2's torchvision converter rewrites
every `bn1` and corrupts `conv2.bn1`).
"""
import re
from dataclasses import dataclass, field
from typing import Dict, Mapping

_BLOCK_KEY = re.compile(r"^(?P<stage>layer|res)(?P<index>\d+)\.(?P<block>\d+)\.(?P<inner>.+)$")


@dataclass(frozen=True)
class Naming:
    name: str
    stem: Dict[str, str] = field(default_factory=dict)  # official prefix -> this naming's prefix
    block: Dict[str, str] = field(default_factory=dict)  # inside a block, official prefix -> this prefix
    stage_prefix: str = "layer"  # official stage i (layer1..4) is called f"{stage_prefix}{i + stage_offset}"
    stage_offset: int = 0
    marker: str = "conv1.0.weight"  # a key that identifies this naming
    aliases: Dict[str, str] = field(default_factory=dict)  # inside a block, other spellings -> official (read only)

    def from_official(self, key: str) -> str:
        return self._rename(key, self.stem, self.block, "layer", 0, self.stage_prefix, self.stage_offset)

    def to_official(self, key: str) -> str:
        inverse = lambda table: {v: k for k, v in table.items()}  # noqa: E731
        return self._rename(key, inverse(self.stem), {**inverse(self.block), **self.aliases}, self.stage_prefix,
                            self.stage_offset, "layer", 0)

    @staticmethod
    def _rename(key, stem, block, src_stage, src_offset, dst_stage, dst_offset) -> str:
        match = _BLOCK_KEY.match(key)
        if match and match["stage"] == src_stage:
            index = int(match["index"]) - src_offset + dst_offset
            return f"{dst_stage}{index}.{match['block']}.{_rename_prefix(match['inner'], block)}"
        return _rename_prefix(key, stem)


def _rename_prefix(key: str, table: Mapping[str, str]) -> str:
    # Longest prefix first: "shortcut.norm." before "shortcut.", "conv1.norm." before "conv1.".
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old):
            return table[old] + key[len(old):]
    return key


OFFICIAL = Naming("official")
MMDET = Naming("mmdet", stem={"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.",
                               "conv1.4.": "stem.4.", "conv1.6.": "stem.6.", "bn1.": "stem.7."},
               marker="stem.0.weight",  # mmcv names a GroupNorm gn{N} where a BatchNorm is bn{N}:
               aliases={"gn1.": "bn1.", "gn3.": "bn3.", "conv2.gn0.": "conv2.bn0.", "conv2.gn1.": "conv2.bn1."})
D2FORK = Naming("d2fork",
                stem={"conv1.0.": "stem.conv1_1.", "conv1.1.": "stem.conv1_1.norm.",
                      "conv1.3.": "stem.conv1_2.", "conv1.4.": "stem.conv1_2.norm.",
                      "conv1.6.": "stem.conv1_3.", "bn1.": "stem.conv1_3.norm."},
                block={"bn1.": "conv1.norm.", "bn2.": "conv2.norm.", "bn3.": "conv3.norm.",
                       "downsample.1.": "shortcut.", "downsample.2.": "shortcut.norm."},
                stage_prefix="res", stage_offset=1, marker="stem.conv1_1.weight")
NAMINGS = {n.name: n for n in (OFFICIAL, MMDET, D2FORK)}
# Prefixes that wrap a backbone inside a bigger model or a training wrapper, stripped on input.
WRAPPER_PREFIXES = ("module.", "model.", "backbone.bottom_up.", "backbone.", "body.")


def detect_naming(keys) -> "tuple[Naming, str]":
    """Find which naming the keys use and under which wrapper prefix (e.g. 'backbone.bottom_up.').

    Raises ValueError when no ResNeSt stem is found."""
    keys = list(keys)
    for naming in (D2FORK, MMDET, OFFICIAL):
        for key in keys:
            if key.endswith(naming.marker):
                prefix = key[: -len(naming.marker)]
                if prefix == "" or prefix.endswith("."):
                    return naming, prefix
    sample = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
    raise ValueError("no ResNeSt stem found (looked for "
                     + ", ".join(repr(n.marker) for n in NAMINGS.values())
                     + f" under any prefix); first keys: {sample}")
