"""Issue 6, checkpoints: nothing we are handed is executed, on every load path.

Each hostile file carries a payload that creates a marker file when unpickled; a control test proves the
payload really fires under plain pickle / torch.load(weights_only=False), so the refusals below are
meaningful. Legitimate layouts (pickle protocols 2-5, numpy arrays in .pth, torch's legacy format,
safetensors) must still load."""
import argparse
import functools
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from resnest_backbone import build_resnest
from resnest_backbone.convert import (CheckpointError, convert_checkpoint, load_state_dict, load_weights,
                                      read_checkpoint)
from resnest_backbone.convert.cli import main as convert_main


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@functools.lru_cache(maxsize=1)
def _trunk_state():
    return OrderedDict(build_resnest("resnest14d").state_dict())


def _trunk_with(payload):
    """A real ResNeSt state_dict with the payload hidden among the weights."""
    state = OrderedDict(_trunk_state())
    state["layer1.0.conv2.fc1.weight"] = payload
    return state


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(marker, {kind: path}) written once for the module; every test checks the marker stays absent."""
    marker, files = _hostile_files(tmp_path_factory.mktemp("hostile"))
    yield marker, files
    assert not marker.exists()


def _hostile_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = Payload(str(marker))
    files = {}
    files["pkl"] = tmp_path / "evil.pkl"  # detectron2 format
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                               for k, v in _trunk_with(payload).items()},
                     "__author__": "x", "matching_heuristics": True}, f, protocol=2)
    files["pth"] = tmp_path / "evil.pth"  # torch zip format
    torch.save(_trunk_with(payload), files["pth"])
    files["legacy_pth"] = tmp_path / "evil_legacy.pth"  # torch's pre-1.6 format
    torch.save(_trunk_with(payload), files["legacy_pth"], _use_new_zipfile_serialization=False)
    files["pickle_as_pth"] = tmp_path / "evil_plain.pth"  # a plain pickle behind a .pth name
    with open(files["pickle_as_pth"], "wb") as f:
        pickle.dump({"a": np.zeros(3, np.float32), "b": payload}, f, protocol=4)
    files["object_array"] = tmp_path / "evil_objarray.pkl"  # payload inside a numpy object array
    with open(files["object_array"], "wb") as f:
        pickle.dump({"conv1.0.weight": np.array([payload, 1], dtype=object)}, f, protocol=4)
    return marker, files


def test_payload_fires_without_protection(tmp_path):
    # Control: the payload is real, so a refusal below is a refusal of working exploit code.
    marker, files = _hostile_files(tmp_path)
    with open(files["pkl"], "rb") as f:
        pickle.load(f, encoding="latin1")  # what detectron2's own DetectionCheckpointer does with a .pkl
    assert marker.exists()
    marker.unlink()
    torch.load(files["pth"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pkl", "pth", "legacy_pth", "pickle_as_pth", "object_array"])
def test_hostile_checkpoint_refused_by_every_reader(hostile, kind):
    marker, files = hostile
    path = str(files[kind])
    for load in (read_checkpoint, load_state_dict):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert path in message and "refused" in message and "posix.system" in message
        assert "Nothing in the file was executed" in message
        assert "weights_only set to False" not in message  # torch's advice to disable the protection
    with pytest.raises(CheckpointError):
        load_weights(build_resnest("resnest14d"), path)
    assert not marker.exists()


def test_hostile_checkpoint_refused_by_converter_cli(hostile, tmp_path, capsys):
    marker, files = hostile
    for kind in ("pkl", "pth"):
        out = tmp_path / f"out_{kind}.pkl"
        assert convert_main([str(files[kind]), str(out)]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and str(files[kind]) in err
        assert not out.exists()
    assert not marker.exists()
    assert not list(tmp_path.glob("out_*"))  # no temporary files either


@pytest.mark.d2
def test_hostile_checkpoint_refused_by_detectron2_checkpointer(hostile, tmp_path):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    marker, files = hostile
    model = build_resnest("resnest14d")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path / "run"))
    for kind in ("pkl", "pth", "legacy_pth"):
        with pytest.raises(CheckpointError, match="refused"):
            checkpointer.load(str(files[kind]))
    # --resume path: last_checkpoint pointing at a hostile file
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "evil.pth").write_bytes(files["pth"].read_bytes())
    (run / "last_checkpoint").write_text("evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        checkpointer.resume_or_load("", resume=True)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_pickled_outside_torch_save_is_refused(tmp_path):
    # pickle.dump of a tensor reconstructs through torch internals (and torch.load of raw bytes): refused.
    path = tmp_path / "tensor.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1.0.weight": torch.zeros(2)}, f, protocol=4)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_numpy_pickles_of_any_protocol_load(tmp_path, protocol):
    weights = {"conv1.0.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
               "scalar": np.float64(2.5), "ints": np.arange(3, dtype=np.int64)}
    path = tmp_path / f"p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": OrderedDict(weights), "__author__": "me"}, f, protocol=protocol)
    out = load_state_dict(str(path))
    assert torch.equal(out["conv1.0.weight"], torch.from_numpy(weights["conv1.0.weight"]))
    assert out["scalar"].item() == 2.5 and out["ints"].tolist() == [0, 1, 2]


def test_training_checkpoints_with_numpy_and_namespace_load(tmp_path):
    # timm / mmcv training checkpoints carry argparse.Namespace args and numpy values: data, admitted.
    path = tmp_path / "checkpoint-3.pth.tar"
    state = build_resnest("resnest14d").state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1, model="resnest14d"),
                "metric": np.float64(0.5), "epoch": 3}, path)
    data = read_checkpoint(str(path))
    assert data["args"].lr == 0.1 and data["epoch"] == 3
    assert set(load_state_dict(str(path))) == set(state)


def test_legacy_torch_format_loads(tmp_path):
    path = tmp_path / "legacy.pth"
    state = build_resnest("resnest14d").state_dict()
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(str(path))["layer4.0.conv2.fc2.weight"], state["layer4.0.conv2.fc2.weight"])


def test_safetensors_in_and_out(tmp_path):
    from safetensors.torch import save_file

    model = build_resnest("resnest14d", num_classes=7)
    src = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    out = tmp_path / "mmdet.safetensors"
    convert_checkpoint(str(src), str(out), "mmdet")
    back = tmp_path / "official_back.safetensors"
    convert_checkpoint(str(out), str(back), "official")
    fresh = build_resnest("resnest14d")
    report = load_weights(fresh, str(back))
    assert report.complete and report.naming == "official"
    for key, value in fresh.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, model.state_dict()[key]), key


def test_safetensors_does_not_use_pickle(tmp_path, monkeypatch):
    # A .safetensors never reaches an unpickler, however it is named inside.
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"conv1.0.weight": torch.ones(2, 2)}, str(path))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickler used for a safetensors file")

    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    assert torch.equal(read_checkpoint(str(path))["conv1.0.weight"], torch.ones(2, 2))


def test_old_torch_is_refused_or_warned(tmp_path, monkeypatch):
    # torch.load(weights_only=True) does not exist before 1.13 and had a bypass before 2.6 (CVE-2025-32434).
    from resnest_backbone.convert import io

    path = tmp_path / "w.pth"
    torch.save({"conv1.0.weight": torch.ones(1)}, path)
    monkeypatch.setattr(io, "_torch_version", lambda: (1, 12))
    with pytest.raises(CheckpointError, match="cannot load .pth files safely"):
        read_checkpoint(str(path))
    monkeypatch.setattr(io, "_torch_version", lambda: (2, 4))
    monkeypatch.setattr(io, "_warned_old_torch", False)
    with pytest.warns(UserWarning, match="CVE-2025-32434"):
        read_checkpoint(str(path))
