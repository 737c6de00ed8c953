"""tools/benchmark.py in smoke mode (tiny sizes, one round): every model, workload and report path runs."""
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke(tmp_path):
    pytest.importorskip("resnest", reason="the official resnest package is a test dependency")
    pytest.importorskip("timm", reason="timm is a test dependency")
    pytest.importorskip("fvcore", reason="fvcore is a test dependency")
    pytest.importorskip("matplotlib", reason="matplotlib is a test dependency")
    spec = importlib.util.spec_from_file_location("tools_benchmark", os.path.join(ROOT, "tools", "benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        res = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path / "b.md"), "--grad-checkpoint",
                          "--png", str(tmp_path / "b.png"), "--json", str(tmp_path / "b.json")])
        only = bench.main(["--smoke", "--threads", "1", "--grad-checkpoint-only", "--grad-checkpoint-variants",
                           "resnest14d,resnest26d", "--grad-checkpoint-size", "2x64x96",
                           "--out", str(tmp_path / "gc.md")])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    names = [c["name"] for c in res["backbone"]["candidates"]]
    assert any("fast path" in n for n in names) and any("official" in n for n in names)
    assert any("timm" in n for n in names) and any("torchvision" in n for n in names)
    for kind in ("eval", "train"):
        assert res["backbone"][kind], kind
        for workload, times in res["backbone"][kind].items():
            trainable = [n for n, c in zip(names, res["backbone"]["candidates"]) if c["trains"] or kind == "eval"]
            assert set(times) == set(trainable), (kind, workload)
            assert all(t > 0 for t in times.values())
            assert all(p > 0 for p in res["backbone"][f"{kind}_peak"][workload].values())
    assert all(g["resnest"] > g["resnet"] > 0 for g in res["backbone"]["gmacs"].values())
    md = (tmp_path / "b.md").read_text()
    for name in names:
        assert f"| {name} |" in md
    assert "## Targets" in md
    assert "official / fast path" in md
    if res.get("detector"):
        assert len(res["detector"]["eval"]) == 4 and "Faster R-CNN" in md
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
    assert json.loads((tmp_path / "b.json").read_text())["env"]["threads"] == 1
    # --render rewrites the report from the saved numbers, measuring nothing
    bench.main(["--render", str(tmp_path / "b.json"), "--out", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == md
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
