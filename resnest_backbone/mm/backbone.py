"""The ResNeSt core trunk as an OpenMMLab backbone (mmdet 3.x / mmseg 1.x), registered as `ResNeStSA`.

It *is* the core trunk (multiple inheritance, no copy of the network and no wrapper prefix): its state-dict
keys are the official ResNeSt names (`conv1.0`, `bn1`, `layer1.0.conv2.fc1`, ...). mmdet/mmseg's built-in
`ResNeSt` names the stem `stem.{0,1,3,4,6,7}`; such weights (a `resnest-convert --format mmdet` file, an
mmdet/mmseg ResNeSt checkpoint, a whole detector's `backbone.stem.*`) are renamed on load, so they load
both through `init_cfg=dict(type='Pretrained', checkpoint=...)` and through `load_state_dict`.

    backbone=dict(type='ResNeStSA', variant='resnest50', out_indices=(0, 1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False,
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnest50_mmdet.pth'))

mmdet/mmseg conventions: out_indices 0..3 = res2..res5 (a tuple is returned); frozen_stages -1 nothing,
0 the stem, k the stem and stages 1..k (no gradients, norms kept in eval mode); norm_eval keeps every
BatchNorm in eval mode during training; norm_cfg any mmcv norm (BN, SyncBN, GN, ...).
"""
import logging
import os
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..convert.io import Checkpoint, CheckpointError, open_checkpoint
from ..convert.load import LoadReport, prepare_state_dict
from ..convert.sources import looks_like_name, resolve_checkpoint
from ..core import STAGE_NAMES, ResNeSt, SyncBatchNorm, get_variant, stem_out_channels
from ..guards import arm_random_heads


def mm_norm(norm_cfg: Optional[dict]):
    """A `channels -> module` factory for an mmcv norm_cfg. SyncBN uses the core's SyncBatchNorm, which runs
    in one process (as BN) and in CPU (gloo) process groups, where torch's SyncBatchNorm refuses."""
    if norm_cfg is None:
        raise ValueError("ResNeStSA needs a norm_cfg (e.g. dict(type='BN', requires_grad=True))")
    if not isinstance(norm_cfg, dict) or "type" not in norm_cfg:
        raise ValueError(f"norm_cfg={norm_cfg!r} must be a dict with a 'type' (BN, SyncBN, GN, ...)")
    cfg = dict(norm_cfg)
    if cfg["type"] == "SyncBN":
        requires_grad = cfg.pop("requires_grad", True)
        cfg.pop("type")
        extra = set(cfg) - {"eps", "momentum"}
        if extra:
            raise ValueError(f"norm_cfg SyncBN: unsupported keys {sorted(extra)} (eps, momentum, requires_grad)")

        def sync_bn(channels: int) -> nn.Module:
            layer = SyncBatchNorm(channels, **cfg)
            for p in layer.parameters():
                p.requires_grad_(requires_grad)
            return layer

        return sync_bn
    from mmcv.cnn import build_norm_layer

    if cfg["type"] == "GN" and "num_groups" not in cfg:
        raise ValueError(f"norm_cfg={norm_cfg!r}: GN needs num_groups (e.g. dict(type='GN', num_groups=32))")
    build_norm_layer(cfg, 2 * cfg.get("num_groups", 32))  # fail now, with mmcv's message, for an unknown type
    return lambda channels: build_norm_layer(cfg, channels)[1]


_DCN_TYPES = {"DCN": False, "DCNv2": True}  # mmcv type -> modulated


def mm_dcn(dcn: Optional[dict], stage_with_dcn: Sequence[bool]) -> dict:
    """core.ResNeSt deformable-conv kwargs for mmdet's `dcn` / `stage_with_dcn` (see ResNeStSA)."""
    stages = tuple(stage_with_dcn)
    if len(stages) != 4 or any(not isinstance(f, bool) for f in stages):
        raise ValueError(f"ResNeStSA: stage_with_dcn={stage_with_dcn!r} must be four booleans (stages 1..4)")
    if dcn is None:
        if any(stages):
            raise ValueError(f"ResNeStSA: stage_with_dcn={stages} needs dcn=dict(type='DCN' or 'DCNv2', ...)")
        return {}
    if not isinstance(dcn, dict) or dcn.get("type") not in _DCN_TYPES:
        raise ValueError(f"ResNeStSA: dcn={dcn!r} must be dict(type='DCN' or 'DCNv2', deform_groups=1, "
                         "fallback_on_stride=False)")
    cfg = dict(dcn)
    modulated = _DCN_TYPES[cfg.pop("type")]
    groups = cfg.pop("deform_groups", None)
    legacy = cfg.pop("deformable_groups", None)
    if groups is not None and legacy is not None and groups != legacy:
        raise ValueError(f"ResNeStSA: dcn deform_groups={groups} contradicts deformable_groups={legacy}")
    groups = groups if groups is not None else legacy if legacy is not None else 1
    if cfg.pop("fallback_on_stride", False):
        raise ValueError("ResNeStSA: dcn fallback_on_stride=True is not supported (with avd, as in every "
                         "variant, the 3x3 conv has stride 1 anyway); use fallback_on_stride=False")
    if cfg:
        raise ValueError(f"ResNeStSA: dcn keys {sorted(cfg)} are not supported (type, deform_groups, "
                         "fallback_on_stride)")
    return dict(deform_on_per_stage=stages, deform_modulated=modulated, deform_num_groups=groups)


class ResNeStSA(ResNeSt, BaseModule):
    """ResNeSt (split-attention) backbone for mmdet and mmseg, built from the project's variant table.

    Args:
        variant: a row of the variant table (`resnest50`, `resnest101`, `resnest50_fast_2s1x64d`, ...).
        depth: mmdet-style alternative to `variant` (50/101/200/269 -> resnest{depth}); only used when
            `variant` is not given.
        radix, cardinality, bottleneck_width, deep_stem, stem_width, avg_down, avd, avd_first, layers:
            override the variant row.
        stem_channels: mmdet's name for the stem output width; must equal 2 * stem_width if given.
        strides, dilations: per stage (res2..res5), e.g. strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)
            for output stride 8 (mmseg's -d8). `output_stride` (32/16/8) is the short form.
        contract_dilation: the first block of a dilated stage uses half the dilation (mmseg, official).
        multi_grid: per-block dilation multipliers of the last stage.
        out_indices: stages to return, 0..3 = res2..res5 (strides 4..32).
        frozen_stages: -1 none, 0 the stem, k the stem and stages 1..k.
        norm_cfg: mmcv norm config (BN, SyncBN, GN with num_groups, ...).
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) while training.
        dropblock_prob: DropBlock in stages 3 and 4 (official placement).
        last_gamma: zero-init the last norm of each block (mmdet's zero_init_residual).
        dcn, stage_with_dcn: mmdet's deformable-conv arguments, e.g. dcn=dict(type='DCNv2', deform_groups=1,
            fallback_on_stride=False), stage_with_dcn=(False, True, True, True): the split-attention 3x3 conv
            of those stages becomes deformable (core/deform.py, on torchvision's deform_conv2d, not mmcv's op;
            offset branch `conv2_offset` as the official detectron2 wrapper). Accepted: type 'DCN' (v1) or
            'DCNv2' (modulated), deform_groups (or the older deformable_groups) >= 1, fallback_on_stride
            False (with avd the 3x3 conv never strides). As in mmdet, stage_with_dcn defaults to no stage.
        with_cp: gradient checkpointing per block in training (torch.utils.checkpoint, non-reentrant):
            less activation memory, one more forward of the blocks per step; same gradients.
        init_cfg: e.g. dict(type='Pretrained', checkpoint='resnest50_mmdet.pth'[, prefix='backbone.'],
            [strict=False]); read safely (no pickle code execution), in any known naming (official, timm,
            mmdet, detectron2-ResNeSt fork), and reported; strict (the default) refuses missing or
            wrong-shape tensors.
        pretrained: deprecated mmdet/mmseg form of init_cfg Pretrained (mmseg's EncoderDecoder passes it).
        num_stages, style: accepted for configs derived from mmdet/mmseg ResNet ones (must be 4 / 'pytorch').
    """

    def __init__(self, variant: Optional[str] = None, depth: Optional[int] = None,
                 radix: Optional[int] = None, cardinality: Optional[int] = None,
                 bottleneck_width: Optional[int] = None, deep_stem: Optional[bool] = None,
                 stem_width: Optional[int] = None, stem_channels: Optional[int] = None,
                 avg_down: Optional[bool] = None, avd: Optional[bool] = None, avd_first: Optional[bool] = None,
                 layers: Optional[Sequence[int]] = None, output_stride: int = 32,
                 strides: Optional[Sequence[int]] = None, dilations: Optional[Sequence[int]] = None,
                 contract_dilation: bool = True, multi_grid: Optional[Sequence[int]] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_cfg: Optional[dict] = dict(type="BN", requires_grad=True), norm_eval: bool = False,
                 dropblock_prob: float = 0.0, last_gamma: bool = False, reduction_factor: int = 4,
                 num_stages: int = 4, style: str = "pytorch", dcn: Optional[dict] = None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False), with_cp: bool = False,
                 init_cfg=None,
                 pretrained: Optional[str] = None):
        if variant is None:
            variant = f"resnest{depth}" if depth is not None else "resnest50"
        elif depth is not None and get_variant(variant).layers != get_variant(f"resnest{depth}").layers:
            raise ValueError(f"ResNeStSA: variant={variant!r} contradicts depth={depth} (when overriding an mmdet "
                             "ResNet backbone, add _delete_=True to the backbone dict so the base's depth "
                             "does not leak in)")
        if num_stages != 4:
            raise ValueError(f"ResNeStSA: num_stages={num_stages} is not supported (always 4; select outputs "
                             "with out_indices)")
        if style != "pytorch":
            raise ValueError(f"ResNeStSA: style={style!r} is not supported (ResNeSt strides in the 3x3 conv: "
                             "'pytorch')")
        out_indices = tuple(out_indices)
        if not out_indices or any(not isinstance(i, int) or not 0 <= i <= 3 for i in out_indices):
            raise ValueError(f"ResNeStSA: out_indices={out_indices} must be a non-empty subset of 0..3 "
                             "(res2..res5)")
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
            raise ValueError(f"ResNeStSA: frozen_stages={frozen_stages!r} must be -1 (none), 0 (stem) or 1..4")
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("ResNeStSA: give init_cfg or pretrained, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)

        arch = get_variant(variant).arch()
        overrides = dict(radix=radix, cardinality=cardinality, bottleneck_width=bottleneck_width,
                         deep_stem=deep_stem, stem_width=stem_width, avg_down=avg_down, avd=avd,
                         avd_first=avd_first, layers=tuple(layers) if layers is not None else None)
        arch.update({k: v for k, v in overrides.items() if v is not None})
        if stem_channels is not None:
            expected = stem_out_channels(arch["deep_stem"], arch["stem_width"])
            if stem_channels != expected:
                raise ValueError(f"ResNeStSA: stem_channels={stem_channels} but {variant} has a stem of "
                                 f"{expected} channels (2 x stem_width={arch['stem_width']}); set stem_width "
                                 f"or drop stem_channels")
        self.variant = variant
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_indices = tuple(sorted(set(out_indices)))
        self.load_report: Optional[LoadReport] = None
        ResNeSt.__init__(
            self, **arch, output_stride=output_stride, strides=strides, dilations=dilations,
            contract_dilation=contract_dilation, multi_grid=multi_grid, norm=mm_norm(norm_cfg),
            dropblock_prob=dropblock_prob, last_gamma=last_gamma, reduction_factor=reduction_factor,
            grad_checkpoint=with_cp, out_features=[STAGE_NAMES[i] for i in self.out_indices],
            **mm_dcn(dcn, stage_with_dcn))
        # ResNeSt.__init__ ran BaseModule.__init__ (through super()) with init_cfg=None.
        self.init_cfg = dict(init_cfg) if isinstance(init_cfg, dict) else init_cfg
        # mmdet semantics: frozen parts keep their BatchNorm modules (and state-dict keys), in eval mode.
        self.freeze(frozen_stages + 1, frozen_bn=lambda module: module)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = ResNeSt.forward(self, x)
        return tuple(features[name] for name in self.out_features)

    def _frozen_modules(self) -> List[nn.Module]:
        return self.frozen_modules(self.frozen_stages + 1)

    def train(self, mode: bool = True) -> "ResNeStSA":
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()
        return self

    # --------------------------------------------------------------------------------------------- weights
    # A load that brings any trunk tensor must bring all of them, with our shapes (mmengine's load_from /
    # resume otherwise copies what fits and only logs the rest). False: torch's / mmengine's own semantics.
    strict_trunk = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        """Every load of the model (torch's load_state_dict, mmengine's load_from / resume) passes here before
        the submodules load: its trunk tensors are prepared by convert.prepare_state_dict (mmdet/mmseg names
        such as stem.* or GroupNorm's gn* renamed to ours, a partial or wrong-shape trunk refused before
        anything of it is copied). In a whole-model load (a prefix such as `backbone.`), the model's keys the
        load left missing decide the random-heads warning (resnest_backbone.guards), given at the first
        forward in eval mode unless training comes first."""
        keys = [k for k in state_dict if k.startswith(prefix)]
        if keys:  # a load that brings no trunk tensor needs no preparation
            given = Checkpoint(f"the state_dict loaded into '{prefix.rstrip('.') or 'model'}'", None,
                               {k[len(prefix):]: state_dict[k] for k in keys})
            prepared = prepare_state_dict(self, given, whole_model=True, strict=self.strict_trunk,
                                          hint="set ResNeStSA.strict_trunk = False to load it partially")
            for key in keys:
                del state_dict[key]
            state_dict.update({prefix + k: v for k, v in prepared.weights.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if prefix:  # the list of missing keys is complete once the whole model has loaded: read it then
            filled = bool(keys)
            arm_random_heads(self, lambda: _missing_parts(prefix, missing_keys, filled),
                             "the checkpoint loaded into the model", _MM_ADVICE, _mm_log)

    def init_weights(self) -> None:
        """mmengine entry point: `Pretrained` init_cfg entries are loaded here, safely and with a report;
        any other init_cfg (e.g. Kaiming) goes through mmengine. Without init_cfg the official init stays."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if _is_pretrained(c)]
        others = [c for c in cfgs if not _is_pretrained(c)]
        saved, self.init_cfg = self.init_cfg, others or None
        try:
            super().init_weights()
        finally:
            self.init_cfg = saved
        for cfg in pretrained:
            self.load_report = self.load_pretrained(cfg["checkpoint"], prefix=cfg.get("prefix"),
                                                    strict=cfg.get("strict", True))
        self._is_init = True

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None, strict: bool = True) -> LoadReport:
        """Read `checkpoint` safely and load it (convert.prepare_state_dict: any known naming, the recorded
        architecture and every tensor checked); return (and log) what was loaded, dropped (a classifier,
        other parts of a model) and, with strict=False, what did not fit."""
        prepared = prepare_state_dict(self, open_checkpoint(_local_checkpoint(checkpoint)), prefix=prefix or "",
                                      strict=strict, hint="init_cfg strict=False loads what fits")
        strict_trunk, self.strict_trunk = self.strict_trunk, False  # checked above; partial when asked
        try:
            self.load_state_dict(prepared.weights, strict=False)
        finally:
            self.strict_trunk = strict_trunk
        report = prepared.report
        report.source = str(checkpoint)
        level = logging.INFO if report.complete else logging.WARNING
        print_log("ResNeStSA init_cfg Pretrained: " + "\n".join(report.lines()), logger="current", level=level)
        return report


_MM_ADVICE = ("Train first, with backbone-only weights in model.backbone.init_cfg=dict(type='Pretrained', "
              "checkpoint=...) (load_from and the test checkpoint are matched to the whole model by exact key), or "
              "test a trained detector / segmentor checkpoint.")


def _mm_log(message: str) -> None:
    print_log(message, logger="current", level=logging.WARNING)


def _missing_parts(prefix: str, missing_keys, trunk_filled: bool):
    """(parts, count, trunk_filled) for guards: the model's top-level parts with keys a load left missing."""
    outside = [k for k in missing_keys if not k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    parts = list(dict.fromkeys(k.split(".")[0] for k in outside))
    if parts and not trunk_filled:
        parts.insert(0, prefix.rstrip("."))
    return parts, len(outside), trunk_filled


def _is_pretrained(cfg) -> bool:
    return isinstance(cfg, dict) and cfg.get("type") in ("Pretrained", "PretrainedInit")


def _local_checkpoint(checkpoint: str) -> str:
    """A local path for `checkpoint`: a file; a variant name (`resnest50`): its published weights, downloaded
    once and verified (convert/sources.py); or an http(s) / open-mmlab:// / torchvision-style URL downloaded
    once into torch's hub cache (then read safely, like any file)."""
    checkpoint = os.path.expanduser(str(checkpoint))
    if os.path.isfile(checkpoint):
        return checkpoint
    if looks_like_name(checkpoint):
        return resolve_checkpoint(checkpoint, strict=True)[0]
    url = checkpoint
    if checkpoint.startswith("open-mmlab://"):
        from mmengine.runner.checkpoint import get_external_models

        name = checkpoint[len("open-mmlab://"):]
        url = get_external_models().get(name)
        if url is None:
            raise CheckpointError(f"{checkpoint}: unknown open-mmlab model name {name!r}")
    if not url.startswith(("http://", "https://")):
        raise CheckpointError(f"checkpoint {checkpoint!r} is not a file (and not a variant name, an http(s):// "
                              "or open-mmlab:// URL); convert official weights with `resnest-convert IN.pth "
                              "OUT.pth --format mmdet` and give OUT.pth")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(url.split("?")[0]))
    if not os.path.isfile(path):
        print_log(f"ResNeStSA: downloading {url} to {path}", logger="current")
        torch.hub.download_url_to_file(url, path, progress=False)
    return path


__all__ = ["ResNeStSA", "mm_dcn", "mm_norm"]
