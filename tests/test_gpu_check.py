"""tools/gpu_check.py, what a machine without a GPU can check: it exits with its own code and says why when
there is no CUDA device (a real process); its arguments; the report written from results (crafted, and a real
speed part run on the CPU) and re-rendered from its JSON; the training part's command, run on the CPU; and
that `pytest -m cuda` finds the CUDA tests it runs."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import load_tool, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    return load_tool("gpu_check")


def test_no_gpu_exits_with_its_code_and_says_why(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--out",
                           str(tmp_path / "r.md")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == _tool().NO_GPU == 3, proc.stdout + proc.stderr
    assert "gpu_check: no CUDA GPU: torch " in proc.stdout and "Nothing was checked" in proc.stdout
    assert ("CPU-only build" in proc.stdout) == (torch.version.cuda is None)
    assert "CUDA_VISIBLE_DEVICES=''" in proc.stdout or torch.version.cuda is None
    assert list(tmp_path.iterdir()) == []  # no report


def test_arguments(capsys):
    tool = _tool()
    args = tool.parse_args([])
    assert args.parts == ["tests", "train", "speed"] and args.iters == 450 and args.repeats == 20
    assert args.workload.label == "800x1216 b1" and args.variant == "resnest50"
    assert args.tests_cap + args.train_cap + args.speed_cap <= 330  # 5.5 min: 8 min with a 2-3 min install
    assert tool.parse_args(["--parts", "speed,tests", "--size", "2x64x96"]).parts == ["speed", "tests"]
    for bad, message in ((["--parts", "speed,gpu"], "--parts: ['gpu']"), (["--iters", "0"], "--iters must be"),
                         (["--speed-cap", "-1"], "--speed-cap must be"), (["--size", "1x800"], "--size: workload"),
                         (["--size", "1x8x8,1x8x8"], "give one BxHxW")):
        with pytest.raises(SystemExit) as exc:
            tool.parse_args(bad)
        assert exc.value.code == 2 and message in capsys.readouterr().err, bad


def _entry(ms, rel=0.0):
    return {"ms": ms, "runs": [ms], "first_s": 0.5, "rel_err": rel, "peak_mib": 100.0}


def _crafted():
    treatments = {"eager": "fp32", "channels_last": "fp32", "bf16 autocast": "bf16", "fp16 autocast": "fp16",
                  "fast path": "fp32", "fast path fp16": "fp16"}
    return {
        "env": {"date": "2026-01-01 00:00 UTC", "device": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                "memory_gib": 79.1, "driver": "580.65.06", "torch": "2.14.1+cu130", "cuda": "13.0", "cudnn": 91300,
                "gpus": 1, "tf32": {"cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": False,
                                    "float32_matmul_precision": "highest"},
                "cpu_flags": ["avx2", "avx512f"], "python": "3.11.9"},
        "argv": ["--parts", "tests,train,speed"], "seconds": 301.0,
        "parts": {
            "tests": {"status": "failed", "seconds": 40.0, "counts": {"passed": 3, "failed": 1, "skipped": 0},
                      "failed": ["tests.test_dcn::test_cuda_zero_offsets_and_gradients"], "tail": "1 failed, 3 passed"},
            "train": {"status": "passed", "seconds": 95.5, "iterations": 450, "device": "cuda",
                      "last_iter_logged": 450, "tail": "copypaste: ...",
                      "ap": {"AP": 55.123, "AP50": 76.5, "AP75": 60.0, "APs": 40.0, "APm": 58.0, "APl": None}},
            "speed": {"status": "failed: official / fp16 autocast", "seconds": 60.0, "workload": "800x1216 b1",
                      "variant": "resnest50", "warmup": 3, "repeats": 20, "cudnn_benchmark": True,
                      "implementations": [{"role": "ours", "name": "resnest50 ours"},
                                          {"role": "official", "name": "resnest50 official 0.0.5"},
                                          {"role": "resnet", "name": "ResNet-50 torchvision"}],
                      "treatments": {n: {"dtype": d, "description": n} for n, d in treatments.items()},
                      "eval": {"ours": {"eager": _entry(12.0), "channels_last": _entry(10.0),
                                        "bf16 autocast": _entry(6.0, 3e-3), "fp16 autocast": _entry(5.0, 1e-3),
                                        "fast path": _entry(8.0), "fast path fp16": _entry(4.0, 1e-3)},
                               "official": {"eager": _entry(14.0), "channels_last": _entry(13.0),
                                            "bf16 autocast": _entry(7.0, 3e-3),
                                            "fp16 autocast": {"error": "RuntimeError: a | b"}},
                               "resnet": {"eager": _entry(8.0), "channels_last": _entry(6.0),
                                          "bf16 autocast": _entry(3.0, 3e-3), "fp16 autocast": _entry(2.5, 1e-3)}}},
        },
    }


def test_report_from_crafted_results(tmp_path):
    tool = _tool()
    report = _crafted()
    json_path = tool.write_report(copy.deepcopy(report), str(tmp_path / "g.md"))
    assert json.loads(open(json_path).read()) == report
    md = (tmp_path / "g.md").read_text()
    assert md == tool.render_markdown(report) + "\n"
    for fact in ("# GPU check: NVIDIA H100 80GB HBM3", "driver 580.65.06", "torch 2.14.1+cu130, CUDA 13.0",
                 "cuDNN 91300", "TF32: cudnn.allow_tf32 True, cuda.matmul.allow_tf32 False, "
                 "float32_matmul_precision highest", "host CPU flags: avx2 avx512f", "--parts tests,train,speed",
                 "| tests | failed | 40.0 |", "| train | passed | 95.5 |", "3 passed, 1 failed, 0 skipped",
                 "- failed: tests.test_dcn::test_cuda_zero_offsets_and_gradients",
                 "| 55.12 | 76.50 | 60.00 | 40.00 | 58.00 | - |",  # APl: no large object (nan)
                 "| resnest50 ours | 12.00 (0e+00) | 10.00 (0e+00) | 6.00 (3e-03) | 5.00 (1e-03) | 8.00 (0e+00) |",
                 "fails: RuntimeError: a / b",
                 # best per precision, over ResNet-50's: fp32 8 / 6, bf16 6 / 3, fp16 4 / 2.5
                 "| resnest50 ours | 8.00 fast path | 1.33 | 6.00 bf16 autocast | 2.00 | 4.00 fast path fp16 | 1.60 |",
                 "| resnest50 official 0.0.5 | 13.00 channels_last | 2.17 | 7.00 bf16 autocast | 2.33 | - | - |",
                 "## Output of the tests part (last lines)"):
        assert fact in md, fact
    assert "## Output of the train part" not in md  # passed parts: no output tail
    again = tmp_path / "again.md"
    assert tool.main(["--render", json_path, "--out", str(again)]) == 0
    assert again.read_text() == md
    assert tool.main(["--render", str(tmp_path / "none.json"), "--out", str(again)]) == 2


def test_speed_part_runs_on_the_cpu():
    """The speed part's own code (menu, our fast path in three precisions, measurement, report) on the CPU at
    a tiny size: every entry is a time or a recorded failure; fp32 treatments equal eager fp32."""
    require("resnest", "a test extra: pip install -e .[test]")
    require("timm", "a test extra: pip install -e .[test]")
    tool = _tool()
    from benchmarks.candidates import Workload

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        speed = tool.run_speed("resnest14d", Workload(1, 64, 64), 1, "cpu", 0)
    finally:
        torch.set_num_threads(threads)
    assert [i["role"] for i in speed["implementations"]] == ["ours", "official", "timm", "resnet"]
    assert list(speed["eval"]["ours"]) == ["eager", "channels_last", "bf16 autocast", "fp16 autocast", "fast path",
                                           "fast path bf16", "fast path fp16"]
    for role, per in speed["eval"].items():
        assert set(per) <= set(speed["treatments"])
        for name, e in per.items():
            assert ("ms" in e) != ("error" in e), (role, name)
        for name in ("eager", "channels_last") + (("fast path",) if role == "ours" else ()):
            assert per[name]["ms"] > 0 and per[name]["rel_err"] < 1e-4, (role, name)
    report = {"env": {"date": "-", "device": "cpu", "capability": "-", "memory_gib": 0, "driver": "-", "torch": "-",
                      "cuda": None, "cudnn": None, "gpus": 0, "tf32": {}, "cpu_flags": [], "python": "-"},
              "argv": [], "seconds": 1.0, "parts": {"speed": json.loads(json.dumps(speed))}}
    md = tool.render_markdown(report)
    assert "## Speed: resnest14d trunk, eval 64x64 b1" in md and "| resnest14d ours | " in md


@pytest.mark.d2
def test_training_part_runs_its_command_on_the_cpu():
    """The train part's command line (tools/train_net.py, demo config, its iteration and schedule options) run
    on the CPU for 2 iterations on small images and the 16-image val subset: it passes and its box AP is read
    from the output."""
    from test_guards import TINY

    tool = _tool()
    res = tool.run_training(2, 600, device="cpu", extra=TINY)
    assert res["status"] == "passed", res["tail"]
    assert set(res["ap"]) == set(tool.AP_KEYS) and all(v is None or 0 <= v <= 100 for v in res["ap"].values())
    assert "SOLVER.MAX_ITER" in tool.train_command("o", 2) and "cuda" in tool.train_command("o", 2)


def test_cuda_tests_are_marked_and_collected():
    """`pytest -m cuda` (the tests part) selects the CUDA tests: the marker is registered (--strict-markers
    accepts it) and the deformable-conv CUDA test carries it."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers", "-m", "cuda",
                           "-p", "no:cacheprovider", os.path.join("tests", "test_dcn.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/test_dcn.py::test_cuda_zero_offsets_and_gradients" in proc.stdout
