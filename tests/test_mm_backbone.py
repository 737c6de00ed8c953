"""The OpenMMLab backbone `ResNeStSA`: fidelity against mmdet's built-in ResNeSt and the official model with
converted weights, the mmdet/mmseg knobs, loading in every naming, registries."""
import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")
require("mmseg", "make env installs mmsegmentation==1.2.2")

import torch  # noqa: E402
from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmseg.registry import MODELS as MMSEG_MODELS  # noqa: E402
from resnest.torch import resnest as official_resnest  # noqa: E402

from conftest import official_features, randomize_norm_stats  # noqa: E402
from resnest_backbone.convert import CheckpointError, convert_checkpoint  # noqa: E402
from resnest_backbone.convert.cli import main as convert_main  # noqa: E402
from resnest_backbone.core import SyncBatchNorm  # noqa: E402
from resnest_backbone.core.dropblock import DropBlock2D  # noqa: E402
from resnest_backbone.mm import ResNeStSA  # noqa: E402

# mmdet's built-in ResNeSt for each variant (mmdet names the stem width x 2 `stem_channels`).
MMDET_ARGS = {"resnest50": dict(depth=50, stem_channels=64), "resnest101": dict(depth=101, stem_channels=128)}


def _official_file(tmp_path, variant, seed=0, **kwargs):
    torch.manual_seed(seed)
    official = randomize_norm_stats(getattr(official_resnest, variant)(**kwargs), seed=seed).eval()
    src = tmp_path / f"{variant}_official.pth"
    torch.save(official.state_dict(), src)
    return official, str(src)


def _pretrained(path, **extra):
    return dict(type="Pretrained", checkpoint=str(path), **extra)


@pytest.mark.parametrize("variant", ["resnest50", pytest.param("resnest101", marks=pytest.mark.slow)])
def test_converted_weights_match_mmdet_resnest_and_official(tmp_path, variant, capsys):
    official, src = _official_file(tmp_path, variant)
    dst = tmp_path / f"{variant}_mmdet.pth"
    assert convert_main([src, str(dst), "--format", "mmdet"]) == 0  # the resnest-convert CLI
    printed = capsys.readouterr().out
    assert f"variant: {variant}" in printed and "dropped 2 keys: fc.weight, fc.bias" in printed

    ours = MMDET_MODELS.build(dict(type="ResNeStSA", variant=variant, init_cfg=_pretrained(dst)))
    ours.init_weights()
    assert ours.load_report.complete, str(ours.load_report)  # no missing / unexpected / wrong-shape keys
    assert [k.split(" ")[0] for k in ours.load_report.ignored] == []  # the file holds no classifier any more

    theirs = MMDET_MODELS.build(dict(type="ResNeSt", **MMDET_ARGS[variant], radix=2, reduction_factor=4,
                                     avg_down_stride=True, init_cfg=_pretrained(dst)))
    theirs.init_weights()
    theirs.eval()  # mmdet's ResNet.train() returns None: do not chain
    ours.eval()
    saved = torch.load(dst, weights_only=True)["state_dict"]
    assert set(saved) == set(theirs.state_dict())  # mmdet's own naming, all of it, nothing else
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, saved[key]), key  # mmdet's loader really loaded every tensor
    for key, value in ours.state_dict().items():
        assert torch.equal(value, official.state_dict()[key]), key

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = list(official_features(official, x).values())
        got, mmdet_got = ours(x), theirs(x)
    assert isinstance(got, tuple) and len(got) == 4
    for e, o, m in zip(expected, got, mmdet_got):  # bit-identical: the claim in MODEL_ZOO.md
        assert o.shape == e.shape and (o - e).abs().max().item() == 0.0
        assert m.shape == e.shape and (m - e).abs().max().item() == 0.0


def test_output_stride_8_matches_official_dilated(tmp_path):
    # mmseg's -d8 settings (strides/dilations/contract_dilation) = the official `dilated=True` trunk.
    official, src = _official_file(tmp_path, "resnest50", seed=1, dilated=True)
    dst = tmp_path / "mmdet.pth"
    convert_checkpoint(src, str(dst), fmt="mmdet")
    ours = MMSEG_MODELS.build(dict(type="ResNeStSA", variant="resnest50", strides=(1, 2, 1, 1),
                                   dilations=(1, 1, 2, 4), contract_dilation=True, init_cfg=_pretrained(dst)))
    ours.init_weights()
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = list(official_features(official, x).values()), ours(x)
    assert [tuple(g.shape[-2:]) for g in got] == [(16, 16), (8, 8), (8, 8), (8, 8)]
    for e, o in zip(expected, got):
        assert o.shape == e.shape and (o - e).abs().max().item() == 0.0


def test_registered_in_both_registries_without_shadowing_builtin_resnest():
    assert MMDET_MODELS.get("ResNeStSA") is ResNeStSA
    assert MMSEG_MODELS.get("ResNeStSA") is ResNeStSA
    from mmdet.models.backbones import ResNeSt as MMDetResNeSt
    from mmseg.models.backbones import ResNeSt as MMSegResNeSt

    assert MMDET_MODELS.get("ResNeSt") is MMDetResNeSt
    assert MMSEG_MODELS.get("ResNeSt") is MMSegResNeSt


def test_out_indices_select_stages():
    model = ResNeStSA(variant="resnest14d", out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 512, 8, 8), (2, 2048, 2, 2)]
    assert model.output_channels() == {"res3": 512, "res5": 2048}


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 3])
def test_frozen_stages_and_norm_eval(frozen_stages):
    model = ResNeStSA(variant="resnest14d", frozen_stages=frozen_stages)
    model.train()
    parts = [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    for index, modules in enumerate(parts):
        frozen = index <= frozen_stages
        for module in modules:
            assert all(p.requires_grad != frozen for p in module.parameters())
            assert all(m.training != frozen for m in module.modules())
    # frozen statistics do not move in a training forward; the others do
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"]) == (frozen_stages >= 0)
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])

    model = ResNeStSA(variant="resnest14d", frozen_stages=frozen_stages, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.layer4.training  # only the norms
    assert all(p.requires_grad for p in model.layer4.parameters())


def test_syncbn_runs_in_one_process_and_keeps_official_keys():
    bn = ResNeStSA(variant="resnest14d")
    sync = ResNeStSA(variant="resnest14d", norm_cfg=dict(type="SyncBN", requires_grad=True, momentum=0.05))
    assert isinstance(sync.layer1[0].conv2.bn0, SyncBatchNorm) and sync.bn1.momentum == 0.05
    assert list(sync.state_dict()) == list(bn.state_dict())
    sync.train()
    out = sync(torch.randn(2, 3, 64, 64))
    sum(o.mean() for o in out).backward()
    assert sync.layer1[0].conv2.fc1.weight.grad is not None
    frozen_affine = ResNeStSA(variant="resnest14d", norm_cfg=dict(type="SyncBN", requires_grad=False))
    assert not frozen_affine.bn1.weight.requires_grad


def test_group_norm_loads_mmdet_gn_naming():
    # mmcv names GroupNorms gn*: mmdet's ResNeSt-50 with GN has conv2.gn0 / gn1 / gn3 where we have bn*.
    gn = dict(type="GN", num_groups=32, requires_grad=True)
    torch.manual_seed(0)
    theirs = MMDET_MODELS.build(dict(type="ResNeSt", depth=50, stem_channels=64, norm_cfg=gn, norm_eval=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    assert "layer1.0.conv2.gn0.weight" in theirs.state_dict()
    ours = ResNeStSA(variant="resnest50", norm_cfg=gn)
    assert "layer1.0.conv2.bn0.weight" in ours.state_dict()  # official names whatever the norm
    assert isinstance(ours.layer1[0].conv2.bn0, torch.nn.GroupNorm)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    renamed = {k.replace("stem.7.", "bn1.").replace("stem.", "conv1.").replace(".gn", ".bn"): v
               for k, v in theirs.state_dict().items()}
    assert set(renamed) == set(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, renamed[key]), key
    # After the global pool each channel holds one value: mmdet's GN(32 groups, 32 channels) there normalises
    # every value to 0 (the attention ignores the image); the core uses 16 groups of 2 (same parameters).
    assert theirs.layer1[0].conv2.gn1.num_groups == 32 and ours.layer1[0].conv2.bn1.num_groups == 16
    ours.eval()
    with torch.no_grad():
        a, b = ours(torch.randn(2, 3, 64, 64))[0], ours(torch.randn(2, 3, 64, 64))[0]
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_mmdet_named_state_dict_loads_strictly_inside_a_model():
    # A whole-model checkpoint of a detector with mmdet's naming (backbone.stem.*) loads by load_state_dict.
    theirs = MMDET_MODELS.build(dict(type="ResNeSt", depth=50, stem_channels=64))
    wrapper = torch.nn.Module()
    wrapper.backbone = ResNeStSA(variant="resnest50")
    state = {f"backbone.{k}": v for k, v in theirs.state_dict().items()}
    wrapper.load_state_dict(state, strict=True)
    assert torch.equal(wrapper.backbone.bn1.running_var, theirs.stem[7].running_var)
    assert torch.equal(wrapper.backbone.conv1[6].weight, theirs.stem[6].weight)


def test_dropblock_and_last_gamma():
    model = ResNeStSA(variant="resnest14d", dropblock_prob=0.1, last_gamma=True)
    blocks = [m for m in model.modules() if isinstance(m, DropBlock2D)]
    assert blocks and all(m.drop_prob == 0.1 for m in blocks)
    assert not any(isinstance(m, DropBlock2D) for m in model.layer2.modules())  # stages 3-4 only
    assert torch.count_nonzero(model.layer4[0].bn3.weight) == 0
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], model(x)[-1])  # inactive in eval


def test_knobs_override_the_variant_row():
    model = ResNeStSA(variant="resnest14d", radix=1, cardinality=2, bottleneck_width=32, stem_width=16,
                      avd_first=True)
    assert model.arch["radix"] == 1 and model.arch["cardinality"] == 2 and model.arch["avd_first"]
    assert model.conv1[0].out_channels == 16
    assert ResNeStSA(depth=101).arch["layers"] == (3, 4, 23, 3)
    assert ResNeStSA(variant="resnest50", stem_channels=64).arch["stem_width"] == 32


@pytest.mark.parametrize("kwargs,message", [
    (dict(variant="resnest50", stem_channels=128), "stem_channels=128"),
    (dict(variant="resnest101", depth=50), "_delete_=True"),
    (dict(variant="resnest14d", out_indices=(4,)), "out_indices"),
    (dict(variant="resnest14d", frozen_stages=5), "frozen_stages"),
    (dict(variant="resnest14d", norm_cfg=dict(type="GN")), "num_groups"),
    (dict(variant="resnest14d", style="caffe"), "style"),
    (dict(variant="resnest14d", pretrained="a.pth", init_cfg=dict(type="Pretrained", checkpoint="a.pth")),
     "not both"),
    (dict(variant="nope"), "unknown ResNeSt variant"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, AssertionError, KeyError), match=message):
        ResNeStSA(**kwargs)


def test_init_cfg_accepts_official_names_and_prefix(tmp_path):
    torch.manual_seed(0)
    src = ResNeStSA(variant="resnest14d")
    official = tmp_path / "official.pth"
    torch.save({"model": src.state_dict()}, official)  # official names, wrapped
    model = ResNeStSA(variant="resnest14d", init_cfg=_pretrained(official))
    model.init_weights()
    assert model.load_report.naming == "official" and model.load_report.complete
    assert torch.equal(model.layer2[0].conv2.fc2.weight, src.layer2[0].conv2.fc2.weight)
    # a whole detector's checkpoint, with prefix= as mmengine's Pretrained init takes it
    detector = tmp_path / "detector.pth"
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                               "neck.conv.weight": torch.zeros(1)}}, detector)
    model = ResNeStSA(variant="resnest14d", init_cfg=_pretrained(detector, prefix="backbone."))
    model.init_weights()
    assert model.load_report.complete and model.load_report.ignored == ["neck.conv.weight"]
    # mmseg's EncoderDecoder(pretrained=...) hands the path to the backbone as `pretrained`
    from mmengine.config import ConfigDict

    model = MMSEG_MODELS.build(dict(type="EncoderDecoder", pretrained=str(official),
                                    backbone=ConfigDict(type="ResNeStSA", variant="resnest14d"),
                                    decode_head=dict(type="FCNHead", in_channels=2048, channels=16, num_classes=2,
                                                     num_convs=1, in_index=3)))
    model.init_weights()
    assert model.backbone.load_report.complete
    assert torch.equal(model.backbone.layer4[0].conv2.fc1.bias, src.layer4[0].conv2.fc1.bias)


def test_init_cfg_refuses_wrong_variant_and_unsafe_files(tmp_path):
    torch.manual_seed(0)
    small = tmp_path / "r14.pth"
    torch.save(ResNeStSA(variant="resnest14d").state_dict(), small)
    model = ResNeStSA(variant="resnest26d", init_cfg=_pretrained(small))
    before = model.layer1[0].conv1.weight.clone()
    with pytest.raises(CheckpointError, match=r"missing.*resnest14d|resnest14d[\s\S]*missing"):
        model.init_weights()
    assert torch.equal(model.layer1[0].conv1.weight, before)  # nothing loaded
    partial = ResNeStSA(variant="resnest26d", init_cfg=_pretrained(small, strict=False))
    partial.init_weights()  # strict=False: loads what fits, reports the rest
    assert partial.load_report.missing and torch.equal(partial.layer1[0].conv1.weight,
                                                       torch.load(small)["layer1.0.conv1.weight"])

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"stem.0.weight": torch.zeros(1)}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError):
        ResNeStSA(variant="resnest14d", init_cfg=_pretrained(evil)).init_weights()


def test_other_init_cfg_goes_through_mmengine():
    model = ResNeStSA(variant="resnest14d", init_cfg=dict(type="Constant", layer="Conv2d", val=0.5))
    model.init_weights()
    assert torch.all(model.layer1[0].conv1.weight == 0.5)
    assert model.is_init
