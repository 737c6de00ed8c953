"""mmengine's Runner refuses crafted checkpoint files end to end: `load_from=` (train, test, resume) and an
`init_cfg=dict(type='Pretrained')` of the ResNeSt backbone (the project's loader) or of another part of the
model (mmengine's PretrainedInit, through the local-file loader importing resnest_backbone.mm registers).
Each file carries a payload that creates a marker file when unpickled (shown to fire under plain torch.load).
The Runner raises a CheckpointError naming the file, the marker never appears, and the work_dir holds exactly
what mmengine wrote while building the Runner, before any loading: the config dump, the run's log folder with
its log file and vis_data/config.py (checked file by file)."""
import os
import pickle

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from resnest_backbone.convert import CheckpointError  # noqa: E402
from resnest_backbone.data.demo import ensure_demo_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"version": 1, "seed": 7, "size": 128, "det": {"train": 2, "val": 1}, "seg": {"train": 1, "val": 1},
        "min_object": 20, "max_object": 56, "max_objects": 3}
CONFIG = os.path.join(ROOT, "configs", "mmdet", "faster-rcnn_resnest14d_fpn_demo.py")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_crafted(folder):
    """(marker, {kind: path}): a torch zip checkpoint and a plain pickle named .pth, each with the payload."""
    marker = folder / "PWNED"
    files = {"torch_zip": folder / "iter_8.pth", "pickle": folder / "resnest14d_mmdet.pth"}
    torch.save({"state_dict": {"backbone.conv1.0.weight": torch.zeros(1)}, "meta": {"x": Payload(str(marker))}},
               files["torch_zip"])
    with open(files["pickle"], "wb") as f:
        pickle.dump({"state_dict": {"stem.0.weight": torch.zeros(1).numpy()}, "x": Payload(str(marker))}, f,
                    protocol=4)
    return marker, files


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    marker, files = _write_crafted(tmp_path_factory.mktemp("crafted"))
    yield marker, files
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_det(tmp_path_factory):
    return os.path.join(ensure_demo_data(str(tmp_path_factory.mktemp("data")), spec=TINY), "det") + os.sep


def test_the_payload_is_real(tmp_path):
    marker, files = _write_crafted(tmp_path)
    torch.load(files["torch_zip"], weights_only=False)  # what mmengine <= 0.10.7 does under torch < 2.6
    assert marker.exists()
    marker.unlink()
    with open(files["pickle"], "rb") as f:
        pickle.load(f)
    assert marker.exists()


def _cfg(data, work_dir):
    cfg = Config.fromfile(CONFIG)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = data + "annotations/instances_val.json"
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, val_interval=10)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    # mmengine keeps one logger and one visualizer per name: this run's own, writing into this work_dir
    cfg.experiment_name, cfg.visualizer.name = f"run:{work_dir}", f"visualizer:{work_dir}"
    return cfg


def _listing(folder):
    """{relative path: size} of everything under `folder` (folders with size None)."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


CASES = {  # name: (how the crafted file is given, what runs)
    "load_from, train": (lambda cfg, path: cfg.update(load_from=path), "train"),
    "load_from, test": (lambda cfg, path: cfg.update(load_from=path), "test"),
    "resume": (lambda cfg, path: cfg.update(load_from=path, resume=True), "train"),
    "backbone init_cfg": (lambda cfg, path: cfg.model.backbone.update(init_cfg=dict(type="Pretrained",
                                                                                     checkpoint=path)), "train"),
    "neck init_cfg": (lambda cfg, path: cfg.model.neck.update(init_cfg=dict(type="Pretrained", checkpoint=path)),
                      "train"),
}


# every way in with a crafted torch file; the pickle (read by the other reader, chosen from the bytes) twice
@pytest.mark.parametrize("case,kind", [(case, "torch_zip") for case in sorted(CASES)]
                         + [("load_from, train", "pickle"), ("backbone init_cfg", "pickle")])
def test_runner_refuses_crafted_files_and_writes_nothing_of_its_own(crafted, tiny_det, tmp_path, case, kind):
    marker, files = crafted
    give, run = CASES[case]
    cfg = _cfg(tiny_det, tmp_path / "work_dir")
    give(cfg, str(files[kind]))
    runner = Runner.from_cfg(cfg)
    built = _listing(tmp_path / "work_dir")
    stamp = runner.timestamp
    # what mmengine writes while building the Runner: the config, the log folder, its log and vis_data config
    assert sorted(built) == sorted([os.path.basename(CONFIG), stamp, f"{stamp}/{stamp}.log", f"{stamp}/vis_data",
                                    f"{stamp}/vis_data/config.py"]), sorted(built)
    with pytest.raises(CheckpointError) as err:
        getattr(runner, run)()
    message = str(err.value)
    assert str(files[kind]) in message and "refused" in message and "Nothing in the file was executed" in message
    assert not marker.exists()
    after = _listing(tmp_path / "work_dir")
    assert sorted(after) == sorted(built)  # nothing new: no checkpoint, no last_checkpoint, no scalars
    assert {k: v for k, v in after.items() if not k.endswith(".log")} == \
        {k: v for k, v in built.items() if not k.endswith(".log")}
    assert runner.iter == 0
