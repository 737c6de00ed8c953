import importlib
import os
import warnings

# Before torch loads: idle OpenMP threads sleep instead of spinning. On 2 shared cores the spinning threads
# of one process starve the others (measured 4-10x slower small forward/backward passes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # detectron2 0.6 + torch 2.x deprecations
# Under pytest-xdist (`make test` and `make test-all` run -n 2) the workers share the cores: each gets its share.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

# ------------------------------------------------------------------------------------- parts of the install
REQUIRE_ALL = "RESNEST_TEST_REQUIRE_ALL"
MISSING = "missing part: "


def require(part: str, why: str):
    """The module `part` (imported and returned), or the file / folder `part` (a path: it contains a slash).

    The one way a test depends on a part of the environment (mmdet, mmseg, the upstream detectron2 tools, an
    sdist, ...). When the part is missing (not importable, ImportError included, or no such path): with
    RESNEST_TEST_REQUIRE_ALL=1 (the full run: `make test-all`, CI) the test fails naming it and `why`, so a
    broken install cannot pass as skips; otherwise (a contributor's partial environment) the test is skipped,
    and the run's summary lists every part it skipped for. At module level it skips or fails the whole file."""
    if "/" in part or os.sep in part:
        found, detail = os.path.exists(part), "no such file or folder"
    else:
        try:
            return importlib.import_module(part)
        except ImportError as exc:
            found, detail = False, f"{type(exc).__name__}: {exc}"
    if found:
        return part
    message = f"{MISSING}{part} ({detail}; {why})"
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{message}; {REQUIRE_ALL}=1 requires every part", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def pytest_terminal_summary(terminalreporter):
    """List what was skipped for a missing part (see require), once per part."""
    reasons = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if MISSING in reason:
            reason = reason[reason.index(MISSING):]
            reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped for a missing part")
        for reason, count in sorted(reasons.items()):
            terminalreporter.line(f"{count} skipped: {reason}")
        terminalreporter.line(f"{REQUIRE_ALL}=1 (the full run) makes each of these a failure")


def load_file(path: str, name: str):
    """A fresh module object of the Python file `path` (a command-line tool is a file, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """tools/<name>.py of this checkout as a fresh module."""
    return load_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                                  f"{name}.py"), f"tools_{name}")


def randomize_norm_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters, so a fidelity test cannot pass by BN being identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@pytest.fixture(autouse=True)
def _mm_default_scope_restored():
    """mmengine keeps one current default scope per process: a Runner or `init_default_scope("mmdet")` in one
    test would make a later test's `MMSEG_MODELS.build(EncoderDecoder)` look in mmdet's registry. Every test
    ends with the scopes it started with."""
    import sys

    registry = sys.modules.get("mmengine.registry")
    before = dict(registry.DefaultScope._instance_dict) if registry is not None else {}
    yield
    registry = sys.modules.get("mmengine.registry")
    if registry is not None:
        registry.DefaultScope._instance_dict.clear()
        registry.DefaultScope._instance_dict.update(before)


@pytest.fixture
def no_tf32():
    """float32 comparisons on CUDA: TF32 off for cuDNN convolutions (on by default on Ampere and later, about
    1e-3 relative) and cuBLAS matmuls, restored after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one thread is faster, and far faster on a loaded machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors_of(value, prefix=""):
    """Every tensor in a nested checkpoint (dicts, lists, tuples) by its path of keys."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    found = {}
    for key, item in items:
        found.update(tensors_of(item, f"{prefix}/{key}"))
    return found


def official_features(model, x):
    """layer1..layer4 outputs of an official resnest==0.0.5 model."""
    y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = {}
    for i, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
        y = layer(y)
        feats[f"res{i + 2}"] = y
    return feats


def d2_cfg(config="configs/faster_rcnn_resnest50_fpn.yaml", **overrides):
    """A detectron2 config with MODEL.RESNEST, merged from a project config, on CPU."""
    from detectron2.config import get_cfg

    from resnest_backbone.d2 import add_resnest_config  # importing resnest_backbone.d2 registers the builders

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = get_cfg()
    add_resnest_config(cfg)
    cfg.merge_from_file(os.path.join(root, config))
    cfg.MODEL.DEVICE = "cpu"
    opts = []
    for key, value in overrides.items():
        opts += [key, value]
    cfg.merge_from_list(opts)
    return cfg
