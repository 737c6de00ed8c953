"""`tools/train_net.py --config faster_rcnn_resnest50_fpn.yaml`: project configs by name, from any working
directory, in a checkout and from a pip install (configs shipped inside the package)."""
import os
import subprocess
import sys
import zipfile

import pytest

from resnest_backbone.d2 import get_config, get_config_file, list_configs

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPLEVEL = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".yaml"))


def test_every_project_config_resolves_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in TOPLEVEL:
        expected = os.path.realpath(os.path.join(REPO, "configs", name))
        for spelling in (name, name[:-len(".yaml")], "configs/" + name):
            assert os.path.realpath(get_config_file(spelling)) == expected, spelling
    assert os.path.realpath(get_config_file("mmdet/faster-rcnn_resnest50_fpn_1x_coco.py")) == os.path.realpath(
        os.path.join(REPO, "configs", "mmdet", "faster-rcnn_resnest50_fpn_1x_coco.py"))
    assert set(TOPLEVEL) <= set(list_configs())
    local = tmp_path / "mine.yaml"  # an existing path is used as it is
    local.write_text("MODEL:\n  RESNEST:\n    VARIANT: resnest101\n")
    assert get_config_file(str(local)) == str(local)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(FileNotFoundError) as err:
        get_config_file("faster_rcnn_resnest42_fpn.yaml")
    assert "faster_rcnn_resnest42_fpn.yaml" in str(err.value) and "faster_rcnn_resnest50_fpn.yaml" in str(err.value)


def test_get_config_builds_the_resnest_config():
    cfg = get_config("faster_rcnn_resnest50_fpn")
    assert cfg.MODEL.BACKBONE.NAME == "build_resnest_fpn_backbone" and cfg.MODEL.RESNEST.VARIANT == "resnest50"
    assert get_config("faster_rcnn_resnest101_fpn.yaml").MODEL.RESNEST.VARIANT == "resnest101"  # _BASE_ too


def _env():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
    return env


@pytest.mark.slow
def test_train_net_takes_a_config_name_from_another_directory(tmp_path):
    tool = os.path.join(REPO, "tools", "train_net.py")
    tiny = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, tool, "--config", "demo_faster_rcnn_resnest.yaml", *tiny], cwd=tmp_path,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "out" / "model_final.pth").exists()
    bad = subprocess.run([sys.executable, tool, "--config-file", "faster_rcnn_resnest42_fpn.yaml"], cwd=tmp_path,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert bad.returncode == 2 and "faster_rcnn_resnest50_fpn.yaml" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_a_pip_install_ships_the_configs(tmp_path):
    """Build the wheel, install it into a folder of its own, and resolve names from there."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", REPO,
                    "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    wheel = next(wheels.glob("resnest_backbone-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    configs = os.path.join(REPO, "configs")
    for folder, _, files in os.walk(configs):  # every config, the mmdet `_base_` files too
        for f in files:
            name = os.path.relpath(os.path.join(folder, f), configs).replace(os.sep, "/")
            assert f"resnest_backbone/configs/{name}" in names, name
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys, resnest_backbone; "
            "mm = resnest_backbone.get_config_file('mmdet/faster-rcnn_resnest50_fpn_1x_coco.py'); "
            "assert 'detectron2' not in sys.modules; import resnest_backbone.d2 as d2; "  # mmdet users need none
            "print(resnest_backbone.__file__); print(d2.get_config_file('faster_rcnn_resnest50_fpn.yaml')); print(mm)")
    env = dict(_env(), PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    package, config, mm_config = out.stdout.split()
    for path in (package, config, mm_config):
        assert path.startswith(str(site)), path  # from the install, not the checkout
    assert os.path.isfile(mm_config)
    assert open(config).read() == open(os.path.join(REPO, "configs", "faster_rcnn_resnest50_fpn.yaml")).read()
