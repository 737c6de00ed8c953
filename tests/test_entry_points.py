"""Every way a weight file enters the project goes through the one safe reader (resnest_backbone.convert.io).

Each entry point (the command-line tools in real processes, and every loader in-process) is handed a
crafted `.pkl`, a crafted `.pth` (torch zip whose pickle carries a `__reduce__` payload) and a pickle renamed
`.safetensors`. None may run the payload (its marker file stays absent); each must exit non-zero (or raise)
with a message naming the file. (test_security.py checks statically that nothing else unpickles.)"""
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from conftest import require
from resnest_backbone import build_resnest
from resnest_backbone.convert import CheckpointError, convert_checkpoint, load_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("pkl", "pth", "safetensors")
DEMO = os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml")
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
        "DATASETS.TEST", "('resnest_demo_det_val_mini',)"]


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(folder, kind, marker):
    """A real-looking ResNeSt-14 checkpoint with the payload among its tensors."""
    state = OrderedDict((k, v) for k, v in build_resnest("resnest14d").state_dict().items())
    state["layer1.0.conv2.fc1.weight"] = Payload(marker)
    path = folder / f"resnest14d_{kind}_crafted.{kind}"
    if kind == "pth":
        torch.save({"state_dict": state}, path)  # torch's zip format
    else:  # a detectron2-style pickle; behind a .safetensors name it is still a pickle
        with open(path, "wb") as f:
            pickle.dump({"model": {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.items()},
                         "__author__": "x", "matching_heuristics": True}, f, protocol=4)
    return path


@pytest.fixture
def crafted(tmp_path):
    """kind -> (path, marker); after the test every marker must still be absent."""
    files = {}
    for kind in KINDS:
        marker = tmp_path / f"PWNED_{kind}"
        files[kind] = (_crafted(tmp_path, kind, marker), marker)
    yield files
    for path, marker in files.values():
        assert not marker.exists(), f"{path}: its payload ran"


def test_the_payload_is_real(tmp_path):
    # Control: plain pickle / torch.load(weights_only=False) run it, so the refusals below mean something.
    marker = tmp_path / "FIRED"
    for kind in ("pkl", "pth"):
        path = _crafted(tmp_path, kind, marker)
        if kind == "pkl":
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    return env


def _run(cmd, cwd):
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def _cli_cases(path, tmp_path):
    """(name, argv) of every command-line entry point that reads a weight file, given `path`."""
    tool = lambda name: os.path.join(REPO, "tools", name)  # noqa: E731
    out = tmp_path / "out"
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (resume_dir / "last_checkpoint").write_text(os.path.basename(path))
    return [
        ("resnest-convert", [tool("convert_weights.py"), str(path), str(out) + ".pkl"]),
        ("export backbone --weights", [tool("export.py"), "backbone", "--variant", "resnest14d", "--weights",
                                       str(path), "--height", "64", "--width", "64", "-o", str(out) + ".onnx"]),
        ("export detectron2 MODEL.WEIGHTS", [tool("export.py"), "detectron2", "--config-file", DEMO, "--height",
                                             "64", "--width", "64", "-o", str(out) + "_d2.onnx",
                                             "MODEL.WEIGHTS", str(path)]),
        ("train_net MODEL.WEIGHTS", [tool("train_net.py"), "--config-file", DEMO, *TINY, "MODEL.WEIGHTS", str(path),
                                     "OUTPUT_DIR", str(tmp_path / "train")]),
        ("train_net --eval-only", [tool("train_net.py"), "--config-file", DEMO, "--eval-only", *TINY,
                                   "MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "eval")]),
        ("train_net --resume", [tool("train_net.py"), "--config-file", DEMO, "--resume", *TINY,
                                "OUTPUT_DIR", str(resume_dir)]),
        ("demo MODEL.WEIGHTS", [tool("demo.py"), "--max-iter", "4", "--output", str(tmp_path / "demo"), *TINY[:8],
                                "MODEL.WEIGHTS", str(path)]),
    ]


def _tree(folder):
    """Every file and folder under `folder`, with each file's size and modification time."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = None if name in dirs else (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.slow
@pytest.mark.d2
@pytest.mark.parametrize("kind", KINDS)
def test_every_command_line_tool_refuses_crafted_files(crafted, tmp_path, kind):
    """... and writes nothing: the whole folder the commands run in and write to (their output folders and
    files, the --resume folder that holds the crafted checkpoint) is as it was before each command."""
    path, marker = crafted[kind]
    for name, cmd in _cli_cases(path, tmp_path):
        before = _tree(tmp_path)
        proc = _run(cmd, tmp_path)
        assert proc.returncode != 0, f"{name}: exit 0 on a crafted {kind}\n{proc.stdout[-2000:]}"
        assert os.path.basename(str(path)) in proc.stdout and "refused" in proc.stdout, \
            f"{name}: the message does not name the file or the refusal\n{proc.stdout[-3000:]}"
        assert not marker.exists(), f"{name}: the payload ran"
        after = _tree(tmp_path)
        assert after == before, f"{name} wrote {sorted(set(after.items()) - set(before.items()))}"


@pytest.mark.d2
@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_refuses_crafted_files(crafted, tmp_path, kind):
    from detectron2.layers import ShapeSpec

    from conftest import d2_cfg
    from resnest_backbone.d2 import SafeDetectionCheckpointer, build_resnest_backbone

    path, marker = crafted[kind]
    name = os.path.basename(str(path))

    def refused(call, *args, **kwargs):
        with pytest.raises(CheckpointError) as err:
            call(*args, **kwargs)
        assert name in str(err.value) and "refused" in str(err.value), str(err.value)  # full path, or its copy
        assert not marker.exists()

    refused(convert_checkpoint, str(path), str(tmp_path / "out.pkl"))
    refused(load_weights, build_resnest("resnest14d"), str(path))
    backbone = build_resnest_backbone(d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d"}), ShapeSpec(channels=3))
    checkpointer = SafeDetectionCheckpointer(backbone, str(tmp_path / "run"))
    refused(checkpointer.load, str(path))
    refused(checkpointer.load, str(path) + "?matching_heuristics=True")
    refused(checkpointer.resume_or_load, str(path), resume=False)  # MODEL.WEIGHTS
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / name).write_bytes(path.read_bytes())
    (run / "last_checkpoint").write_text(name)
    refused(checkpointer.resume_or_load, "", resume=True)  # --resume
    assert not os.path.exists(tmp_path / "out.pkl")


@pytest.mark.parametrize("kind", KINDS)
def test_openmmlab_loaders_refuse_crafted_files(crafted, kind):
    require("mmdet", "make env installs mmdet==3.3.0")
    from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

    from resnest_backbone.mm import ResNeStSA

    path, marker = crafted[kind]

    def refused(call, *args, **kwargs):
        with pytest.raises(CheckpointError) as err:
            call(*args, **kwargs)
        assert str(path) in str(err.value) and "refused" in str(err.value), str(err.value)
        assert not marker.exists()

    backbone = ResNeStSA(variant="resnest14d", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    refused(backbone.init_weights)  # init_cfg
    refused(_load_checkpoint, str(path), map_location="cpu")  # Runner.load_checkpoint: load_from / resume
    refused(CheckpointLoader.load_checkpoint, str(path))

