"""A training run killed with SIGKILL resumes (--resume) at the iteration of its last checkpoint, and no
checkpoint on disk is left unreadable (checkpoints are written to a temporary file, then renamed).

Resume is exact (resnest_backbone.d2.resume): killed after a checkpoint and resumed, a run ends with the same
weights, BN statistics, optimizer and LR-scheduler state, bit for bit, as the same run never interrupted, every
iteration done once on the same data with the same loss; also with a random seed (SEED -1), two processes
(their whole process group killed), aspect-ratio grouping and data loader workers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tensors_of

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo_faster_rcnn_resnest.yaml")
# The demo config at test scale: 64 px images, batch 2, few proposals.
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.BASE_LR", "0.01", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "DATASETS.TEST", "('resnest_demo_det_val_mini',)"]


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    return env


def _train_cmd(out, *extra):
    return [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG, *extra,
            *TINY, "OUTPUT_DIR", str(out)]


def _checkpoint_iteration(path):
    return torch.load(path, map_location="cpu", weights_only=True)["iteration"]


def _tagged_iteration(out):
    """The iteration in the name last_checkpoint holds (model_0000007.pth: 7), -1 before there is one. The
    tag is replaced by a rename, so a read sees a whole name."""
    tag = out / "last_checkpoint"
    name = tag.read_text().strip() if tag.exists() else ""
    number = name[len("model_"):-len(".pth")] if name.startswith("model_") and name.endswith(".pth") else ""
    return int(number) if number.isdigit() else -1


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    # A long run, checkpointing every 4 iterations; killed once two checkpoints are on disk.
    first = subprocess.Popen(_train_cmd(out, "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "4"),
                             cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 150
    try:
        while time.time() < deadline and first.poll() is None:
            # the tag, not the file: it is written after the checkpoint's rename and fsyncs
            if _tagged_iteration(out) >= 7:
                break
            time.sleep(0.2)
        assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
        assert _tagged_iteration(out) >= 7, "no second checkpoint within the time limit"
        time.sleep(0.3)  # let it go on into the next checkpoint period: the kill lands mid-run
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, every checkpoint on disk is whole and last_checkpoint names one.
    checkpoints = sorted(out.glob("model_*.pth"))
    assert checkpoints
    for path in checkpoints:
        _checkpoint_iteration(path)
    last = (out / "last_checkpoint").read_text().strip()
    assert (out / last).exists()
    saved = _checkpoint_iteration(out / last)
    # The checkpoint is renamed into place first, then last_checkpoint: a kill that lands between the two
    # renames leaves last_checkpoint on the checkpoint before the newest (seen in CI: 7 with 11 on disk).
    on_disk = sorted(_checkpoint_iteration(p) for p in checkpoints)
    assert saved >= 7 and saved in on_disk[-2:], (saved, on_disk)
    state = torch.load(out / last, map_location="cpu", weights_only=True)
    trainer_state = state["trainer"]  # optimizer (momentum) and LR scheduler are in the checkpoint too
    assert trainer_state["_trainer"]["optimizer"]["state"] and trainer_state["iteration"] == saved
    assert trainer_state["hooks"]["LRScheduler"]["last_epoch"] == saved + 1

    # Resume: training continues at the iteration after the checkpoint and runs to MAX_ITER.
    max_iter = saved + 4
    resumed = subprocess.run(_train_cmd(out, "--resume", "SOLVER.MAX_ITER", str(max_iter),
                                        "SOLVER.CHECKPOINT_PERIOD", "4"),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"Loading from {out / last}" in resumed.stdout and f"Loading trainer from {out / last}" in resumed.stdout
    assert f"Starting training from iteration {saved + 1}" in resumed.stdout
    final = out / "model_final.pth"
    assert _checkpoint_iteration(final) == max_iter - 1
    # metrics.json: the resumed run's entries start after the checkpoint (none repeat the killed run's
    # iterations up to it), and it evaluated at the end.
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    iters = [r["iteration"] for r in rows if "total_loss" in r]
    assert iters[-1] == max_iter - 1
    assert any("bbox/AP50" in r for r in rows)

    # --eval-only on the final weights reads them back and reports COCO box AP.
    evaluated = subprocess.run(_train_cmd(out, "--eval-only", "MODEL.WEIGHTS", str(final)), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in evaluated.stdout


# ------------------------------------------------------------------------------------------ exact resume
# A run killed (SIGKILL) after a checkpoint and resumed with --resume ends with the same weights, bit for
# bit, as the same run never interrupted, and replays every iteration's data and loss exactly once.
#
# The runs go through tools/train_net.py with one hook added in front (the recorder below): after every
# step it appends the iteration, its total loss and the data stream position to a JSON-lines file (before
# the checkpointer hook runs, so every checkpointed iteration is recorded), and it SIGKILLs its own process
# at the start of iteration RESUME_KILL_AT: a deterministic kill point between two checkpoints.
RECORDER = """
import json, os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from detectron2.engine import HookBase
from resnest_backbone.d2 import train

class Record(HookBase):
    def before_step(self):
        if self.trainer.iter == int(os.environ.get("RESUME_KILL_AT", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self):
        loader = self.trainer._trainer.data_loader
        row = {{"iter": self.trainer.iter, "loss": self.trainer.storage.history("total_loss").latest(),
               "data": loader.state_dict() if hasattr(loader, "state_dict") else None}}
        with open(os.environ["RESUME_RECORD"], "a") as f:
            f.write(json.dumps(row) + "\\n")

if os.environ.get("RESUME_MAINS_SAMPLERS") == "1":  # detectron2 main's sampler construction (b1c43ffb)
    import detectron2.data.build
    sys.path.insert(0, os.path.join({repo!r}, "tests"))
    from test_upstream_main import use_mains_samplers
    use_mains_samplers(detectron2.data.build)

build_hooks = train.Trainer.build_hooks
train.Trainer.build_hooks = lambda self: [Record()] + build_hooks(self)
train.Trainer.exact_resume = os.environ.get("RESUME_EXACT", "1") == "1"
sys.argv = [{train_net!r}] + sys.argv[1:]
runpy.run_path({train_net!r}, run_name="__main__")
"""
EXACT_ITERS, EXACT_PERIOD, EXACT_KILL_AT = 12, 4, 10  # checkpoints after iterations 3, 7, 11; killed in 10
# No evaluation (not under test here), random flips and a 2-size scale jitter: augmentation randomness in play.
EXACT_OPTS = ["SOLVER.MAX_ITER", str(EXACT_ITERS), "SOLVER.CHECKPOINT_PERIOD", str(EXACT_PERIOD), "SEED", "3",
              "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(56, 64)"]


def _recorded_run(tmp_path, out, name, *extra, kill_at=None, exact=True, opts=(), mains_samplers=False):
    script = tmp_path / "recorded_train_net.py"
    script.write_text(RECORDER.format(repo=REPO, train_net=os.path.join(REPO, "tools", "train_net.py")))
    env = dict(_env(), RESUME_RECORD=str(tmp_path / f"{name}.jsonl"), RESUME_EXACT="1" if exact else "0",
               RESUME_MAINS_SAMPLERS="1" if mains_samplers else "0")
    if kill_at is not None:
        env["RESUME_KILL_AT"] = str(kill_at)
    cmd = [sys.executable, str(script), "--config-file", CONFIG, *extra, *TINY, *EXACT_OPTS, *opts,
           "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert (tmp_path / f"{name}.jsonl").exists(), proc.stdout[-3000:]  # no step ran
    rows = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
    return proc, rows


def _killed_and_resumed(tmp_path, name, exact=True, opts=(), mains_samplers=False):
    """Run B: killed at the start of iteration EXACT_KILL_AT, then --resume to the same MAX_ITER."""
    out = tmp_path / name
    killed, before = _recorded_run(tmp_path, out, f"{name}_1", kill_at=EXACT_KILL_AT, exact=exact, opts=opts,
                                   mains_samplers=mains_samplers)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text().strip()
    saved = _checkpoint_iteration(out / last)
    resumed, after = _recorded_run(tmp_path, out, f"{name}_2", "--resume", exact=exact, opts=opts,
                                   mains_samplers=mains_samplers)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    return out, saved, before, after, resumed.stdout


def _tensors(path):
    """Every tensor of a checkpoint (model, optimizer state, ...) by its path of keys."""
    return tensors_of(torch.load(path, map_location="cpu", weights_only=True))


def _max_abs_diff(a, b):
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    uninterrupted, rows_a = _recorded_run(tmp_path, tmp_path / "a", "a")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    out, saved, before, after, log = _killed_and_resumed(tmp_path, "b")

    # The kill came after the checkpoint of iteration 7, which the resume starts from.
    assert saved == 7 and [r["iter"] for r in before] == list(range(EXACT_KILL_AT))
    assert f"Starting training from iteration {saved + 1}" in log
    # Each iteration exactly once in the resumed history (the killed run's iterations up to its checkpoint,
    # then the resumed run's), none skipped, none repeated; the killed run's work after its checkpoint
    # (iterations 8 and 9) is done again.
    history = [r for r in before if r["iter"] <= saved] + after
    assert [r["iter"] for r in history] == list(range(EXACT_ITERS)) == [r["iter"] for r in rows_a]
    assert [r["iter"] for r in after] == list(range(saved + 1, EXACT_ITERS))
    # metrics.json: the resumed part's entries come after the checkpoint and end at the last iteration.
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == EXACT_ITERS - 1

    # Final weights, BN statistics, optimizer momentum, LR scheduler: bit-identical.
    final_a, final_b = _tensors(tmp_path / "a" / "model_final.pth"), _tensors(out / "model_final.pth")
    assert final_a.keys() == final_b.keys()
    assert any(k.startswith("/model/") and "running_var" in k for k in final_a)
    assert any(k.startswith("/trainer/_trainer/optimizer/state/") for k in final_a)
    different = [k for k in final_a if not torch.equal(final_a[k], final_b[k])]
    assert not different, (f"{len(different)} tensors differ, e.g. {different[:5]}; max |a - b| = "
                           f"{_max_abs_diff(final_a, final_b):.3g}")
    state_a = torch.load(tmp_path / "a" / "model_final.pth", map_location="cpu", weights_only=True)["trainer"]
    state_b = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["trainer"]
    assert state_a["hooks"] == state_b["hooks"] and state_a["exact_resume"] == state_b["exact_resume"]
    # Each iteration had the same data (position in the sample stream: 2 images a step, no image skipped or
    # seen twice) and the same loss as in the uninterrupted run.
    assert [r["data"] for r in history] == [r["data"] for r in rows_a]
    assert [r["data"]["next"] for r in history] == [2 * (i + 1) for i in range(EXACT_ITERS)]
    assert [r["loss"] for r in history] == [r["loss"] for r in rows_a]


@pytest.mark.slow
@pytest.mark.parametrize("mains_samplers", [False, True], ids=["installed", "main"])
def test_resume_without_a_fixed_seed_redoes_the_lost_iterations_exactly(tmp_path, mains_samplers):
    """SEED -1 (detectron2's default: a random seed per run): the seed drawn by the killed run and its
    sampler's seed are in the checkpoint, so the resumed run redoes the iterations lost with the kill (8 and
    9) on the same data with the same loss, although it starts with a seed of its own. "main": the training
    sampler built as detectron2 main builds it since b1c43ffb, TrainingSampler(len(dataset), seed=cfg.SEED)
    (tests/test_upstream_main.py: mains_sampler), so its seed is -1."""
    out, saved, before, after, log = _killed_and_resumed(tmp_path, "b", opts=["SEED", "-1"],
                                                         mains_samplers=mains_samplers)
    assert saved == 7 and f"Starting training from iteration {saved + 1}" in log
    assert [r["iter"] for r in after] == list(range(saved + 1, EXACT_ITERS))
    lost = [r for r in before if r["iter"] > saved]
    assert [r["iter"] for r in lost] == [8, 9] and after[:2] == lost
    # the resumed run kept the killed run's seeds (step seed, sampler / augmentation seed)
    final, checkpoint = (torch.load(out / name, map_location="cpu", weights_only=True)["trainer"]["exact_resume"]
                         for name in ("model_final.pth", "model_0000007.pth"))
    assert final["seed"] == checkpoint["seed"]
    assert final["data"][0]["train"]["seed"] == checkpoint["data"][0]["train"]["seed"]
    if mains_samplers:  # the sampler's -1 is the data stream's seed; the steps' seed is drawn
        assert checkpoint["data"][0]["train"]["seed"] == -1 and checkpoint["seed"] >= 0

def test_train_loader_resumes_mid_stream_with_held_back_images():
    """The data stream alone, no training: a ResumableTrainLoader restored from another's state_dict (after a
    round trip through a weights-only checkpoint) hands out exactly the batches the first would have handed
    out next, including images aspect-ratio grouping held back for a later batch; the batches do not depend
    on the number of workers, and reading them leaves the global RNGs alone."""
    import io
    import itertools
    import random

    import numpy as np
    from detectron2.data.samplers import TrainingSampler

    from resnest_backbone.d2.resume import ResumableTrainLoader

    # Every third image is tall (its own aspect-ratio bucket); the "augmentation" draws from numpy's,
    # python's and torch's global RNGs, like detectron2's transforms and custom mappers do.
    dicts = [{"id": i, "width": 20 if i % 3 == 0 else 40, "height": 30} for i in range(10)]

    def mapper(d):
        return dict(d, aug=(float(np.random.rand()), random.random(), float(torch.rand(()))))

    def loader(workers=0):
        return ResumableTrainLoader(dicts, mapper, TrainingSampler(len(dicts), seed=5), 3, num_workers=workers)

    rng_before = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    full = list(itertools.islice(loader(), 12))
    assert np.array_equal(np.random.get_state()[1], rng_before[0]) and random.getstate() == rng_before[1]
    assert torch.equal(torch.get_rng_state(), rng_before[2])
    assert all(len({d["width"] > d["height"] for d in batch}) == 1 for batch in full)
    # sampling: epochs of the seeded shuffle, in order (up to the held-back images)
    ids = sorted(d["id"] for batch in full[:6] for d in batch)
    assert len(ids) == 18 and set(ids) == set(range(10))

    for stop in (1, 4, 5):
        first = loader()
        head = list(itertools.islice(first, stop))
        buffer = io.BytesIO()
        torch.save({"data": first.state_dict()}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)["data"]  # plain ints and lists: weights-only loadable
        resumed = loader()
        resumed.load_state_dict(state)
        assert head + list(itertools.islice(resumed, 12 - stop)) == full, stop
    assert any(loader_state["pending"] for loader_state in _states_along(loader(), 12))
    assert list(itertools.islice(loader(workers=2), 12)) == full


def _states_along(loader, n):
    it = iter(loader)
    for _ in range(n):
        next(it)
        yield loader.state_dict()


# Every process of a run (tools/train_net.py unmodified: the launcher and its spawned workers) imports this
# first (Python's sitecustomize, from PYTHONPATH). With RESUME_KILL_GROUP_AT set, the main process SIGKILLs
# its whole process group, every worker and the launcher, at the start of that iteration.
KILL_GROUP = """
import os
if os.environ.get("RESUME_KILL_GROUP_AT"):
    import signal
    from detectron2.engine import HookBase
    from detectron2.utils import comm
    from resnest_backbone.d2 import train

    class KillGroup(HookBase):
        def before_step(self):
            if self.trainer.iter == int(os.environ["RESUME_KILL_GROUP_AT"]) and comm.get_rank() == 0:
                os.killpg(0, signal.SIGKILL)

    build_hooks = train.Trainer.build_hooks
    train.Trainer.build_hooks = lambda self: [KillGroup()] + build_hooks(self)
"""


@pytest.mark.slow
def test_two_process_sigkill_and_resume_is_bit_identical(tmp_path):
    """Two processes (gloo, SyncBN in trunk and FPN), each with its own data stream position: a run whose
    process group is killed (SIGKILL: launcher and both workers) in iteration 6, after the checkpoint of
    iteration 3, and resumed with --resume, ends with the weights, BN statistics, optimizer state, LR
    scheduler and data positions of the same run never interrupted (the checkpoint carries every process's
    position, gathered to the main process when it is written)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILL_GROUP)

    def run(out, *extra, kill_at=None):
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG,
               "--num-gpus", "2", "--dist-url", "auto", *extra, *TINY, "SOLVER.IMS_PER_BATCH", "4",
               "MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM", "SyncBN", "SEED", "1", "DATASETS.TEST", "()",
               "SOLVER.WARMUP_ITERS", "2", "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "4",
               "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "OUTPUT_DIR", str(out)]
        path = [str(tmp_path / "site"), REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(_env(), PYTHONPATH=os.pathsep.join(path))
        env.pop("OMP_NUM_THREADS")  # the launcher gives each process its share of the cores
        if kill_at is not None:
            env["RESUME_KILL_GROUP_AT"] = str(kill_at)
        # a session of its own: the kill takes the run's process group, not pytest
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=300, start_new_session=True)

    whole = run(tmp_path / "a")
    assert whole.returncode == 0, whole.stdout[-3000:]
    killed = run(tmp_path / "b", kill_at=6)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    out = tmp_path / "b"
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert not (out / "model_final.pth").exists() and not (out / "model_0000007.pth").exists()
    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Starting training from iteration 4" in (out / "log.txt.rank1").read_text()

    a = torch.load(tmp_path / "a" / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 7
    assert a["trainer"]["exact_resume"] == b["trainer"]["exact_resume"]  # seeds and both data positions
    positions = b["trainer"]["exact_resume"]["data"]
    assert len(positions) == 2 and all(p["train"]["next"] == 8 * 2 for p in positions)
    assert a["trainer"]["hooks"] == b["trainer"]["hooks"]  # the LR scheduler's state
    assert a["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 8
    tensors_a, tensors_b = tensors_of(a), tensors_of(b)
    assert tensors_a.keys() == tensors_b.keys()
    assert any(k.startswith("/model/") and "running_var" in k for k in tensors_a)
    assert any(k.startswith("/trainer/_trainer/optimizer/state/") for k in tensors_a)  # momentum buffers
    different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
    assert not different, (f"{len(different)} tensors differ, e.g. {different[:5]}; max |a - b| = "
                           f"{_max_abs_diff(tensors_a, tensors_b):.3g}")
