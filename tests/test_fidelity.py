"""Official resnest==0.0.5 model -> saved state_dict -> resnest-convert -> our detectron2 backbone:
res2..res5 equal the official layer1..layer4 bit for bit (max |difference| == 0.0; eval, fp32, randomly
initialised official models with random BN statistics: resnest50/101/200 and four `fast` variants);
resnest200 and resnest269 have every official tensor (names, shapes; on the meta device)."""
import pytest
import torch
from resnest.torch import ablation as official_ablation
from resnest.torch import resnest as official_resnest

from conftest import d2_cfg, official_features, randomize_norm_stats
from resnest_backbone.convert.cli import main as convert_main
from resnest_backbone.d2 import SafeDetectionCheckpointer, build_resnest_backbone
from detectron2.layers import ShapeSpec

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


CASES = [
    ("resnest50", official_resnest.resnest50),
    ("resnest101", official_resnest.resnest101),
    ("resnest50_fast_1s1x64d", official_ablation.resnest50_fast_1s1x64d),  # radix 1 (sigmoid)
    ("resnest50_fast_2s2x40d", official_ablation.resnest50_fast_2s2x40d),  # cardinality 2
    ("resnest50_fast_4s2x40d", official_ablation.resnest50_fast_4s2x40d),  # radix 4, cardinality 2
    ("resnest50_fast_1s4x24d", official_ablation.resnest50_fast_1s4x24d),  # radix 1, cardinality 4
]


def _convert_and_load(tmp_path, official, variant, norm="BN", **official_kwargs):
    src, dst = tmp_path / "official.pth", tmp_path / "d2.pkl"
    torch.save(official.state_dict(), src)
    assert convert_main([str(src), str(dst), "--variant", variant]) == 0
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": variant, "MODEL.RESNETS.NORM": norm,
                    "MODEL.BACKBONE.FREEZE_AT": 0, **official_kwargs})
    backbone = build_resnest_backbone(cfg, ShapeSpec(channels=3))
    with torch.no_grad():  # so that a tensor left at its initial value cannot pass for a loaded one
        for value in backbone.state_dict().values():
            if value.dtype.is_floating_point:
                value.fill_(float("nan"))
    SafeDetectionCheckpointer(backbone).load(str(dst))
    # Every backbone tensor came from the checkpoint (no missing keys, nothing left at init).
    theirs = official.state_dict()
    for key, value in backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, theirs[key]), key
    return backbone.eval()


def _assert_bit_identical(got, expected):
    for name in expected:
        assert got[name].shape == expected[name].shape
        diff = (got[name] - expected[name]).abs().max().item()
        assert diff == 0.0, f"{name}: max |ours - official| = {diff}"


@pytest.mark.parametrize("variant,factory", CASES, ids=[c[0] for c in CASES])
def test_converted_weights_reproduce_official_features(tmp_path, variant, factory):
    torch.manual_seed(0)
    official = randomize_norm_stats(factory()).eval()
    ours = _convert_and_load(tmp_path, official, variant)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected, got = official_features(official, x), ours(x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    _assert_bit_identical(got, expected)


@pytest.mark.slow
def test_resnest200_converted_weights_reproduce_official_features(tmp_path):
    # The deepest variant tested with values (3-24-36-3, 70 M parameters), at a small input to stay fast.
    torch.manual_seed(2)
    official = randomize_norm_stats(official_resnest.resnest200()).eval()
    ours = _convert_and_load(tmp_path, official, "resnest200")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = official_features(official, x), ours(x)
    _assert_bit_identical(got, expected)


@pytest.mark.parametrize("variant,factory", [("resnest200", official_resnest.resnest200),
                                             ("resnest269", official_resnest.resnest269)])
def test_deep_variants_have_every_official_tensor(variant, factory):
    """On the meta device (structure, no values): our detectron2 backbone of the variant has exactly the
    official model's tensors (names, shapes), the ones the converter carries over unchanged for detectron2."""
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": variant, "MODEL.RESNETS.NORM": "BN", "MODEL.BACKBONE.FREEZE_AT": 0})
    with torch.device("meta"):
        official = factory()
        ours = build_resnest_backbone(cfg, ShapeSpec(channels=3))
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert [len(getattr(ours, f"layer{i}")) for i in range(1, 5)] == [len(getattr(official, f"layer{i}"))
                                                                     for i in range(1, 5)]


@pytest.mark.parametrize("output_stride,official_kwargs", [(8, {"dilated": True}), (16, {"dilation": 2})])
def test_dilated_trunk_matches_official(tmp_path, output_stride, official_kwargs):
    torch.manual_seed(1)
    official = randomize_norm_stats(official_resnest.resnest50(**official_kwargs)).eval()
    ours = _convert_and_load(tmp_path, official, "resnest50",
                             **{"MODEL.RESNEST.OUTPUT_STRIDE": output_stride})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = official_features(official, x), ours(x)
    for name, spec in ours.output_shape().items():
        assert got[name].shape[-2:] == (64 // spec.stride, 96 // spec.stride)
    _assert_bit_identical(got, expected)
    assert ours.output_shape()["res5"].stride == output_stride
