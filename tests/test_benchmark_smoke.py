"""tools/benchmark.py and benchmarks/: the smoke run (tiny sizes, one round) runs every piece
(matmul peak, every implementation under every treatment, training, detector, gradient checkpointing), the
JSON round-trips and --render rewrites the report byte for byte from it; a failing treatment is recorded,
not fatal; the goals judge crafted numbers as they should (a miss is a miss, a missing number is not met)."""
import copy
import inspect
import json
import os

import pytest
import torch
from torch import nn

from benchmarks import candidates, measure, render, run, treatments
from benchmarks.measure import matmul_peak
from conftest import load_tool, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    return load_tool("benchmark")


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    require("resnest", "a test extra: pip install -e .[test]")
    require("timm", "a test extra: pip install -e .[test]")
    require("fvcore", "a test extra: pip install -e .[test]")
    require("matplotlib", "a test extra: pip install -e .[test]")
    bench = _tool()
    threads = torch.get_num_threads()
    try:
        # --default-allocator: the steady allocator would stay set in this test process (tested in a child)
        res = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "b.md"), "--grad-checkpoint",
                          "--default-allocator"])
        only = bench.main(["--smoke", "--threads", "1", "--default-allocator", "--grad-checkpoint-only",
                           "--grad-checkpoint-variants", "resnest14d,resnest26d", "--grad-checkpoint-size", "2x64x96",
                           "--out", str(tmp_path / "gc.md")])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    # the JSON (written next to the report by default) is the result, and the report is rendered from it
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["env"]["threads"] == 1
    bb = saved["backbone"]
    assert [i["role"] for i in bb["implementations"]] == ["ours", "official", "timm", "resnet"]
    assert set(bb["conv_bound"]) == {"resnest", "resnet"} and all(
        b["ms"] > 0 and 0.9 < b["gmacs"] / bb["gmacs"][bb["key_eval"]][arch] <= 1.0
        for arch, b in bb["conv_bound"].items())  # fvcore counts the convolutions and a little more
    assert "### The convolutions alone" in (tmp_path / "b.md").read_text()
    assert "### Where a training step's time goes" in (tmp_path / "b.md").read_text()
    assert "### CPU time per training step" in (tmp_path / "b.md").read_text()
    own = {i["role"]: i["own"] for i in bb["implementations"]}
    assert "fast path" in own["ours"] and not own["official"] and not own["timm"] and not own["resnet"]
    # the same menu for every implementation: each (implementation, treatment) has a time or a failure
    eval_menu = [t.name for t in treatments.menu("eval", compile_=False)]
    assert {"eager", "channels_last", "jit", "bf16 autocast", "int8 fx"} <= set(eval_menu)
    for mode, menu_names in (("eval", eval_menu), ("train", [t.name for t in treatments.menu("train", False)])):
        assert bb[mode], mode
        for w, per in bb[mode].items():
            for i in bb["implementations"]:
                expected = menu_names + (i["own"] if mode == "eval" else [])
                assert list(per[i["role"]]) == expected, (mode, w, i["role"])
                for name, e in per[i["role"]].items():
                    assert ("ms" in e) != ("error" in e), (mode, w, i["role"], name, e)
                    if "ms" in e:
                        assert e["ms"] > 0 and len(e["runs"]) == 1 and e["peak_mib"] > 0
                        assert e["cpu_ms"] > 0 and len(e["cpu_runs"]) == 1
                    if "ms" in e and mode == "train":  # where the step's time goes
                        b = e["breakdown"]
                        assert b["conv"] > 0 and b["norm"] > 0 and b["other"] > 0
                        assert b["conv"] + b["norm"] + b["other"] <= b["total"] * 1.01
                        assert b["calls"]["conv"] >= 2 * 10  # forward + backward of each convolution
    assert saved["env"]["allocator"] == "default"
    key = bb["key_eval"]
    assert key == list(bb["eval"])[-1]
    for role in ("ours", "official", "timm", "resnet"):  # eager, channels_last and jit run everywhere
        for name in ("eager", "channels_last", "jit"):
            assert bb["eval"][key][role][name]["ms"] > 0, (role, name)
            assert bb["eval"][key][role][name]["rel_err"] < 1e-4, (role, name)  # fp32: the same outputs
    assert bb["eval"][key]["ours"]["fast path"]["rel_err"] < 1e-4
    if "x86" in torch.backends.quantized.supported_engines:  # ours' own int8: quantize_int8
        assert 0 < bb["eval"][key]["ours"]["int8 quantize_int8"]["rel_err"] < 0.2
    if "ms" in bb["eval"][key]["ours"]["bf16 autocast"]:
        assert 0 < bb["eval"][key]["ours"]["bf16 autocast"]["rel_err"] < 0.1  # bf16: rounded, not wrong
    assert all(g["resnest"] > g["resnet"] > 0 for g in bb["gmacs"].values())
    peak = saved["peak"]
    assert peak["fp32"]["gflops"] > 0 and peak["bf16"]["gflops"] > 0
    assert set(peak["fp32"]["conv"]) == set(candidates.SMOKE_CONV_SHAPES)  # --smoke: a small convolution
    assert peak["bf16_over_fp32"] == peak["bf16"]["gflops"] / peak["fp32"]["gflops"]
    md = (tmp_path / "b.md").read_text()
    for i in bb["implementations"]:
        assert f"| {i['name']} |" in md
    assert "## Goals (issues 12 and 23)" in md and "## Machine limit: matmul and convolution peak" in md
    assert f"Loss: {measure.TRAIN_LOSS}." in md  # what the training steps backpropagate, from the JSON
    assert "| dtype | mm 128x128 | mm 256x256 | conv 3x3 32->32 @32x32 | peak |" in md
    assert md.count("| met |") + md.count("| **NOT MET** |") + md.count("| not measured |") == 7
    assert saved["env"]["cpu_flags"] == measure.cpu_flags()
    _assert_every_table_names_the_machine(md, saved["env"])
    _assert_every_table_names_the_machine((tmp_path / "gc.md").read_text(), only["env"])
    if saved.get("detector"):
        det = saved["detector"]["eval"]
        assert set(det) == {"ours", "resnet"}
        assert all(set(e) == {"eager", "fused + channels_last"} for e in det.values())
        assert "Faster R-CNN" in md
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # gradient checkpointing: with the rest (--grad-checkpoint), and alone (no backbone comparison, no chart)
    assert "## Gradient checkpointing: training step 64x64 b2" in md and "| resnest14d |" in md
    assert "backbone" not in only and not (tmp_path / "gc.png").exists()
    rows = only["grad_checkpoint"]["rows"]
    assert [r["variant"] for r in rows] == ["resnest14d", "resnest26d"]
    for r in rows:
        assert all(r[k] > 0 for k in ("plain_ms", "checkpoint_ms", "plain_peak", "checkpoint_peak"))
    assert rows[1]["checkpoint_peak"] < rows[1]["plain_peak"]
    assert "| resnest26d |" in (tmp_path / "gc.md").read_text()
    # --render rewrites the report from the saved numbers, measuring nothing: byte for byte
    bench.main(["--render", str(tmp_path / "b.json"), "--out", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_bytes() == (tmp_path / "b.md").read_bytes()
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    os.remove(tmp_path / "again.md")
    bench.main(["--render", "--out", str(tmp_path / "b.md")])  # default: the JSON next to --out
    assert (tmp_path / "b.md").read_text() == md


def _conv():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def test_failing_treatment_is_recorded_not_fatal():
    def broken_apply(model, x):
        raise RuntimeError("cannot treat this model")

    def broken_call(model, x):
        return lambda inp: model(inp[:, :2])  # wrong channel count: fails when called

    impl = candidates.Implementation("plain", "a conv", _conv)
    menu = [treatments.EVAL_MENU[0], treatments.Treatment("broken", broken_apply),
            treatments.Treatment("fails when called", broken_call), treatments.EVAL_MENU[1]]
    x = torch.randn(1, 3, 16, 16)
    got = run.run_pairs([(impl, t) for t in menu], "eval", lambda t: x, warmup=0, repeats=2, memory=True,
                        device=torch.device("cpu"))["plain"]
    assert got["broken"] == {"error": "RuntimeError: cannot treat this model"}
    assert set(got["fails when called"]) == {"error"} and "RuntimeError" in got["fails when called"]["error"]
    for name in ("eager", "channels_last"):  # the others are timed, before and after the failures
        assert got[name]["ms"] > 0 and len(got[name]["runs"]) == 2 and got[name]["peak_mib"] > 0
    assert got["eager"]["rel_err"] == 0.0 and got["channels_last"]["rel_err"] < 1e-5


def test_dtypes_keep_only_the_treatments_of_those_dtypes(capsys):
    """--dtypes fp32,int8 (a CPU without native bf16): no bf16 treatment is timed, generic or own."""
    own = (treatments.Treatment("own bf16", treatments.bf16_autocast, dtype="bf16"),
           treatments.Treatment("own fp32", treatments.eager))
    impl = candidates.Implementation("ours", "a conv", _conv, own=own)
    loads = candidates.parse_workloads("1x16x16")
    label = loads[0].label
    res = run.run_backbones("resnest14d", loads, loads, dtypes=("fp32", "int8"), implementations=[impl],
                            warmup=0, repeats=1, memory=False)
    fp32_int8 = lambda ts: {t.name for t in ts if t.dtype in ("fp32", "int8")}  # noqa: E731
    assert set(res["eval"][label]["ours"]) == fp32_int8(treatments.menu("eval", False) + list(own))
    assert set(res["train"][label]["ours"]) == fp32_int8(treatments.menu("train", False))
    assert any(t.dtype == "bf16" for t in treatments.menu("eval", False))  # there was something to leave out
    assert set(matmul_peak((32,), conv_shapes={}, dtypes=("int8",))) <= {"fp32", "int8"}  # fp32: the reference
    assert (render._pct(0.5), render._pct(1.03), render._pct(107.7)) == ("50%", "103%", "above peak")
    with pytest.raises(SystemExit):
        _tool().main(["--dtypes", "fp32,fp8", "--out", "never.md"])
    assert "--dtypes 'fp32,fp8': use some of fp32, bf16, fp16, int8" in capsys.readouterr().err


def test_training_pairs_and_layouts():
    impl = candidates.Implementation("plain", "a conv", _conv)
    x = torch.randn(2, 3, 16, 16)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got = run.run_pairs([(impl, t) for t in treatments.TRAIN_MENU], "train",
                        lambda t: x_cl if t.channels_last else x, warmup=0, repeats=1, memory=True,
                        device=torch.device("cpu"))["plain"]
    assert list(got) == ["eager", "channels_last", "channels_last + compile"]
    assert all(e["ms"] > 0 and "rel_err" not in e and e["cpu_ms"] > 0 for e in got.values())
    assert got["eager"]["peak_mib"] > 0 and got["channels_last"]["peak_mib"] > 0
    assert "peak_mib" not in got["channels_last + compile"]  # not measured under compile (nor the breakdown)
    assert "breakdown" in got["channels_last"] and "breakdown" not in got["channels_last + compile"]
    assert [t.name for t in treatments.menu("train", compile_=False)] == ["eager", "channels_last"]


class _Outputs(nn.Module):
    """Two 4-d outputs and a 2-d one, each used by the loss only; records the gradient each one gets."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.seen = {}

    def forward(self, x):
        c2 = torch.relu(self.b(x))
        outs = {"c1": torch.relu(self.a(x)), "c2": c2, "flat": c2.mean((2, 3))}
        for name, o in outs.items():
            o.register_hook(lambda g, name=name: self.seen.__setitem__(name, g))
        return outs


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_hands_each_output_its_gradient_in_its_layout(channels_last):
    """The training step's loss is the sum of the outputs' means, and its backward hands each 4-d output
    a dense gradient laid out like the output (channels_last for a channels_last model, as a layer after the
    trunk hands it back), not the contiguous one of `out.mean()` (checked here too, as the control). The
    gradients' values are those of the plain means'."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = _Outputs().to(memory_format=fmt)
    x = torch.randn(2, 3, 12, 10).contiguous(memory_format=fmt)
    measure.train_step(model, x)
    ours = {k: v.clone() for k, v in model.seen.items()}
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    sum(o.float().mean() for o in model(x).values()).backward()  # the plain means
    for name in ("c1", "c2"):
        assert ours[name].is_contiguous(memory_format=fmt), name
        assert ours[name].stride().count(0) == 0  # dense, as a layer's backward makes it
        torch.testing.assert_close(ours[name], model.seen[name], rtol=0, atol=1e-12)
        if channels_last:  # the control: the plain mean's gradient is NCHW
            assert not model.seen[name].is_contiguous(memory_format=fmt), name
    torch.testing.assert_close(ours["flat"], model.seen["flat"], rtol=0, atol=0)
    for mine, plain in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, plain, rtol=1e-5, atol=1e-7)


def test_rel_err():
    a = {"res2": torch.ones(2, 2), "res3": torch.full((3,), 4.0)}
    b = {"res2": torch.ones(2, 2), "res3": torch.tensor([4.0, 4.0, 3.0])}
    assert run.rel_err(a, a) == 0.0
    assert run.rel_err(b, a) == pytest.approx(0.25)
    assert run.rel_err([torch.ones(2)], [torch.ones(3)]) is None


def test_bf16_fast_path_only_where_deploy_takes_a_dtype(monkeypatch):
    import resnest_backbone.core.fuse as fuse

    names = [t.name for t in treatments.own_treatments(compile_=False)]
    assert names[:2] == ["fast path", "fast path + jit"]
    assert ("fast path bf16" in names) == ("dtype" in inspect.signature(fuse.deploy).parameters)
    original = fuse.deploy

    def deploy_with_dtype(model, channels_last=True, compile=False, inplace=False, dtype=None):
        model = original(model, channels_last=channels_last, compile=compile, inplace=inplace)
        return model.to(dtype) if dtype is not None else model

    monkeypatch.setattr(fuse, "deploy", deploy_with_dtype)
    own = {t.name: t for t in treatments.own_treatments(compile_=False)}
    assert own["fast path bf16"].dtype == "bf16" and own["fast path bf16"].channels_last
    from resnest_backbone.core import build_resnest

    torch.manual_seed(0)
    model = build_resnest("resnest14d").eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    step = own["fast path bf16"].apply(copy.deepcopy(model), x)
    with torch.no_grad():
        out, ref = step(x), model(x)
    assert all(out[k].dtype == torch.bfloat16 for k in out)
    assert 0 < run.rel_err(out, ref) < 0.1


def test_matmul_peak_small():
    shapes = {"conv 3x3 16->16 @16x16": (16, 16, 3, 16), "conv 1x1 32->16 @8x8": (32, 16, 1, 8)}
    peak = matmul_peak((64, 128), repeats=1, conv_shapes=shapes)
    for d in ("fp32", "bf16"):
        p = peak[d]
        assert set(p["sizes"]) == {"64", "128"} and p["matmul_gflops"] == max(p["sizes"].values()) > 0
        assert set(p["conv"]) == set(shapes) and min(p["conv"].values()) > 0
        # the limit is the faster of matmul and convolution, so no measured throughput is above it by design
        assert p["gflops"] == max(p["matmul_gflops"], *p["conv"].values())
    assert "gflops" in peak["int8"] or "error" in peak["int8"]
    assert "conv" not in peak["int8"]  # int8 convolutions need a quantized model: matmul only
    assert peak["bf16_over_fp32"] == peak["bf16"]["gflops"] / peak["fp32"]["gflops"]


def test_conv_rate_counts_two_flops_per_multiply_add(monkeypatch):
    # 1 x 1 conv 8 -> 4 on 2 x 2: 8 * 4 * 4 = 128 multiply-adds = 256 FLOP; with each call timed at 1 ms
    clock = iter(range(100))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock) * 1e-3)
    assert measure.conv_rate(torch.float32, 8, 4, 1, 2, repeats=2) == pytest.approx(256 / 1e-3 / 1e9)


def test_conv_bound_times_each_convolution_of_a_forward(monkeypatch):
    """Every nn.Conv2d call of the forward is found (a conv called twice counts twice), with its real input
    shape; multiply-adds counted exactly; each call timed on its own (1 ms per call here)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1, groups=2), nn.AdaptiveAvgPool2d(1))
            self.shared = nn.Conv2d(8, 8, 1, bias=False)

        def forward(self, x):
            return self.shared(self.shared(self.body(x)))

    clock = iter(range(1000))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock) * 1e-3)
    b = measure.conv_bound(Twice(), torch.randn(2, 3, 10, 12), repeats=2)
    macs = 2 * 5 * 6 * 8 * 3 * 9 + 2 * 5 * 6 * 8 * 4 + 2 * (2 * 8 * 8)
    assert b["convs"] == 4 and b["gmacs"] == pytest.approx(macs / 1e9)
    assert b["ms"] == pytest.approx(4.0)


def test_op_breakdown_classes_every_operator_of_a_training_step(monkeypatch):
    """Each operator's time goes to its class: the convolution's forward and backward to conv, the batch
    norm's to norm, the rest (ReLU, its backward, the loss's mean...) to other; each operator call here
    takes 1 ms of a fake clock, so the classes count operator calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).train()
    x = torch.randn(2, 3, 8, 8)
    clock = iter(range(10**6))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock) * 1e-3)
    b = measure.op_breakdown(lambda: measure.train_step(model, x))
    assert b["calls"]["conv"] == 2  # convolution, convolution_backward
    assert b["calls"]["norm"] == 2  # the batch norm's forward and backward
    assert b["calls"]["other"] >= 4  # relu, threshold_backward, mean, its backward, ...
    assert (b["conv"], b["norm"]) == (pytest.approx(2.0), pytest.approx(2.0))
    assert b["other"] == pytest.approx(b["calls"]["other"])
    assert b["total"] > b["conv"] + b["norm"] + b["other"]  # the step's clock reads frame the operators'
    assert model[0].weight.grad is not None  # the step really ran (with its backward)


@pytest.mark.skipif(not (os.uname().sysname == "Linux" and __import__("platform").libc_ver()[0] == "glibc"),
                    reason="glibc's mallopt")
@pytest.mark.slow
def test_steady_allocator_stops_page_faults_of_repeated_large_tensors(tmp_path):
    """In a child process (the setting cannot be undone): a 256 MiB tensor allocated, freed and allocated
    again page-faults afresh with glibc's defaults (every page of it, every time), and, once
    steady_allocator() has run and the heap has grown to its size, not at all in most allocations (the freed
    memory is kept and reused; the heap may still grow once more)."""
    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, statistics, sys, torch\n"
        "from benchmarks.measure import steady_allocator\n"
        "set_ = steady_allocator() if sys.argv[1] == 'steady' else 'default'\n"
        "n = 256 * 2**20 // 4\n"
        "for _ in range(2):  # the heap grows to its size\n"
        "    torch.ones(n)\n"
        "pages = []\n"
        "for _ in range(6):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.ones(n)\n"
        "    pages.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (n * 4 / 4096))\n"
        "print(set_, min(pages), statistics.median(pages))\n")
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = {}
    for mode in ("default", "steady"):
        line = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env,
                              check=True).stdout.strip().splitlines()[-1]
        desc, low, mid = line.rsplit(" ", 2)
        out[mode] = (desc, float(low), float(mid))
    assert out["default"][1] > 0.5, out  # every allocation faults its pages in again
    assert out["steady"][2] < 0.05, out  # most allocations fault nothing (the heap may still grow once)
    assert out["steady"][0].startswith("glibc malloc, M_MMAP_MAX=0"), out


def test_benchmark_is_not_in_the_package():
    """benchmarks/ is a development tool: setup.py's own find_packages call (read from setup.py, run here)
    ships resnest_backbone and its subpackages only, and nothing in the package imports the benchmark."""
    import ast
    import re

    from setuptools import find_packages

    setup_py = open(os.path.join(ROOT, "setup.py")).read()
    call = next(n for n in ast.walk(ast.parse(setup_py)) if isinstance(n, ast.keyword) and n.arg == "packages")
    packages = eval(compile(ast.Expression(call.value), "setup.py", "eval"),  # noqa: S307 - our own setup.py
                    {"find_packages": lambda **kw: find_packages(where=ROOT, **kw)})
    assert "resnest_backbone" in packages and "resnest_backbone.core" in packages
    assert all(p == "resnest_backbone" or p.startswith("resnest_backbone.") for p in packages), packages
    package_dir = os.path.join(ROOT, "resnest_backbone")
    sources = [os.path.join(d, f) for d, _, files in os.walk(package_dir) for f in files if f.endswith(".py")]
    assert len(sources) > 20
    importing = [p for p in sources if re.search(r"^\s*(from|import)\s+(benchmarks|resnest_backbone\.bench)\b",
                                                  open(p).read(), re.M)]
    assert importing == [] and not os.path.exists(os.path.join(package_dir, "bench"))


def test_parse_workloads():
    assert candidates.parse_workloads("1x800x1216, 8x224x224") == (candidates.Workload(1, 800, 1216),
                                                                   candidates.Workload(8, 224, 224))
    assert candidates.parse_workloads("") == ()
    with pytest.raises(ValueError, match="'1x800'"):
        candidates.parse_workloads("1x800")
    with pytest.raises(ValueError, match="positive"):
        candidates.parse_workloads("0x64x64")


# ------------------------------------------------------------------------------------------- goal logic
def _crafted(ours_fast=1000.0, ours_bf16=500.0, resnet_jit=800.0, official_cl=1800.0, det=(2400.0, 2200.0),
             train=(8500.0, 4739.0, 11000.0, 4739.0), peak_fp32=200.0, ours_int8=480.0):
    """A result dict as run.py writes it, with chosen numbers (GMACs 100 / 80: MAC ratio 1.25)."""
    def ok(ms, peak=None, rel=0.0):
        e = {"ms": ms, "runs": [ms], "first_s": 1.0, "rel_err": rel}
        if peak is not None:
            e["peak_mib"] = peak
        return e

    key, key_train = "800x1216 b1", "800x1216 b2"
    ev = {"ours": {"eager": ok(1600.0), "channels_last": ok(1400.0), "bf16 autocast": ok(ours_bf16, rel=5e-3),
                   "int8 fx": {"error": "TraceError: control flow"}, "fast path": ok(ours_fast),
                   "int8 quantize_int8": ok(ours_int8, rel=2e-2)},
          "official": {"eager": ok(2000.0), "channels_last": ok(official_cl), "bf16 autocast": ok(1200.0),
                       "int8 fx": {"error": "TraceError: proxy"}},
          "resnet": {"eager": ok(1400.0), "channels_last": ok(1000.0), "jit": ok(resnet_jit),
                     "bf16 autocast": ok(400.0), "int8 fx": ok(300.0)}}
    tr = {"ours": {"eager": ok(11000.0, 4739.0), "channels_last": ok(train[0], train[1])},
          "official": {"eager": ok(12000.0, 4739.0), "channels_last": ok(train[2], train[3])}}
    dtypes = {"eager": "fp32", "channels_last": "fp32", "jit": "fp32", "bf16 autocast": "bf16", "int8 fx": "int8",
              "fast path": "fp32", "fused + channels_last": "fp32", "int8 quantize_int8": "int8"}
    return {
        "schema": 2,
        "env": {"date": "2026-01-01 00:00 UTC", "device": "test CPU", "torch": "2.x", "threads": 2,
                "interop_threads": 2, "load_before": 0.1, "load_after": 0.2, "argv": ["--crafted"],
                "duration_s": 60, "cpu_capability": "AVX512", "cpu_flags": ["avx512_bf16"]},
        "args": {"variant": "resnest50", "smoke": False, "warmup": 1, "repeats": 7, "repeats_large": 3},
        "peak": {"fp32": {"sizes": {"1024": peak_fp32}, "gflops": peak_fp32},
                 "bf16": {"sizes": {"1024": 4 * peak_fp32}, "gflops": 4 * peak_fp32},
                 "int8": {"error": "RuntimeError: no int8 matmul"}, "bf16_over_fp32": 4.0},
        "treatments": {n: {"dtype": d, "description": n} for n, d in dtypes.items()},
        "backbone": {"implementations": [{"role": "ours", "name": "resnest50 ours", "arch": "resnest",
                                          "own": ["fast path", "int8 quantize_int8"]},
                                         {"role": "official", "name": "resnest50 official 0.0.5", "arch": "resnest",
                                          "own": []},
                                         {"role": "resnet", "name": "ResNet-50 torchvision", "arch": "resnet",
                                          "own": []}],
                     "gmacs": {key: {"resnest": 100.0, "resnet": 80.0}}, "eval": {key: ev},
                     "train": {key_train: tr}, "key_eval": key, "key_train": key_train},
        "detector": {"workload": key, "implementations": [{"role": "ours", "name": "Faster R-CNN resnest50-FPN"},
                                                          {"role": "resnet", "name": "Faster R-CNN R-50-FPN"}],
                     "eval": {"ours": {"eager": ok(3000.0), "fused + channels_last": ok(det[0])},
                              "resnet": {"eager": ok(2700.0), "fused + channels_last": ok(det[1])}}},
    }


def _assert_every_table_names_the_machine(md: str, env: dict):
    """Every table of numbers in a report sits in a section whose opening names the machine and its CPU
    flags."""
    lines = md.splitlines()
    line = render.machine_line(env)
    assert "CPU flags: " in line and env["device"] in line
    tables = [i for i, text in enumerate(lines) if text.startswith("|---")]
    assert tables
    for i in tables:
        heading = max(j for j in range(i) if lines[j].startswith("#"))
        if not lines[heading].startswith(render._NO_NUMBERS):  # the menu of treatments: no numbers
            assert line in lines[heading:i], (lines[heading], lines[i - 1])


def _verdicts(res):
    return [g["met"] for g in render.goals(res)]


def test_goals_met_and_missed_on_crafted_numbers():
    # ours fast path 1000 ms on 100 GMAC = 200 GFLOP/s = 100% of a 200 GFLOP/s peak: met.
    # time ratio 1000 / 800 = 1.25 <= MAC ratio 1.25: met (at the boundary). Detector 2400 / 2200 = 1.09: met.
    # train 11000 / 8500 = 1.29x >= 1.2, peak equal: met, met. bf16: official best fp32 1800 / 500 = 3.6x: met.
    res = _crafted()
    # int8: ours 480 / ResNet 300 = 1.6 <= 1.6: met (at the boundary).
    assert _verdicts(res) == [True, True, True, True, True, True, True]
    goals = render.goals(res)
    assert goals[0]["measured"] == "100%" and "fast path" in goals[0]["how"]
    assert goals[1]["measured"] == "1.2500" and "jit" in goals[1]["how"]  # ResNet's best fp32 is its jit
    # each goal missed in turn: the verdict flips, and the report says NOT MET
    misses = [dict(peak_fp32=250.0),  # 200 / 250 = 80% < 92%
              dict(resnet_jit=700.0),  # 1000 / 700 = 1.43 > 1.25
              dict(det=(2600.0, 2200.0)),  # 1.18 > 1.15
              dict(train=(10000.0, 4739.0, 11000.0, 4739.0)),  # 1.1x < 1.2x
              dict(train=(8500.0, 4800.0, 11000.0, 4739.0)),  # more peak memory than the official
              dict(ours_bf16=800.0),  # 1800 / 800 = 2.25x < 2.5x
              dict(ours_int8=481.0)]  # 481 / 300 = 1.603 > 1.6
    for n, kwargs in enumerate(misses):
        res = _crafted(**kwargs)
        verdicts = _verdicts(res)
        assert verdicts[n] is False and all(v for i, v in enumerate(verdicts) if i != n), (n, verdicts)
        md = render.render_markdown(res)
        assert md.count("| **NOT MET** |") == 1 and md.count("| met |") == 6
    # a ratio just over the MAC ratio, equal at three decimals: four decimals show why it is not met
    res = _crafted(resnet_jit=799.8)  # 1000 / 799.8 = 1.25031 > 1.25
    assert render.goals(res)[1]["measured"] == "1.2503" and render.goals(res)[1]["target"] == "<= MAC ratio 1.2500"
    assert render.goals(res)[1]["met"] is False
    # the best of ours is the best of all its fp32 entries, its own fast path included, never a bf16 one
    res = _crafted(ours_fast=2000.0)  # now channels_last (1400) is ours' best fp32: 142.9 GFLOP/s, 71%
    assert render.goals(res)[0]["measured"] == "71%" and "channels_last" in render.goals(res)[0]["how"]


def test_goals_not_measured_is_not_met():
    res = _crafted()
    res["backbone"]["eval"]["800x1216 b1"]["ours"]["bf16 autocast"] = {"error": "RuntimeError: no bf16"}
    del res["detector"]
    res["backbone"]["train"]["800x1216 b2"]["official"]["channels_last"] = {"error": "ValueError: batch 1"}
    verdicts = _verdicts(res)
    assert verdicts == [True, True, None, None, None, None, True]
    md = render.render_markdown(res)
    assert md.count("| not measured |") == 4 and md.count("| met |") == 3
    assert "RuntimeError: no bf16" in md and "ValueError: batch 1" in md  # the failures are listed


def test_render_is_a_function_of_the_json(tmp_path):
    require("matplotlib", "a test extra: pip install -e .[test]")
    res = _crafted()
    md = render.render_markdown(res)
    assert render.render_markdown(json.loads(json.dumps(res))) == md
    assert "fails [1]" in md and "1. resnest50 ours / int8 fx (800x1216 b1): TraceError: control flow" in md
    assert "| fp32 | 200 | 200 |" in md and "| int8 | - | not available: RuntimeError: no int8 matmul |" in md
    assert "bf16 / fp32 peak: 4.00 (well above 1" in md
    assert "on test CPU, CPU flags: avx512_bf16;" in md  # the measured line
    _assert_every_table_names_the_machine(md, res["env"])
    render.render_png(res, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_refuses_a_missing_or_foreign_json(tmp_path, capsys):
    bench = _tool()
    with pytest.raises(SystemExit):
        bench.main(["--render", str(tmp_path / "none.json"), "--out", str(tmp_path / "r.md")])
    assert "none.json does not exist" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps({"env": {}, "args": {}, "backbone": {}}))
    with pytest.raises(SystemExit):
        bench.main(["--render", str(tmp_path / "old.json"), "--out", str(tmp_path / "r.md")])
    assert 'no "schema": 2' in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    (tmp_path / "new.json").write_text(json.dumps(_crafted()))
    require("matplotlib", "a test extra: pip install -e .[test]")
    bench.main(["--render", str(tmp_path / "new.json"), "--out", str(tmp_path / "r.md")])
    assert (tmp_path / "r.md").read_text() == render.render_markdown(_crafted())
