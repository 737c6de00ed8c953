"""Issue 6, runs: a process killed (SIGKILL) at any moment, including in the middle of a checkpoint write,
leaves the last good checkpoint loadable, `last_checkpoint` pointing at a complete file, and no partial
`*.pth`; temporary files may remain but are never picked up. Also end to end with tools/train_net.py
--resume, killed while it writes a checkpoint."""
import datetime
import glob
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


from conftest import require  # noqa: E402

require("detectron2", "make env installs detectron2")
from resnest_backbone import build_resnest  # noqa: E402
from resnest_backbone.convert import read_checkpoint  # noqa: E402
from resnest_backbone.d2 import SafeDetectionCheckpointer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _writer(save_dir, start, saved):
    """The process we kill: saves checkpoints in a loop, each tensor filled with the iteration (so a mixed
    or partial file would show), reporting each completed save."""
    torch.set_num_threads(1)  # forked child: stay out of the parent's thread pool
    model = build_resnest("resnest14d")  # ~40 MB of weights: each save takes a while
    checkpointer = SafeDetectionCheckpointer(model, save_dir, save_to_disk=True)
    i = start
    while True:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.fill_(i)
        checkpointer.save(f"model_{i % 3:07d}", iteration=i)
        saved.put(i)
        i += 1


def _run_and_kill(save_dir, start, rng, wait_for_tmp):
    """Start a writer (forked: no second interpreter start-up), and SIGKILL it after it saved at least
    once: at a random moment, or as soon as a temporary checkpoint file exists (inside torch.save / fsync /
    verification, before the rename). Returns the first iteration it reported saved."""
    ctx = multiprocessing.get_context("fork")
    saved = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(save_dir, start, saved), daemon=True)
    proc.start()
    try:
        first = saved.get(timeout=120)
        deadline = time.time() + 60
        if wait_for_tmp:
            while not glob.glob(os.path.join(save_dir, "model_*.pth.*.tmp")) and time.time() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    return first


def _check_run_folder(save_dir):
    """What --resume relies on: the tag, the file it names, and every *.pth complete and consistent."""
    model = build_resnest("resnest14d")
    checkpointer = SafeDetectionCheckpointer(model, save_dir)
    assert checkpointer.has_checkpoint()
    last = checkpointer.get_checkpoint_file()
    assert os.path.isfile(last)
    assert all(f.endswith(".pth") for f in checkpointer.get_all_checkpoint_files())
    extra = checkpointer.resume_or_load("", resume=True)
    iteration = extra["iteration"]
    values = {float(t.flatten()[0]) for t in model.state_dict().values() if t.is_floating_point()}
    assert values == {float(iteration)}, "a checkpoint mixes two saves"
    for path in glob.glob(os.path.join(save_dir, "*.pth")):
        data = read_checkpoint(path)  # raises on a truncated file
        assert {float(t.flatten()[0]) for t in data["model"].values() if t.is_floating_point()} == \
            {float(data["iteration"])}
    return iteration


@pytest.mark.slow
def test_killed_writer_always_leaves_a_loadable_last_checkpoint(tmp_path):
    rng = random.Random(6)
    save_dir = str(tmp_path / "run")
    start, killed_mid_write = 0, 0
    for round_ in range(5):
        first = _run_and_kill(save_dir, start, rng, wait_for_tmp=round_ % 2 == 1)
        leftovers = glob.glob(os.path.join(save_dir, "*.tmp"))
        killed_mid_write += bool(leftovers)
        iteration = _check_run_folder(save_dir)
        assert iteration >= first  # never older than a save the writer had reported
        start = iteration + 1  # resume numbering
    assert killed_mid_write >= 1, "no kill landed inside a checkpoint write"


def test_no_partial_target_even_when_the_write_itself_fails(tmp_path, monkeypatch):
    model = build_resnest("resnest14d")
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000001", iteration=1)
    good = (tmp_path / "model_0000001.pth").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpointer.save("model_0000001", iteration=2)
    with pytest.raises(OSError):
        checkpointer.save("model_0000002", iteration=2)
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_save_refuses_state_that_could_not_be_resumed(tmp_path):
    # A checkpointable whose state holds an arbitrary object would be unloadable by the weights-only
    # reader; refuse at save time (naming it) rather than after hours of training, keeping the last tag.
    class Hook:
        def state_dict(self):
            return {"started": datetime.datetime(2026, 1, 1)}  # an object, not plain data

        def load_state_dict(self, state):
            pass

    model = build_resnest("resnest14d")
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path), save_to_disk=True, hook=Hook())
    from resnest_backbone.convert import CheckpointError

    with pytest.raises(CheckpointError, match="datetime.datetime.*could not be loaded back"):
        checkpointer.save("model_0000001")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------
# End to end: tools/train_net.py killed while writing a checkpoint, then --resume.

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")


def _train_cmd(out_dir, max_iter, *extra):
    return [sys.executable, TRAIN_NET, "--config-file", os.path.join(ROOT, "configs", "demo_faster_rcnn_resnest.yaml"),
            *extra, "OUTPUT_DIR", out_dir, "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "1",
            "SOLVER.IMS_PER_BATCH", "1", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "TEST.EVAL_PERIOD", "0",
            "DATASETS.TEST", "()"]


@pytest.mark.slow
def test_train_net_killed_during_checkpoint_write_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DETECTRON2_DATASETS=str(tmp_path / "datasets"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out_dir = str(tmp_path / "out")
    proc = subprocess.Popen(_train_cmd(out_dir, 50), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        # wait until at least one checkpoint is tagged, then kill as soon as the next write is under way
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(out_dir, "last_checkpoint")) and \
                    glob.glob(os.path.join(out_dir, "model_*.pth.*.tmp")):
                break
            time.sleep(0.002)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert glob.glob(os.path.join(out_dir, "*.tmp")), "the kill did not land inside a checkpoint write"
    tagged = open(os.path.join(out_dir, "last_checkpoint")).read().strip()
    done = read_checkpoint(os.path.join(out_dir, tagged))["iteration"]

    result = subprocess.run(_train_cmd(out_dir, done + 3, "--resume"), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Starting training from iteration {done + 1}" in log
    final = read_checkpoint(os.path.join(out_dir, "model_final.pth"))
    assert final["iteration"] == done + 2
    assert open(os.path.join(out_dir, "last_checkpoint")).read().strip() == "model_final.pth"
