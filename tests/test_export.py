"""TorchScript (script + trace) and ONNX export of the backbone and of Faster R-CNN ResNeSt-FPN."""
import os

import pytest
import torch

from conftest import load_tool, require
from resnest_backbone import export
from resnest_backbone.core import build_resnest
from resnest_backbone.core.fuse import fuse_resnest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4


export_tool = load_tool("export")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["resnest14d", "4s2x40d"])
def trunks(request):
    """(unfused eval trunk, fused copy); the second is a small radix-4, cardinality-2 avd_first trunk."""
    torch.manual_seed(0)
    if request.param == "resnest14d":
        model = build_resnest("resnest14d")
    else:
        model = build_resnest("resnest14d", radix=4, cardinality=2, bottleneck_width=40, avd_first=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    return model, fuse_resnest(model)


def _diff(a, b) -> float:
    assert list(a) == list(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_script_and_trace_equal_eager(trunks, fused, tmp_path):
    model = trunks[int(fused)]
    x = torch.randn(1, 3, 64, 64)
    other = torch.randn(2, 3, 96, 64)
    scripted = export.export_backbone_torchscript(model, x, str(tmp_path / "s.ts"), "script")
    traced = export.export_backbone_torchscript(model, x, str(tmp_path / "t.ts"), "trace")
    with torch.no_grad():
        for inp in (x, other):
            ref = model(inp)
            assert _diff(ref, scripted(inp)) < 1e-5
            assert _diff(ref, traced(inp)) < 1e-5
    # the saved files load back and agree (the CLI's check)
    assert export.check_backbone_torchscript(model, str(tmp_path / "s.ts"), [x, other]) < 1e-5


def test_scripted_training_mode_keeps_batch1_fallback():
    torch.manual_seed(0)
    model = build_resnest("resnest14d", out_features=("res4",))
    scripted = torch.jit.script(model)
    model.train()
    scripted.train()
    x = torch.randn(1, 3, 64, 64)
    ref, out = model(x)["res4"], scripted(x)["res4"]  # batch 1: running stats in the attention norm
    assert (ref - out).abs().max().item() < 1e-5
    with pytest.raises(Exception, match=r"\(N, 3, H, W\)"):
        scripted.eval()(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_backbone_onnx_equals_pytorch(trunks, fused, tmp_path):
    onnx = require("onnx", "a test extra: pip install -e .[test]")
    require("onnxruntime", "a test extra: pip install -e .[test]")
    model = trunks[int(fused)]
    path = str(tmp_path / "backbone.onnx")
    names = export.export_backbone_onnx(model, torch.randn(1, 3, 64, 64), path, opset=17)
    assert names == ["res2", "res3", "res4", "res5"]
    proto = onnx.load(path)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 13
    # dynamic batch and resolution: another shape than the export's
    diff = export.check_backbone_onnx(model, path, [torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 64)],
                                      atol=ATOL)
    assert diff < ATOL


def test_export_cli_backbone(tmp_path):
    require("onnxruntime", "a test extra: pip install -e .[test]")
    out = tmp_path / "r14.onnx"
    assert export_tool.main(["backbone", "--variant", "resnest14d", "--fuse", "--format", "onnx", "--height",
                             "64", "--width", "64", "-o", str(out)]) == 0
    assert out.stat().st_size > 1e6
    with pytest.raises(ValueError, match="opset"):
        export_tool.main(["backbone", "--variant", "resnest14d", "--opset", "11", "-o",
                          str(tmp_path / "x.onnx")])


@pytest.mark.d2
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_faster_rcnn_onnx_equals_pytorch(fuse, tmp_path):
    require("detectron2", "make env installs detectron2")
    require("onnxruntime", "a test extra: pip install -e .[test]")
    from resnest_backbone.d2 import export as d2_export

    torch.manual_seed(0)
    opts = ["MODEL.RESNEST.VARIANT", "resnest14d", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "200"]
    _, model = d2_export.build_detectron2_model(os.path.join(ROOT, "configs", "faster_rcnn_resnest50_fpn.yaml"),
                                                opts, fuse=fuse)
    assert any(type(m).__name__ == "FusedBottleneck" for m in model.modules()) == fuse
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    wrapped = d2_export.DetectorExport(model, image)
    boxes = wrapped.reference[0]
    assert boxes.ndim == 2 and boxes.shape[0] > 0  # real detections to compare, not empty tensors
    path = str(tmp_path / "frcnn.onnx")
    wrapped.export_onnx(path, opset=17)
    assert wrapped.check_onnx(path, atol=ATOL) < ATOL
