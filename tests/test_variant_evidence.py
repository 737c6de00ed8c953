"""A checkpoint never lands silently in the wrong architecture.

avd_first (the official `fast` ablations) cannot be seen in weights: a `resnest50_fast_2s1x64d` file has
exactly the tensors of `resnest50`. The converter takes it from --variant, the file's record or the
official / timm file name, refuses when none decides, and records its decision in the output; every
loader compares that record with the model. Files here are saved directly by resnest==0.0.5 and by timm
under their published file names, and converted WITHOUT --variant."""
import os
import pickle

import pytest
import timm
import torch
from resnest.torch import ablation as official_ablation
from resnest.torch import resnest as official_resnest

from conftest import d2_cfg, official_features, randomize_norm_stats, require
from resnest_backbone import build_resnest
from resnest_backbone.convert import CheckpointError, convert_checkpoint, load_weights
from resnest_backbone.convert.cli import main as convert_main

# The published file names (official README / hub, timm's Hugging Face cache layout).
OFFICIAL = {
    "resnest50": ("resnest50-528c19ca.pth", official_resnest.resnest50),
    "resnest101": ("resnest101-22405ba7.pth", official_resnest.resnest101),
    "resnest200": ("resnest200-75117900.pth", official_resnest.resnest200),
    "resnest269": ("resnest269-0cc87c48.pth", official_resnest.resnest269),
    "resnest50_fast_1s1x64d": ("resnest50_fast_1s1x64d-d8fbf808.pth", official_ablation.resnest50_fast_1s1x64d),
    "resnest50_fast_2s1x64d": ("resnest50_fast_2s1x64d-44938639.pth", official_ablation.resnest50_fast_2s1x64d),
    "resnest50_fast_4s1x64d": ("resnest50_fast_4s1x64d-f74f3fc3.pth", official_ablation.resnest50_fast_4s1x64d),
    "resnest50_fast_1s2x40d": ("resnest50_fast_1s2x40d-9d126481.pth", official_ablation.resnest50_fast_1s2x40d),
    "resnest50_fast_2s2x40d": ("resnest50_fast_2s2x40d-9d126481.pth", official_ablation.resnest50_fast_2s2x40d),
    "resnest50_fast_4s2x40d": ("resnest50_fast_4s2x40d-41d14ed0.pth", official_ablation.resnest50_fast_4s2x40d),
    "resnest50_fast_1s4x24d": ("resnest50_fast_1s4x24d-d4a4f76f.pth", official_ablation.resnest50_fast_1s4x24d),
}
TIMM = {"resnest14d": "resnest14d", "resnest26d": "resnest26d", "resnest50d": "resnest50",
        "resnest50d_1s4x24d": "resnest50d_1s4x24d", "resnest50d_4s2x40d": "resnest50d_4s2x40d",
        "resnest101e": "resnest101", "resnest200e": "resnest200", "resnest269e": "resnest269"}
ARCH = ("layers", "radix", "cardinality", "bottleneck_width", "stem_width", "avd", "avd_first")


def _arch(variant):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
            build_resnest(variant).arch.items() if k in ARCH}


def _recorded(path):
    with open(path, "rb") as f:
        return pickle.load(f)["resnest"]  # our own output, written by the test: plain pickle is fine here


@pytest.mark.parametrize("variant", list(OFFICIAL))
def test_official_files_are_detected_without_variant(tmp_path, variant):
    name, factory = OFFICIAL[variant]
    torch.manual_seed(0)
    src, dst = tmp_path / name, tmp_path / "out.pkl"
    torch.save(factory().state_dict(), src)
    assert convert_main([str(src), str(dst)]) == 0
    record = _recorded(dst)
    assert record["variant"] == variant
    assert {k: record["arch"][k] for k in ARCH} == _arch(variant)


@pytest.mark.slow
def test_timm_models_are_detected_without_variant(tmp_path):
    assert sorted(timm.list_models("resnest*")) == sorted(TIMM)  # every timm ResNeSt is covered
    from safetensors.torch import save_file

    for model_name, variant in TIMM.items():
        # timm's hub files: models--timm--<name>.<tag>/snapshots/<hash>/model.safetensors
        folder = tmp_path / f"models--timm--{model_name}.in1k" / "snapshots" / "0123abcd"
        folder.mkdir(parents=True)
        src = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(model_name).state_dict().items()}, str(src))
        dst = tmp_path / f"{model_name}.pth"
        report = convert_checkpoint(str(src), str(dst), fmt="mmdet")
        assert _arch(report.variant) == _arch(variant), model_name
        recorded = torch.load(dst, weights_only=True)["meta"]["resnest"]
        assert {k: recorded["arch"][k] for k in ARCH} == _arch(variant), model_name
        src.unlink()


def test_ambiguous_file_is_refused_with_the_candidates(tmp_path, capsys):
    src, dst = tmp_path / "model.pth", tmp_path / "out.pkl"
    torch.save(official_ablation.resnest50_fast_2s1x64d().state_dict(), src)
    assert convert_main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "--variant resnest50 " in err and "--variant resnest50_fast_2s1x64d" in err
    assert "avd_first" in err and not dst.exists()
    # the user decides; the decision is recorded
    assert convert_main([str(src), str(dst), "--variant", "resnest50_fast_2s1x64d"]) == 0
    assert _recorded(dst)["variant"] == "resnest50_fast_2s1x64d" and _recorded(dst)["decided_by"] == "--variant"


@pytest.mark.parametrize("name,variant", [
    ("resnest50-528c19ca.pth", "resnest50"), ("resnest50_fast_2s1x64d-44938639.pth", "resnest50_fast_2s1x64d"),
    ("resnest50d_4s2x40d-41d14ed0.pth", "resnest50d_4s2x40d"), ("gluon_resnest50.pth", "resnest50"),
    ("resnest50_d2.pkl", "resnest50"), ("resnest101-mmdet.pth", "resnest101"),
    ("resnest50_fast_2s1x64d_finetuned.pth", "resnest50_fast_2s1x64d"),
    ("resnest50_fast.pth", None), ("resnest50_2s1x64d.pth", None), ("resnest500.pth", None), ("model.pth", None),
    ("models--timm--resnest26d.gluon_in1k/snapshots/0123/model.safetensors", "resnest26d"),
])
def test_file_name_conventions(name, variant):
    from resnest_backbone.convert import variant_from_filename

    assert variant_from_filename(os.path.join("/some/folder", name)) == variant


def test_file_name_contradicting_the_weights_is_refused(tmp_path, capsys):
    src = tmp_path / "resnest101-22405ba7.pth"
    torch.save(official_resnest.resnest50().state_dict(), src)
    assert convert_main([str(src), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err
    assert "file name says resnest101" in err and "resnest50" in err


@pytest.mark.d2
def test_fast_checkpoint_end_to_end(tmp_path):
    """The reviewer's case: an official resnest50_fast_2s1x64d file converted without --variant. It used to
    be written as resnest50 and load strictly into resnest50 with res5 off by 2.5-4.8."""
    from detectron2.layers import ShapeSpec

    from resnest_backbone.d2 import SafeDetectionCheckpointer, build_resnest_backbone

    torch.manual_seed(0)
    official = randomize_norm_stats(official_ablation.resnest50_fast_2s1x64d()).eval()
    src = tmp_path / "resnest50_fast_2s1x64d-44938639.pth"
    torch.save(official.state_dict(), src)
    outputs = {}
    for fmt, name in (("d2", "fast.pkl"), ("mmdet", "fast_mmdet.pth"), ("official", "fast.safetensors")):
        outputs[fmt] = str(tmp_path / name)
        assert convert_checkpoint(str(src), outputs[fmt], fmt=fmt).variant == "resnest50_fast_2s1x64d"

    def backbone(variant):
        cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": variant, "MODEL.BACKBONE.FREEZE_AT": 0})
        return build_resnest_backbone(cfg, ShapeSpec(channels=3)).eval()

    wrong = backbone("resnest50")
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    for path in list(outputs.values()) + [str(src)]:  # every format, and the original by its name
        with pytest.raises(CheckpointError) as err:
            SafeDetectionCheckpointer(wrong).load(path)
        message = str(err.value)
        assert path in message and "resnest50_fast_2s1x64d" in message and "avd_first=True" in message
        assert "resnest50 (avd_first=False)" in message and "nothing was loaded" in message
        with pytest.raises(CheckpointError, match="avd_first"):
            load_weights(build_resnest("resnest50"), path)
        with pytest.raises(CheckpointError, match="avd_first"):
            load_weights(build_resnest("resnest50"), path, strict=False)  # partial loads too
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())  # nothing was loaded

    right = backbone("resnest50_fast_2s1x64d")
    SafeDetectionCheckpointer(right).load(outputs["d2"])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, got = official_features(official, x), right(x)
    for stage in expected:
        assert (got[stage] - expected[stage]).abs().max().item() == 0.0, stage  # bit-identical


def test_openmmlab_loader_checks_the_record(tmp_path):
    require("mmdet", "make env installs mmdet==3.3.0")
    from resnest_backbone.mm import ResNeStSA

    src = tmp_path / "resnest50_fast_2s1x64d-44938639.pth"
    torch.save(official_ablation.resnest50_fast_2s1x64d().state_dict(), src)
    dst = tmp_path / "renamed_by_user.pth"  # the record travels with the file, whatever its name
    convert_checkpoint(str(src), str(dst), fmt="mmdet")
    wrong = ResNeStSA(variant="resnest50", init_cfg=dict(type="Pretrained", checkpoint=str(dst)))
    with pytest.raises(CheckpointError, match="avd_first"):
        wrong.init_weights()
    right = ResNeStSA(variant="resnest50_fast_2s1x64d", init_cfg=dict(type="Pretrained", checkpoint=str(dst)))
    right.init_weights()
    assert right.load_report.complete and right.load_report.record["variant"] == "resnest50_fast_2s1x64d"


@pytest.mark.d2
def test_training_checkpoints_record_the_model(tmp_path):
    from detectron2.layers import ShapeSpec

    from resnest_backbone.d2 import SafeDetectionCheckpointer, build_resnest_backbone

    def backbone(variant):
        cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": variant, "MODEL.BACKBONE.FREEZE_AT": 0})
        return build_resnest_backbone(cfg, ShapeSpec(channels=3))

    SafeDetectionCheckpointer(backbone("resnest50_fast_2s1x64d"), str(tmp_path)).save("model_final")
    path = os.path.join(tmp_path, "model_final.pth")
    assert torch.load(path, weights_only=True)["resnest"]["arch"]["avd_first"] is True
    with pytest.raises(CheckpointError, match="saved from a model of resnest50_fast_2s1x64d"):
        SafeDetectionCheckpointer(backbone("resnest50")).load(path)  # e.g. --eval-only with another config
    SafeDetectionCheckpointer(backbone("resnest50_fast_2s1x64d")).load(path)


def test_state_dicts_carry_the_architecture(tmp_path):
    """A trunk's state_dict records its architecture in its metadata (no extra keys: official files still
    load strictly), so torch.save + load_state_dict, mmengine's load_from / resume and detectron2 training
    checkpoints refuse a trunk of another avd_first."""
    fast, plain = build_resnest("resnest50_fast_2s1x64d"), build_resnest("resnest50")
    path = tmp_path / "fast_state.pth"
    torch.save(fast.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == set(plain.state_dict())  # the same tensors: shapes alone cannot tell
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="avd_first=True but this model has avd_first=False"):
        plain.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    build_resnest("resnest50_fast_2s1x64d").load_state_dict(state)  # the right model loads it
    plain.load_state_dict(official_resnest.resnest50().state_dict(), strict=False)  # official: no record


def test_mmengine_load_from_refuses_another_avd_first(tmp_path):
    require("mmdet", "make env installs mmdet==3.3.0")
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

    from resnest_backbone.mm import ResNeStSA

    path = str(tmp_path / "epoch_1.pth")
    save_checkpoint(ResNeStSA(variant="resnest50_fast_2s1x64d").state_dict(), path)  # what a Runner writes
    with pytest.raises(ValueError, match="avd_first"):
        load_checkpoint(ResNeStSA(variant="resnest50"), path, map_location="cpu")  # load_from / resume
    load_checkpoint(ResNeStSA(variant="resnest50_fast_2s1x64d"), path, map_location="cpu")


def test_mmengine_load_from_refuses_a_trunk_that_does_not_fit(tmp_path):
    """mmengine's load_from copies what fits and only logs size mismatches; ResNeStSA refuses a partial or
    wrong-shape trunk before any of it is copied (heads may differ)."""
    require("mmdet", "make env installs mmdet==3.3.0")
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

    from resnest_backbone.convert import CheckpointError
    from resnest_backbone.mm import ResNeStSA

    def detector(variant, classes=3):
        model = torch.nn.Module()
        model.backbone = ResNeStSA(variant=variant)
        model.head = torch.nn.Linear(4, classes)
        return model

    path = str(tmp_path / "iter_10.pth")
    save_checkpoint(detector("resnest26d").state_dict(), path)
    target = detector("resnest14d")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"ResNeStSA\(resnest14d\).*unexpected"):
        load_checkpoint(target, path, map_location="cpu")  # what Runner.load_from does
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items() if k.startswith("backbone."))
    load_checkpoint(detector("resnest26d", classes=5), path, map_location="cpu")  # other heads: fine
