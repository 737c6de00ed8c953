"""resnest-convert: formats, naming tables, variant detection, refusals, --force."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import resnest_backbone
from resnest_backbone.convert import D2FORK, MMDET, NAMINGS, load_state_dict, read_arch, variants_matching
from resnest_backbone.convert.cli import main as convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def official_state():
    torch.manual_seed(0)
    return resnest_backbone.build_resnest("resnest14d", num_classes=10).state_dict()


def _save(state, path):
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_naming_tables_round_trip(official_state, naming):
    table = NAMINGS[naming]
    renamed = {table.from_official(k): k for k in official_state}
    assert len(renamed) == len(official_state)  # no two keys collapse
    assert all(table.to_official(new) == old for new, old in renamed.items())


def test_naming_traps():
    # conv2.bn1 (attention norm) is neither the block's bn1 nor the stem's bn1; downsample.0 has no params.
    assert D2FORK.from_official("layer1.0.conv2.bn1.weight") == "res2.0.conv2.bn1.weight"
    assert D2FORK.from_official("layer1.0.bn1.weight") == "res2.0.conv1.norm.weight"
    assert D2FORK.from_official("bn1.weight") == "stem.conv1_3.norm.weight"
    assert D2FORK.from_official("layer4.2.downsample.2.running_var") == "res5.2.shortcut.norm.running_var"
    assert MMDET.from_official("bn1.bias") == "stem.7.bias"
    assert MMDET.from_official("layer3.1.conv2.bn1.bias") == "layer3.1.conv2.bn1.bias"


@pytest.mark.parametrize("variant", ["resnest14d", "resnest26d", "resnest50", "resnest101", "resnest200",
                                     "resnest50_fast_1s1x64d", "resnest50_fast_4s2x40d",
                                     "resnest50_fast_1s4x24d"])
def test_variant_detected_from_weights(variant):
    with torch.device("meta"):
        state = resnest_backbone.build_resnest(variant).state_dict()
    found = variants_matching(read_arch(state))
    assert variant in found
    # Candidates may differ only in avd_first (a parameter-free pool placement) or in name.
    archs = [{k: v for k, v in resnest_backbone.VARIANTS[v].arch().items() if k != "avd_first"} for v in found]
    assert all(a == archs[0] for a in archs)


def test_cli_round_trip_d2_and_mmdet(tmp_path, official_state, capsys):
    src = _save(official_state, tmp_path / "official.pth")
    d2, mm, back = tmp_path / "model.pkl", tmp_path / "mmdet.pth", tmp_path / "back.safetensors"
    assert convert_main([src, str(d2)]) == 0
    out = capsys.readouterr().out
    assert "variant: resnest14d" in out and "dropped 2 keys: fc.weight, fc.bias" in out
    with open(d2, "rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] and payload["resnest"]["variant"] == "resnest14d"
    assert payload["resnest"]["decided_by"] == "weights" and payload["resnest"]["arch"]["avd_first"] is False
    assert "fc.weight" not in payload["model"] and "layer1.0.conv2.fc1.weight" in payload["model"]

    assert convert_main([str(d2), str(mm), "--format", "mmdet"]) == 0
    mm_state = torch.load(mm, weights_only=True)["state_dict"]
    assert "stem.7.weight" in mm_state and "bn1.weight" not in mm_state

    assert convert_main([str(mm), str(back), "--format", "official"]) == 0
    restored = load_state_dict(str(back))
    for key, value in official_state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(restored[key], value), key


def test_wrapped_and_prefixed_checkpoints(tmp_path, official_state):
    """A training checkpoint of a detector: {"model": {"backbone.bottom_up.stem.conv1_1...": ...}}."""
    fork = {"backbone.bottom_up." + D2FORK.from_official(k): v for k, v in official_state.items()}
    fork["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 4)
    src = _save({"model": fork, "iteration": 5}, tmp_path / "fork.pth")
    dst = tmp_path / "out.pkl"
    assert convert_main([src, str(dst)]) == 0
    with open(dst, "rb") as f:
        model = pickle.load(f)["model"]
    assert torch.equal(torch.from_numpy(model["layer1.0.conv2.bn1.weight"]),
                       official_state["layer1.0.conv2.bn1.weight"])
    assert "roi_heads.box_predictor.cls_score.weight" not in model


def test_mismatch_refused_without_output(tmp_path, official_state):
    src = _save(official_state, tmp_path / "r14.pth")
    dst = tmp_path / "out.pkl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"), src, str(dst),
                           "--variant", "resnest26d"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "does not fit variant resnest26d" in proc.stderr and "detected in the file: resnest14d" in proc.stderr
    assert "missing layer1.1.conv1.weight" in proc.stderr
    assert not dst.exists() and os.listdir(tmp_path) == ["r14.pth"]


def test_force_needed_to_overwrite(tmp_path, official_state):
    src = _save(official_state, tmp_path / "r14.pth")
    dst = tmp_path / "out.pkl"
    dst.write_bytes(b"precious")
    assert convert_main([src, str(dst)]) == 2
    assert dst.read_bytes() == b"precious"
    assert convert_main([src, str(dst), "--force"]) == 0
    assert dst.read_bytes() != b"precious"
    assert sorted(os.listdir(tmp_path)) == ["out.pkl", "r14.pth"]  # no temporary files left


def test_console_entry_point(tmp_path, official_state):
    src = _save(official_state, tmp_path / "r14.pth")
    exe = os.path.join(os.path.dirname(sys.executable), "resnest-convert")
    proc = subprocess.run([exe, src, str(tmp_path / "x.pkl")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
