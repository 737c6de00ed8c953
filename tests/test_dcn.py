"""Deformable split attention (DCN v1 / DCNv2, core/deform.py): equal to the plain model at zero offsets through
the real torchvision op, gradients into the offset branch, ImageNet trunks into DCN models, the detectron2
config, the mmdet arguments, fusion and export.

Tolerance for "equal" (RTOL, relative to the largest |feature| of each output): deform_conv2d computes the
3x3 conv as an im2col + matmul, conv2d (oneDNN) sums the same products in another order. Each output sums
K = 9 * C_in/groups products (up to 2304 here); a reordered fp32 sum differs by about sqrt(K) * 2^-24 relative
to the terms' scale. Measured here (CPU, fp32, He-initialised weights, random BN statistics): one grouped 3x3
layer (K = 180 to 2304) 2.6e-7 to 4.2e-7 of its largest output (6.6e-7 to 8.3e-7 absolute), a whole
ResNeSt-50 with DCN in res3-res5 at 224x224 1.05e-6 (v1) and 1.17e-6 (DCNv2, 2 offset groups), the cases
below 2.4e-7 to 6.7e-7. RTOL = 1e-5 leaves 8x headroom, and is 100x below what a real difference gives: a 0.01-pixel
offset or the DCNv2 zero-init mask 0.5 move the features by > 1e-3 (tested as negative controls).
"""

import pytest
import torch
from torch import nn

from conftest import randomize_norm_stats, require
from resnest_backbone.convert import CheckpointError, load_weights
from resnest_backbone.core import Bottleneck, build_resnest
from resnest_backbone.core import deform as deform_module
from resnest_backbone.core.deform import DeformConv2d, has_deformable
from resnest_backbone.core.fuse import fuse_resnest

RTOL = 1e-5
DCN = (False, True, True, True)

# (variant, overrides, modulated, deform groups): radix 2 / 4 / 1 / 0, cardinality 1 / 2 / 4, avd_first,
# dilation (output stride 8), a strided deformable conv (avd=False), 1 and 2 offset groups.
CASES = {
    "s14-v1-g1": ("resnest14d", {}, False, 1),
    "s14-v2-g2-os8": ("resnest14d", dict(output_stride=8), True, 2),
    "4s2x40d-v2-g1": ("resnest50_fast_4s2x40d", dict(layers=(1, 1, 1, 1)), True, 1),
    "1s4x24d-v1-g2": ("resnest50_fast_1s4x24d", dict(layers=(1, 1, 1, 1)), False, 2),
    "radix0-noavd-v2": ("resnest14d", dict(radix=0, avd=False), True, 1),
}


def _pair(variant, overrides, modulated, groups, seed=0):
    """A plain model with random weights and BN statistics, and a DCN model holding its weights (offset
    branches zero; for DCNv2 the mask bias set so the mask is exactly 1.0)."""
    torch.manual_seed(seed)
    plain = randomize_norm_stats(build_resnest(variant, **overrides), seed).eval()
    dcn = build_resnest(variant, **overrides, deform_on_per_stage=DCN, deform_modulated=modulated,
                        deform_num_groups=groups).eval()
    result = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(".conv2_offset." in k for k in result.missing_keys)
    if modulated:
        assert torch.sigmoid(torch.tensor(30.0)).item() == 1.0  # exactly 1 in fp32
        _set_mask_bias(dcn, 30.0)
    return plain, dcn


def _offset_convs(model):
    return [m.conv2_offset for m in model.modules() if isinstance(m, Bottleneck) and m.conv2_offset is not None]


def _set_mask_bias(model, value):
    with torch.no_grad():
        for conv in _offset_convs(model):
            mask_channels = conv.out_channels // 3
            conv.bias[-mask_channels:] = value


def _relative_diff(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_offsets_equal_the_plain_model_through_deform_conv2d(case, monkeypatch):
    variant, overrides, modulated, groups = CASES[case]
    plain, dcn = _pair(variant, overrides, modulated, groups)
    calls = []
    real = deform_module.deform_conv2d

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(deform_module, "deform_conv2d", counting)  # the op every deformable conv calls
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref, out = plain(x), dcn(x)
    deformable_blocks = sum(len(getattr(dcn, f"layer{i}")) for i in (2, 3, 4))
    assert len(calls) == deformable_blocks  # every res3-res5 block ran the deformable op, res2 did not
    assert all(shape[1] == 18 * groups for shape in calls)  # offsets (the mask is split off for DCNv2)
    assert set(ref) == set(out) and torch.equal(ref["res2"], out["res2"])
    assert _relative_diff(out, ref) <= RTOL


def test_offsets_and_mask_matter():
    """Negative controls for the tolerance: a 0.01-pixel offset and the zero-init DCNv2 mask (0.5)."""
    plain, dcn = _pair("resnest14d", {}, False, 1)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = plain(x)
        for conv in _offset_convs(dcn):
            conv.bias.fill_(0.01)
        assert _relative_diff(dcn(x), ref) > 100 * RTOL
    # DCNv2 at its zero init: mask sigmoid(0) = 0.5 (official / detectron2), the conv output halved.
    plain, dcn = _pair("resnest14d", {}, True, 1)
    _set_mask_bias(dcn, 0.0)
    with torch.no_grad():
        ref = plain(x)
        assert _relative_diff(dcn(x), ref) > 100 * RTOL
        for i in (2, 3, 4):
            for block in getattr(plain, f"layer{i}"):
                block.conv2.conv.weight.mul_(0.5)
        assert _relative_diff(dcn(x), plain(x)) <= RTOL  # = the plain model with res3-res5's conv2 halved


def test_official_layout_and_zero_init():
    model = build_resnest("resnest50", deform_on_per_stage=DCN, deform_modulated=True, deform_num_groups=2)
    keys = model.state_dict()
    assert not any(k.startswith("layer1.") and "conv2_offset" in k for k in keys)
    block = model.layer3[0]
    assert isinstance(block.conv2.conv, DeformConv2d) and block.conv2.conv.groups == 2  # cardinality x radix
    assert tuple(keys["layer3.0.conv2.conv.weight"].shape) == (512, 128, 3, 3)  # = the plain conv's
    assert tuple(keys["layer3.0.conv2_offset.weight"].shape) == (54, 128, 3, 3)  # 27 x 2 groups, grouped by 2
    assert tuple(keys["layer3.0.conv2_offset.bias"].shape) == (54,)
    assert all(not c.weight.any() and not c.bias.any() for c in _offset_convs(model))
    assert block.conv2_offset.stride == block.conv2.conv.stride and block.conv2.conv.weight.std() > 0
    v1 = build_resnest("resnest50", deform_on_per_stage=(True, False, False, False))
    assert tuple(v1.state_dict()["layer1.1.conv2_offset.weight"].shape) == (18, 64, 3, 3)
    assert not has_deformable(build_resnest("resnest14d"))


@pytest.mark.parametrize("modulated", [False, True])
def test_gradients_reach_the_offset_branch(modulated):
    torch.manual_seed(0)
    model = build_resnest("resnest14d", deform_on_per_stage=DCN, deform_modulated=modulated).train()
    x = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items() if "conv2_offset" in k}
    out = model(x)
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    for conv in _offset_convs(model):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
        assert conv.bias.grad.abs().sum() > 0
        if modulated:  # the mask channels get gradients too
            assert conv.bias.grad[-conv.out_channels // 3:].abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_bad_deform_values_are_named():
    for kwargs, message in ((dict(deform_on_per_stage=(True, True)), "deform_on_per_stage"),
                            (dict(deform_on_per_stage="res3"), "deform_on_per_stage"),
                            (dict(deform_on_per_stage=DCN, deform_num_groups=0), "deform_num_groups=0"),
                            (dict(deform_on_per_stage=DCN, deform_num_groups=3), "deform_num_groups=3"),
                            (dict(deform_on_per_stage=DCN, deform_modulated="yes"), "deform_modulated")):
        with pytest.raises(ValueError, match=message):
            build_resnest("resnest14d", **kwargs)


# ------------------------------------------------------------------------------------------ weights
def test_imagenet_trunk_loads_into_a_dcn_model(tmp_path):
    torch.manual_seed(0)
    plain = randomize_norm_stats(build_resnest("resnest14d", num_classes=10)).eval()
    path = tmp_path / "trunk.pth"
    torch.save(plain.state_dict(), path)  # official names, with a classifier
    dcn = build_resnest("resnest14d", deform_on_per_stage=DCN).eval()
    with torch.no_grad():
        for conv in _offset_convs(dcn):
            conv.weight.fill_(1.0)  # not zero before the load: the load sets the offsets to zero
    report = load_weights(dcn, str(path))
    assert report.complete and not report.missing
    assert sorted(k.split(" ")[0] for k in report.initialised) == sorted(
        k for k in dcn.state_dict() if "conv2_offset" in k)
    assert len(report.initialised) == 6 and "newly initialised" in str(report)
    assert all(not c.weight.any() and not c.bias.any() for c in _offset_convs(dcn))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = {k: v for k, v in plain(x).items()}
        assert _relative_diff(dcn(x), ref) <= RTOL

    # a DCN checkpoint: loads into the same DCN model (nothing new), never into other models
    dcn_path = tmp_path / "dcn.pth"
    torch.save(dcn.state_dict(), dcn_path)
    again = load_weights(build_resnest("resnest14d", deform_on_per_stage=DCN), str(dcn_path))
    assert again.complete and not again.initialised
    with pytest.raises(CheckpointError, match="unexpected.*conv2_offset"):
        load_weights(build_resnest("resnest14d"), str(dcn_path))
    with pytest.raises(CheckpointError, match="conv2_offset.weight: checkpoint \\[18, 128, 3, 3\\], model \\[27"):
        load_weights(build_resnest("resnest14d", deform_on_per_stage=DCN, deform_modulated=True), str(dcn_path))
    with pytest.raises(CheckpointError, match="unexpected layer2.0.conv2_offset"):
        load_weights(build_resnest("resnest14d", deform_on_per_stage=(False, False, True, True)), str(dcn_path))
    # a file with some offset branches must have all of them
    partial = {k: v for k, v in dcn.state_dict().items() if not k.startswith("layer4.0.conv2_offset")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing layer4.0.conv2_offset.weight"):
        load_weights(build_resnest("resnest14d", deform_on_per_stage=DCN), str(tmp_path / "partial.pth"))


# ------------------------------------------------------------------------------------- fuse / export
@pytest.mark.parametrize("case", ["s14-v2-g2-os8", "4s2x40d-v2-g1", "radix0-noavd-v2"])
def test_fused_and_scripted_dcn_models_match(case, tmp_path):
    from resnest_backbone.export import export_backbone, export_backbone_onnx

    variant, overrides, modulated, groups = CASES[case]
    _, dcn = _pair(variant, overrides, modulated, groups)
    with torch.no_grad():  # non-zero offsets and masks, so the offset path is exercised
        for conv in _offset_convs(dcn):
            conv.weight.normal_(0, 0.01)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = dcn(x)
        fused = fuse_resnest(dcn)
        assert has_deformable(fused) and _relative_diff(fused(x), ref) <= 1e-5
        scripted = torch.jit.script(fused)
        assert _relative_diff(scripted(x), ref) <= 1e-5
        assert _relative_diff(torch.jit.script(dcn)(x), ref) == 0.0
    for method in ("script", "trace"):  # written, loaded back with torch.jit.load and compared
        assert export_backbone(dcn, str(tmp_path / f"dcn_{method}.ts"), "torchscript", height=64, width=96,
                               method=method) <= 1e-4
    with pytest.raises(ValueError, match="ONNX export of a deformable"):
        export_backbone_onnx(fused, x[:1], str(tmp_path / "dcn.onnx"))
    assert not (tmp_path / "dcn.onnx").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_zero_offsets_and_gradients(no_tf32):
    plain, dcn = _pair("resnest50_fast_4s2x40d", dict(layers=(1, 1, 1, 1)), True, 2)
    plain, dcn = plain.cuda(), dcn.cuda()
    x = torch.randn(2, 3, 96, 128, device="cuda")
    with torch.no_grad():
        assert _relative_diff(dcn(x), plain(x)) <= RTOL
    dcn.train()
    sum(v.sum() for v in dcn(x).values()).backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in _offset_convs(dcn))


# ------------------------------------------------------------------------------------------ detectron2
@pytest.mark.d2
def test_d2_dcn_config_builds_the_official_layout_and_loads_a_plain_trunk(tmp_path, caplog):
    import logging

    from conftest import d2_cfg
    from detectron2.modeling import build_model

    from resnest_backbone.convert import convert_checkpoint
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    cfg = d2_cfg("configs/faster_rcnn_resnest50_dcn_fpn.yaml")
    assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == [False, True, True, True]
    assert cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 2
    cfg.merge_from_list(["MODEL.RESNEST.VARIANT", "resnest14d", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "",
                         "MODEL.ROI_BOX_HEAD.NORM", ""])
    model = build_model(cfg).eval()
    trunk = model.backbone.bottom_up
    keys = {k for k in model.state_dict() if "conv2_offset" in k}
    assert keys == {f"backbone.bottom_up.layer{i}.0.conv2_offset.{p}" for i in (2, 3, 4) for p in ("weight", "bias")}
    assert trunk.layer2[0].conv2.conv.modulated and trunk.layer2[0].conv2_offset.out_channels == 54

    torch.manual_seed(0)
    plain = randomize_norm_stats(build_resnest("resnest14d", num_classes=10))
    src = tmp_path / "resnest14d.pth"
    torch.save(plain.state_dict(), src)
    pkl = tmp_path / "resnest14d_d2.pkl"
    convert_checkpoint(str(src), str(pkl), "d2")
    with torch.no_grad():
        for conv in _offset_convs(trunk):
            conv.bias.fill_(1.0)
    checkpointer = SafeDetectionCheckpointer(model)
    # detectron2's setup_logger (run in-process by earlier tests) stops the checkpointer's logger from
    # propagating to the root logger, where caplog listens: listen on the logger itself.
    checkpointer.logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=checkpointer.logger.name):
            checkpointer.load(str(pkl))
    finally:
        checkpointer.logger.removeHandler(caplog.handler)
    assert "newly initialised (DCN offset branches" in caplog.text  # detectron2: heads (not offsets) not found
    assert "conv2_offset" not in caplog.text.split("not found in the checkpoint")[-1]
    assert all(not c.weight.any() and not c.bias.any() for c in _offset_convs(trunk))
    key = "layer2.0.conv2.conv.weight"
    assert torch.equal(trunk.state_dict()[key], plain.state_dict()[key])
    image = torch.rand(3, 64, 96) * 255
    with torch.no_grad():
        model([{"image": image, "height": 64, "width": 96}])


@pytest.mark.d2
def test_lazy_backbone_takes_deform_knobs():
    from omegaconf import ListConfig

    from resnest_backbone.d2 import ResNeStBackbone

    backbone = ResNeStBackbone("resnest14d", norm="BN", deform_on_per_stage=ListConfig([False, False, True, True]),
                               deform_modulated=True)
    assert backbone.layer2[0].conv2_offset is None and backbone.layer3[0].conv2_offset.out_channels == 27


# ------------------------------------------------------------------------------------------ mmdet / mmseg
def _mm():
    require("mmdet", "make env installs mmdet==3.3.0")
    from resnest_backbone.mm import ResNeStSA

    return ResNeStSA


def test_mmdet_dcn_arguments(tmp_path):
    ResNeStSA = _mm()
    from mmdet.registry import MODELS

    dcn = dict(type="DCNv2", deform_groups=1, fallback_on_stride=False)
    model = MODELS.build(dict(type="ResNeStSA", variant="resnest14d", dcn=dcn, stage_with_dcn=DCN))
    assert model.layer1[0].conv2_offset is None and model.layer2[0].conv2.conv.modulated
    v1 = ResNeStSA(variant="resnest14d", dcn=dict(type="DCN", deformable_groups=2), stage_with_dcn=[False] * 3 + [True])
    assert not v1.layer4[0].conv2.conv.modulated and v1.layer4[0].conv2_offset.out_channels == 36
    assert not has_deformable(ResNeStSA(variant="resnest14d", dcn=dcn))  # mmdet: no stage unless stage_with_dcn
    for bad, message in ((dict(type="DCNv3"), "DCN' or 'DCNv2"), (dict(type="DCN", fallback_on_stride=True),
                                                                  "fallback_on_stride"),
                         (dict(type="DCN", foo=1), "foo")):
        with pytest.raises(ValueError, match=message):
            ResNeStSA(variant="resnest14d", dcn=bad, stage_with_dcn=DCN)
    with pytest.raises(ValueError, match="needs dcn"):
        ResNeStSA(variant="resnest14d", stage_with_dcn=DCN)

    torch.manual_seed(0)
    plain = randomize_norm_stats(build_resnest("resnest14d")).eval()
    src = tmp_path / "resnest14d.pth"
    torch.save(plain.state_dict(), src)
    model = ResNeStSA(variant="resnest14d", dcn=dict(type="DCN"), stage_with_dcn=DCN,
                      init_cfg=dict(type="Pretrained", checkpoint=str(src)))
    model.init_weights()
    assert model.load_report.complete and len(model.load_report.initialised) == 6
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = plain(x)
        out = dict(zip(["res2", "res3", "res4", "res5"], model.eval()(x)))
    assert _relative_diff(out, ref) <= RTOL


def test_deform_conv_module_matches_nn_conv2d_names():
    conv = DeformConv2d(64, 128, 3, padding=1, groups=2, deform_groups=2, modulated=True)
    plain = nn.Conv2d(64, 128, 3, padding=1, groups=2, bias=False)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    conv.load_state_dict(plain.state_dict())
    x = torch.randn(1, 64, 12, 12)
    offset_mask = torch.cat([torch.zeros(1, 36, 12, 12), torch.full((1, 18, 12, 12), 30.0)], 1)
    with torch.no_grad():
        ref = plain(x)
        assert ((conv(x, offset_mask) - ref).abs().max() / ref.abs().max()).item() <= RTOL
