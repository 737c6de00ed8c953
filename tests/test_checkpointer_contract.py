"""The detectron2 checkpointer's contract on every detectron2 line, and the mmengine allowlist.

- load() is exception-safe: a refused load leaves the checkpointer usable. detectron2 main sets
  `_parsed_url_during_load` in load() and clears it only on success; the test reproduces that flow.
- `file.pkl?matching_heuristics=True` is honoured (detectron2 main's syntax) on v0.6 as well.
- Files that ask for matching heuristics are refused BEFORE anything is copied when they do not fill the
  trunk (they used to be refused only after a partial load).
- The mmengine allowlist admits HistoryBuffer's statistics methods and nothing else: a crafted file cannot
  change HistoryBuffer's class-level method table."""
import pickle

import numpy as np
import pytest
import torch

from conftest import d2_cfg, require
from resnest_backbone import build_resnest
from resnest_backbone.convert import CheckpointError, convert_checkpoint


pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


@pytest.fixture
def detector():
    from detectron2.modeling import build_model

    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.FPN.OUT_CHANNELS": 32,
                    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
                    "MODEL.ROI_HEADS.NUM_CLASSES": 3})
    return build_model(cfg)


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    good, bad = tmp_path / "resnest14d.pth", tmp_path / "resnest26d.pth"
    torch.save(build_resnest("resnest14d", num_classes=10).state_dict(), good)
    torch.save(build_resnest("resnest26d").state_dict(), bad)
    converted = tmp_path / "r14_d2.pkl"
    convert_checkpoint(str(good), str(converted))
    return {"good": good, "bad": bad, "pkl": converted}


def _installed_is_main() -> bool:
    import inspect

    from detectron2.checkpoint import DetectionCheckpointer

    return "_parsed_url_during_load" in inspect.getsource(DetectionCheckpointer.load)


def _emulate_detectron2_main(monkeypatch):
    """detectron2 main's DetectionCheckpointer.load: sets _parsed_url_during_load, strips the query, and
    resets it only after a successful load (an exception leaves it set). On the main line (.venv-d2main) the
    installed load() is the real one and is used as it is."""
    from urllib.parse import urlparse

    from detectron2.checkpoint import DetectionCheckpointer
    from fvcore.common.checkpoint import Checkpointer

    if _installed_is_main():
        return

    def load(self, path, *args, **kwargs):
        assert getattr(self, "_parsed_url_during_load", None) is None, "load() re-entered or left dirty"
        parsed = urlparse(path)
        self._parsed_url_during_load = parsed
        ret = Checkpointer.load(self, parsed._replace(query="").geturl(), *args, **kwargs)
        self._parsed_url_during_load = None
        return ret

    monkeypatch.setattr(DetectionCheckpointer, "load", load)


def test_a_refused_load_leaves_the_checkpointer_usable(detector, files, monkeypatch):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    _emulate_detectron2_main(monkeypatch)
    checkpointer = SafeDetectionCheckpointer(detector)
    for _ in range(2):
        with pytest.raises(CheckpointError, match="resnest26d.pth"):
            checkpointer.load(str(files["bad"]))
        assert getattr(checkpointer, "_parsed_url_during_load", None) is None
    checkpointer.load(str(files["good"]))  # not a bare AssertionError
    assert torch.equal(detector.backbone.bottom_up.layer1[0].conv2.fc1.weight,
                       torch.load(files["good"], weights_only=True)["layer1.0.conv2.fc1.weight"])


@pytest.mark.parametrize("main_line", [False, True], ids=["v0.6", "main"])
def test_matching_heuristics_query(detector, files, monkeypatch, main_line):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    if main_line:
        _emulate_detectron2_main(monkeypatch)
    elif _installed_is_main():
        pytest.skip("the installed detectron2 is main: the v0.6 case runs in .venv")
    # A whole-detector checkpoint with the trunk's prefix cut off: found only by detectron2's suffix matching.
    state = {k.replace("backbone.bottom_up.", ""): v.clone() + 1
             for k, v in detector.state_dict().items() if v.dtype.is_floating_point}
    path = files["good"].parent / "other_prefixes.pth"
    torch.save({"model": state}, path)
    trunk = detector.backbone.bottom_up
    expected = state["layer2.0.conv2.fc2.weight"].clone()
    with pytest.raises(CheckpointError, match="missing"):  # exact names: the trunk is not found
        SafeDetectionCheckpointer(detector).load(str(path))
    assert not torch.equal(trunk.layer2[0].conv2.fc2.weight, expected)
    SafeDetectionCheckpointer(detector).load(str(path) + "?matching_heuristics=True")
    assert torch.equal(trunk.layer2[0].conv2.fc2.weight, expected)
    with pytest.raises(ValueError, match="unsupported query"):
        SafeDetectionCheckpointer(detector).load(str(path) + "?foo=1")


def test_heuristic_files_are_refused_before_anything_is_copied(detector, files):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    # A Detectron-style file whose suffixes match the stem and the heads but not the whole trunk: detectron2
    # would copy what matches. It must be refused with the model untouched.
    state = {k: v + 1 for k, v in detector.state_dict().items() if v.dtype.is_floating_point
             and not k.startswith("backbone.bottom_up.layer4")}
    path = files["good"].parent / "partial.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "someone",
                     "matching_heuristics": True}, f)
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        SafeDetectionCheckpointer(detector).load(str(path))
    assert "partial.pkl" in str(err.value) and "missing" in str(err.value) and "nothing was loaded" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())  # nothing was copied


def test_converted_pkl_loads_through_the_heuristics_path(detector, files):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    SafeDetectionCheckpointer(detector).load(str(files["pkl"]) + "?matching_heuristics=True")
    assert torch.equal(detector.backbone.bottom_up.layer3[0].conv2.fc1.weight,
                       torch.load(files["good"], weights_only=True)["layer3.0.conv2.fc1.weight"])


# ------------------------------------------------------------------------------------- mmengine allowlist
class _CallWith:
    """Pickles as `func(*args)`: how a crafted file calls whatever an allowlist lets through."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_mmengine_allowlist_cannot_change_class_state(tmp_path):
    require("mmdet", "make env installs mmdet==3.3.0")
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import _load_checkpoint

    import resnest_backbone.mm  # noqa: F401  (installs the loader)
    from resnest_backbone.mm.compat import HISTORY_BUFFER_METHODS

    HistoryBuffer()  # the first instance fills the class-level table with the defaults
    table = dict(HistoryBuffer._statistics_methods)
    assert set(HISTORY_BUFFER_METHODS) == set(table)  # what mmengine registers is what we admit
    # register_statistics is a public callable of HistoryBuffer; the old allowlist let a file call it.
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {}, "x": _CallWith(HistoryBuffer.register_statistics, np.dtypes.Float32DType)},
               path)
    with pytest.raises(CheckpointError) as err:
        _load_checkpoint(str(path), map_location="cpu")
    assert "register_statistics" in str(err.value) and "crafted.pth" in str(err.value)
    assert dict(HistoryBuffer._statistics_methods) == table
    # what mmengine's checkpoints do contain still loads: a message hub's buffers, with their methods
    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"log_scalars": {"loss": buffer},
                                                                   "stat": HistoryBuffer.mean}}, tmp_path / "ok.pth")
    loaded = _load_checkpoint(str(tmp_path / "ok.pth"), map_location="cpu")
    assert loaded["message_hub"]["log_scalars"]["loss"].current() == 1.5
