"""detectron2's own tools, as shipped with the detectron2 line under test (upstream v0.6's sdist in .venv,
upstream main's in .venv-d2main: setup_env.sh keeps them unmodified in <venv>/detectron2-tools), run the
project's configs with the plugin registered by `python -m resnest_backbone.d2.run`: train a few iterations on
the generated demo data, --resume, --eval-only (COCO evaluation falls back to pycocotools: there is no C++
extension), plain_train_net.py, FLOP and parameter counting; the environment report says there is no
extension."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import require

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(sys.prefix, "detectron2-tools")
TINY = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "('resnest_demo_det_val_mini',)"]
NO_EXTENSION = "Fast COCO eval is not built. Falling back to official COCO eval."

require(TOOLS, "upstream detectron2's tools, kept beside the environment: tools/env/setup_env.sh puts them there")


def tool(name):
    return os.path.join(TOOLS, name)


def run(*args, cwd=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "resnest_backbone.d2.run", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def iterations(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if '"total_loss"' in line]


def test_the_tools_are_the_shipped_files():
    """Byte for byte the files of the archive they came from (setup_env.sh records which)."""
    with open(os.path.join(TOOLS, "SOURCE")) as f:
        archive, sha256 = f.read().split()
    with open(archive, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == sha256
    if archive.endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            shipped = {os.path.basename(n): z.read(n) for n in z.namelist() if n.startswith("tools/")}
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            shipped = {os.path.basename(m.name): t.extractfile(m).read() for m in t.getmembers()
                       if m.isfile() and os.path.basename(os.path.dirname(m.name)) == "tools"}
    names = ["train_net.py", "plain_train_net.py", "lazyconfig_train_net.py", "analyze_model.py"]
    for name in names:
        with open(tool(name), "rb") as f:
            assert f.read() == shipped[name], f"{tool(name)} differs from {name} in {archive}"


def test_environment_report_says_there_is_no_extension():
    proc = subprocess.run([sys.executable, "-m", "detectron2.utils.collect_env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("detectron2._C"))
    assert "not built correctly" in line and "No module named 'detectron2._C'" in line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """upstream tools/train_net.py, 2 iterations of the demo config, then its final COCO evaluation."""
    out = str(tmp_path_factory.mktemp("upstream_train") / "run")
    log = run(tool("train_net.py"), "--config-file", "demo_faster_rcnn_resnest.yaml", "--num-gpus", "1",
              *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out)
    return out, log


def detections(output_dir):
    with open(os.path.join(output_dir, "inference", "coco_instances_results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_train_net_trains_and_evaluates(trained):
    out, log = trained
    assert "Starting training from iteration 0" in log and iterations(out) == [1]  # written at the last one
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "config.yaml")) as f:
        config = f.read()
    assert "build_resnest_fpn_backbone" in config and "resnest14d" in config  # the plugin's model was built
    assert "ResNeStBackbone" in log  # detectron2 prints the model: the ResNeSt trunk is in it
    assert NO_EXTENSION in log and "Evaluation results for bbox" in log and "copypaste: AP,AP50" in log


@pytest.mark.slow
def test_train_net_resume(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained[0], out)
    log = run(tool("train_net.py"), "--config-file", "demo_faster_rcnn_resnest.yaml", "--resume", *TINY,
              "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", out)
    assert "model_final.pth" in log and "Starting training from iteration 2" in log  # resumed, not restarted
    assert iterations(out) == [1, 2]


def test_train_net_eval_only(trained, tmp_path):
    weights = os.path.join(trained[0], "model_final.pth")
    log = run(tool("train_net.py"), "--config-file", "demo_faster_rcnn_resnest.yaml", "--eval-only", *TINY,
              "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "eval"))
    assert NO_EXTENSION in log and "copypaste: AP,AP50" in log
    assert "not found in the checkpoint" not in log  # every parameter came from the file
    # the same weights: the same detections as the evaluation at the end of training
    found = detections(str(tmp_path / "eval"))
    assert len(found) > 0 and found == detections(trained[0])


@pytest.mark.slow
def test_plain_train_net(tmp_path):
    out = str(tmp_path / "plain")
    log = run(tool("plain_train_net.py"), "--config-file", "demo_faster_rcnn_resnest.yaml", *TINY,
              "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out)
    assert os.path.isfile(os.path.join(out, "model_final.pth")) and "copypaste: AP,AP50" in log


@pytest.mark.parametrize("task,expect", [("parameter", "backbone.bottom_up"), ("flop", "Total GFlops")])
def test_analyze_model(task, expect):
    log = run(tool("analyze_model.py"), "--config-file", "demo_faster_rcnn_resnest.yaml", "--tasks", task,
              "--num-inputs", "1", *TINY)
    assert expect in log


class _Payload:
    """Unpickling this creates `marker` (a crafted checkpoint)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_launcher_loads_weights_only_through_the_safe_reader(tmp_path):
    """Upstream's train_net.py would unpickle MODEL.WEIGHTS with detectron2's DetectionCheckpointer; through
    the launcher a crafted .pkl is refused, names the file, and runs nothing."""
    import pickle

    marker, crafted = tmp_path / "payload_ran", tmp_path / "crafted.pkl"
    with open(crafted, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "resnest_backbone.d2.run", tool("train_net.py"), "--config-file",
                           "demo_faster_rcnn_resnest.yaml", "--eval-only", *TINY, "MODEL.WEIGHTS", str(crafted),
                           "OUTPUT_DIR", str(tmp_path / "eval")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "crafted.pkl" in output and "refused" in output, output[-3000:]
    assert not marker.exists()

