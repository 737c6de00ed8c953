"""Issue 6, checkpoints: wrong, broken or foreign files give one clear error (file, detected variant, first
mismatching keys with shapes), a non-zero exit, no output file and an untouched existing output; partial
loads are never silent."""
import functools
import os
import pickle
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from conftest import require
from resnest_backbone import build_resnest
from resnest_backbone.convert import (CheckpointError, atomic_write, convert_checkpoint, load_state_dict,
                                      load_weights, read_checkpoint)
from resnest_backbone.convert.cli import main as convert_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@functools.lru_cache(maxsize=None)
def _state(variant, **kw):
    torch.manual_seed(0)
    return build_resnest(variant, **kw).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import timm
    import torchvision

    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    out["r14"] = d / "resnest14d.pth"
    torch.save(_state("resnest14d", num_classes=10), out["r14"])
    out["r26"] = d / "resnest26d.pth"
    torch.save(_state("resnest26d"), out["r26"])
    out["fast"] = d / "resnest14d_4s.pth"  # same blocks, other radix: every split-attention shape differs
    torch.save(build_resnest("resnest14d", radix=4).state_dict(), out["fast"])
    out["vit"] = d / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), out["vit"])
    out["resnet"] = d / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), out["resnet"])
    out["resnetd"] = d / "resnet26d.pth"  # ResNeSt's deep stem and avg-down shortcut, but no split attention
    torch.save(timm.create_model("resnet26d", pretrained=False).state_dict(), out["resnetd"])
    data = out["r14"].read_bytes()
    out["truncated_pth"] = d / "truncated.pth"
    out["truncated_pth"].write_bytes(data[: len(data) // 2])
    pkl = d / "resnest14d.pkl"
    convert_checkpoint(str(out["r14"]), str(pkl))
    out["pkl"] = pkl
    out["truncated_pkl"] = d / "truncated.pkl"
    out["truncated_pkl"].write_bytes(pkl.read_bytes()[:5000])
    st = d / "w.safetensors"
    convert_checkpoint(str(out["r14"]), str(st), "official")
    out["truncated_safetensors"] = d / "truncated.safetensors"
    out["truncated_safetensors"].write_bytes(st.read_bytes()[:3000])
    out["empty"] = d / "empty.pth"
    out["empty"].write_bytes(b"")
    out["html"] = d / "download.pth"
    out["html"].write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    out["lfs"] = d / "lfs.pth"
    out["lfs"].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    out["image"] = d / "photo.jpg"
    out["image"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    out["image_as_pth"] = d / "photo.pth"
    out["image_as_pth"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    out["garbage"] = d / "garbage.pth"
    out["garbage"].write_bytes(os.urandom(4096))
    out["list"] = d / "list.pth"
    torch.save([torch.zeros(1)], out["list"])
    return out


@pytest.mark.parametrize("name, reason", [
    ("truncated_pth", "truncated"), ("truncated_pkl", "truncated"), ("truncated_safetensors", "truncated"),
    ("empty", "empty file"), ("html", "HTML"), ("lfs", "Git LFS pointer"), ("image", "unknown checkpoint format"),
    ("image_as_pth", "an image"), ("garbage", "cannot be read"), ("list", "not a dict of weights"),
])
def test_unreadable_files_name_the_file_and_the_reason(files, name, reason):
    path = str(files[name])
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert path in message and reason in message
    assert "\n\n" not in message and "Traceback" not in message


def test_missing_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="folder"):
        read_checkpoint(str(tmp_path))


@pytest.mark.parametrize("name, detected, mention", [
    ("vit", "Vision Transformer", "patch_embed.proj.weight [192, 3, 16, 16]"),
    ("resnet", "ResNet/ResNeXt with a 7x7 stem", "conv1.weight [64, 3, 7, 7]"),
    ("resnetd", "radix=0", "layers=(2, 2, 2, 2)"),
    ("r26", "detected in the file: resnest26d", "unexpected layer1.1.conv1.weight [64, 256, 1, 1]"),
    ("fast", "resnest14d", "layer1.0.conv2.conv.weight: checkpoint [256, 16, 3, 3], model "
                           "[128, 32, 3, 3]"),
])
def test_cli_refuses_foreign_checkpoints(files, tmp_path, capsys, name, detected, mention):
    variant = ["--variant", "resnest14d"] if name in ("r26", "fast") else []
    out = tmp_path / "out.pkl"
    assert convert_main([str(files[name]), str(out)] + variant) == 2
    err = capsys.readouterr().err
    assert str(files[name]) in err and detected in err and mention in err, err
    assert not out.exists() and os.listdir(tmp_path) == []  # no output, no temporary left over


def test_failed_conversion_leaves_existing_output_untouched(files, tmp_path, capsys):
    out = tmp_path / "keep.pkl"
    out.write_bytes(b"previous good output")
    before = os.stat(out)
    for name in ("vit", "truncated_pth", "html"):
        assert convert_main([str(files[name]), str(out), "--force"]) == 2
    assert convert_main([str(files["r26"]), str(out), "--force", "--variant", "resnest14d"]) == 2
    assert out.read_bytes() == b"previous good output" and os.stat(out).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["keep.pkl"]
    # a valid conversion without --force refuses too
    assert convert_main([str(files["r14"]), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"previous good output"
    assert convert_main([str(files["r14"]), str(out), "--force"]) == 0
    assert load_state_dict(str(out))["conv1.0.weight"].shape == (32, 3, 3, 3)


@pytest.mark.slow  # the CLI in a process of its own
def test_cli_reports_unwritable_output(files, tmp_path):
    """An output folder its owner may not write to (mode 0555). Root writes anywhere through its capability
    CAP_DAC_OVERRIDE, so as root the CLI runs without it (util-linux's setpriv drops it from the bounding set):
    then the kernel refuses root as it refuses any user."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    drop = []
    if os.geteuid() == 0:
        setpriv = require(shutil.which("setpriv") or "/usr/bin/setpriv", "util-linux's setpriv (drops root's "
                          "CAP_DAC_OVERRIDE for this test)")
        drop = [setpriv, "--bounding-set=-dac_override", "--"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        proc = subprocess.run(drop + [sys.executable, "-m", "resnest_backbone.convert.cli", str(files["r14"]),
                                      str(folder / "out.pkl")], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        # the output asked for, not the temporary file it was being written to
        assert proc.stderr.startswith(f"resnest-convert: error: {folder / 'out.pkl'}: Permission denied; nothing "
                                      "was written"), proc.stderr[-2000:]
        assert os.listdir(folder) == []
    finally:
        folder.chmod(stat.S_IRWXU)


def test_round_trip_through_every_format(files, tmp_path):
    # official .pth -> detectron2 .pkl -> mmdet .pth -> official .safetensors -> model: all identical.
    # (Reading back a .pkl used to fail: its BN step counters are dropped, and the check called them missing.)
    pkl, mm, st = tmp_path / "a.pkl", tmp_path / "b.pth", tmp_path / "c.safetensors"
    convert_checkpoint(str(files["r14"]), str(pkl))
    convert_checkpoint(str(pkl), str(mm), "mmdet")
    assert "stem.0.weight" in load_state_dict(str(mm))
    convert_checkpoint(str(mm), str(st), "official")
    model = build_resnest("resnest14d", num_classes=10)
    report = load_weights(model, str(st), strict=False)
    assert report.missing == ["fc.weight [10, 2048]", "fc.bias [10]"] and not report.unexpected
    original = _state("resnest14d", num_classes=10)
    for key, value in model.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, original[key]), key


def test_outputs_get_normal_permissions(files, tmp_path):
    # atomic_write goes through mkstemp (mode 0600): outputs used to be unreadable for the group/others.
    umask = os.umask(0o022)
    try:
        out = tmp_path / "shared.pkl"
        convert_checkpoint(str(files["r14"]), str(out))
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    finally:
        os.umask(umask)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(str(target), failing, force=True)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.pth"]


def test_atomic_write_never_replaces_a_file_that_appears_while_writing(tmp_path):
    target = tmp_path / "out.pkl"

    def racing(tmp):
        target.write_bytes(b"someone else's")
        with open(tmp, "wb") as f:
            f.write(b"ours")

    with pytest.raises(CheckpointError, match="exists"):
        atomic_write(str(target), racing, force=False)
    assert target.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["out.pkl"]


def test_load_weights_strict_refuses_partial_and_loads_nothing(files):
    model = build_resnest("resnest14d")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, str(files["fast"]))
    message = str(err.value)
    assert str(files["fast"]) in message and "nothing was loaded" in message
    assert "layer1.0.conv2.conv.weight: checkpoint [256, 16, 3, 3], model [128, 32, 3, 3]" in message
    with pytest.raises(CheckpointError, match="detected in the file: resnest26d"):
        load_weights(model, str(files["r26"]))
    with pytest.raises(CheckpointError, match="Vision Transformer"):
        load_weights(model, str(files["vit"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_weights_non_strict_reports_what_did_not_load(files, tmp_path):
    state = dict(_state("resnest14d", num_classes=10))
    del state["layer3.0.conv2.fc1.weight"]
    state["layer9.0.extra"] = torch.zeros(3)
    state["layer4.0.conv3.weight"] = torch.zeros(7, 7, 1, 1)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    model = build_resnest("resnest14d")
    with pytest.raises(CheckpointError, match="1 wrong shapes, 1 missing, 1 unexpected"):
        load_weights(model, str(path))
    report = load_weights(model, str(path), strict=False)
    assert not report.complete and report.prefix == "module."
    assert report.missing == ["layer3.0.conv2.fc1.weight [128, 256, 1, 1]"]
    assert report.unexpected == ["layer9.0.extra [3]"]
    assert report.mismatched == ["layer4.0.conv3.weight: checkpoint [7, 7, 1, 1], model [2048, 512, 1, 1]"]
    assert "module.fc.weight" in report.ignored  # the model has no classifier
    text = str(report)
    assert "missing: 1" in text and "wrong shape" in text
    assert torch.equal(model.layer1[0].conv2.fc1.weight, state["layer1.0.conv2.fc1.weight"])  # the rest loaded


@pytest.mark.d2
def test_load_weights_into_detectron2_backbone_from_any_naming(files, tmp_path):
    from resnest_backbone.convert import MMDET

    require("detectron2", "make env installs detectron2")
    from detectron2.layers import ShapeSpec

    from resnest_backbone.d2 import build_resnest_fpn_backbone
    from conftest import d2_cfg

    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d"})
    fpn = build_resnest_fpn_backbone(cfg, ShapeSpec(channels=3))
    mm = tmp_path / "mm.pth"
    original = _state("resnest14d", num_classes=10)
    torch.save({"state_dict": {"backbone." + MMDET.from_official(k): v for k, v in original.items()},
                "meta": {"epoch": 12}}, mm)
    report = load_weights(fpn, str(mm))
    assert report.complete and report.target == "bottom_up" and report.naming == "mmdet"
    assert torch.equal(fpn.bottom_up.bn1.running_mean, original["bn1.running_mean"])  # FrozenBN stem
    assert torch.equal(fpn.bottom_up.layer3[0].conv2.bn1.weight, original["layer3.0.conv2.bn1.weight"])


def test_wrong_output_extension_and_format(files, tmp_path):
    with pytest.raises(CheckpointError, match="must end with .pkl"):
        convert_checkpoint(str(files["r14"]), str(tmp_path / "x.pth"), "d2")
    with pytest.raises(CheckpointError, match="unknown output format"):
        convert_checkpoint(str(files["r14"]), str(tmp_path / "x.pth"), "onnx")
    assert os.listdir(tmp_path) == []


def test_hostile_shapes_in_a_resnest_named_file(tmp_path):
    # ResNeSt key names with nonsense shapes: a clear error, not an IndexError / ZeroDivisionError.
    state = dict(_state("resnest14d"))
    state["layer1.0.conv2.conv.weight"] = torch.zeros(5)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="layer1.0.conv2.conv.weight has shape \\[5\\]"):
        convert_checkpoint(str(path), str(tmp_path / "o.pkl"))
    state["layer1.0.conv2.conv.weight"] = torch.zeros(128, 0, 3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=str(path)):
        convert_checkpoint(str(path), str(tmp_path / "o.pkl"))
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump({"conv1.0.weight": __import__("numpy").array(["a", "b"])}, f)
    with pytest.raises(CheckpointError, match="dtype <U1"):
        load_state_dict(str(tmp_path / "obj.pkl"))
    assert not (tmp_path / "o.pkl").exists()


@pytest.fixture(scope="module")
def detector():
    require("detectron2", "make env installs detectron2")
    from detectron2.modeling import build_model

    from conftest import d2_cfg

    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.FPN.OUT_CHANNELS": 32,
                    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
                    "MODEL.ROI_HEADS.NUM_CLASSES": 3})
    return build_model(cfg)


@pytest.mark.d2
def test_detectron2_checkpointer_loads_every_naming_by_exact_name(files, detector, tmp_path):
    # official .pth (with classifier), our .pkl, mmdet .pth, safetensors: the trunk lands in
    # backbone.bottom_up by exact name (not by suffix heuristics), the classifier is dropped.
    from resnest_backbone.convert import MMDET
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    original = _state("resnest14d", num_classes=10)
    mm = tmp_path / "mm.pth"
    torch.save({"state_dict": {MMDET.from_official(k): v for k, v in original.items()}}, mm)
    st = tmp_path / "w.safetensors"
    convert_checkpoint(str(files["r14"]), str(st), "official")
    trunk = detector.backbone.bottom_up
    for path in (files["r14"], files["pkl"], mm, st):
        with torch.no_grad():
            trunk.layer2[0].conv2.fc2.weight.zero_()
            trunk.bn1.running_var.fill_(7)
        SafeDetectionCheckpointer(detector).load(str(path))
        assert torch.equal(trunk.layer2[0].conv2.fc2.weight, original["layer2.0.conv2.fc2.weight"]), path
        assert torch.equal(trunk.bn1.running_var, original["bn1.running_var"]), path  # FrozenBN stem


@pytest.mark.d2
def test_detectron2_checkpointer_refuses_a_partial_trunk_before_loading(files, detector, tmp_path, caplog):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    before = {k: v.clone() for k, v in detector.state_dict().items()}
    checkpointer = SafeDetectionCheckpointer(detector)
    for name, needle in (("r26", "92 unexpected"), ("fast", "wrong shapes"), ("vit", "0 wrong shapes")):
        with pytest.raises(CheckpointError) as err:
            checkpointer.load(str(files[name]))
        message = str(err.value)
        assert str(files[name]) in message and needle in message and "nothing was loaded" in message
    assert "detected in the file: resnest26d" in str(pytest.raises(CheckpointError, checkpointer.load,
                                                                   str(files["r26"])).value)
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    # A Detectron/Caffe2-style .pkl (suffix heuristics) that fills none of the trunk: refused too.
    c2 = tmp_path / "R-50.pkl"
    with open(c2, "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": __import__("numpy").zeros((64, 64, 1, 1), "float32")}}, f)
    with pytest.raises(CheckpointError, match="missing"):
        checkpointer.load(str(c2))
    # Opting out loads what fits and logs what did not.
    partial = SafeDetectionCheckpointer(detector)
    partial.strict_backbone = False
    partial.load(str(files["r26"]))
    assert torch.equal(detector.backbone.bottom_up.layer1[0].conv1.weight,
                       _state("resnest26d")["layer1.0.conv1.weight"])


@pytest.mark.d2
def test_detectron2_checkpoint_with_other_heads_still_loads(detector, tmp_path):
    # Fine-tuning to another class count: heads differ (skipped, logged by detectron2), trunk complete.
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    state = {k: v.clone() for k, v in detector.state_dict().items()}
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 32)
    state["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(81)
    key = "backbone.bottom_up.layer4.0.conv3.weight"
    state[key] = torch.full_like(state[key], 3)
    torch.save({"model": state, "iteration": 5}, tmp_path / "model_0000005.pth")
    extra = SafeDetectionCheckpointer(detector).load(str(tmp_path / "model_0000005.pth"))
    assert extra["iteration"] == 5
    assert (detector.backbone.bottom_up.layer4[0].conv3.weight == 3).all()
    assert detector.roi_heads.box_predictor.cls_score.weight.shape[0] == 4
