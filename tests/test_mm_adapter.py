"""What importing resnest_backbone.mm changes in mmengine / mmcv / mmdet / mmseg (the registries and, as its
documented purpose, mmengine's local checkpoint loader: nothing else), what it does when mmdet is broken or
absent, and the mmengine hooks' refusals of what they cannot do (real Runners, tiny models)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import require

require("mmengine", "make env installs the OpenMMLab stack")
require("mmcv.ops", "mmcv with its compiled ops: make env builds it")
require("mmdet", "make env installs mmdet==3.3.0")
require("mmseg", "make env installs mmsegmentation==1.2.2")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports the frameworks as a config run does, snapshots every attribute of every framework module (and of the
# classes defined there) by identity, the contents of their dicts / lists / sets and of every Registry, then
# imports resnest_backbone.mm and prints what differs.
SNAPSHOT = r"""
import json, sys
import mmcv.cnn, mmcv.ops, mmengine.runner, mmengine.hooks, mmengine.optim, mmengine.model, mmengine.logging
import mmdet.models, mmdet.registry, mmseg.models, mmseg.registry
from mmengine.registry import Registry

FRAMEWORKS = ("mmengine", "mmcv", "mmdet", "mmseg")


def modules():
    return {n: m for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] in FRAMEWORKS}


def contents(value):
    if isinstance(value, Registry):
        return ("registry", dict(value._module_dict))
    if isinstance(value, dict):
        return ("dict", dict(value))
    if isinstance(value, (list, set, frozenset, tuple)):
        return ("seq", list(value))
    return None


def snapshot():
    seen = {}
    for name, module in modules().items():
        for attr, value in list(vars(module).items()):
            seen[f"{name}:{attr}"] = (value, contents(value))
            if isinstance(value, type) and value.__module__ == name:
                for key, item in list(vars(value).items()):
                    seen[f"{name}:{attr}.{key}"] = (item, contents(item))
    return seen


def differs(a, b):
    if a is None or b is None or a[0] != b[0]:
        return a is not b
    if a[0] == "seq":
        return len(a[1]) != len(b[1]) or any(x is not y for x, y in zip(a[1], b[1]))
    return a[1].keys() != b[1].keys() or any(a[1][k] is not b[1][k] for k in a[1])


before, known = snapshot(), set(modules())
import resnest_backbone.mm  # noqa: E402
after = snapshot()
report = {"new_modules": sorted(set(modules()) - known), "changed": {}, "registries": {}}
for key, (value, content) in before.items():
    new_value, new_content = after.get(key, (None, None))
    if key not in after:
        report["changed"][key] = "removed"
    elif content is not None and content[0] == "registry" and new_value is value:
        added = sorted(set(new_content[1]) - set(content[1]))
        replaced = sorted(k for k in content[1] if new_content[1].get(k) is not content[1][k])
        if added or replaced:
            report["registries"][f"{value.scope}.{value.name}"] = {
                "added": {k: f"{new_content[1][k].__module__}.{new_content[1][k].__qualname__}" for k in added},
                "replaced": replaced}
    elif new_value is not value or differs(content, new_content):
        entry = {"identity": new_value is value}
        if isinstance(content, tuple) and content[0] == "dict" and isinstance(new_value, dict):
            entry["keys"] = sorted(str(k) for k in set(content[1]) | set(new_value)
                                   if content[1].get(k) is not new_value.get(k))
            entry["new"] = {str(k): f"{getattr(new_value[k], '__module__', '')}.{getattr(new_value[k], '__name__', '')}"
                            for k in entry["keys"] if k in new_value}
        report["changed"][key] = entry
for key in set(after) - set(before):
    if key.split(":")[0] in known:
        report["changed"][key] = "added"
print("REPORT " + json.dumps(report))
"""


def _python(code, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def test_importing_the_adapter_changes_only_the_registries_and_the_documented_loader(tmp_path):
    proc = _python(SNAPSHOT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["new_modules"] == []  # every framework module it uses was in the snapshot
    ours = "resnest_backbone.mm."
    assert report["registries"] == {
        "mmdet.model": {"added": {"ResNeStSA": ours + "backbone.ResNeStSA"}, "replaced": []},
        "mmseg.model": {"added": {"ResNeStSA": ours + "backbone.ResNeStSA"}, "replaced": []},
        "mmengine.hook": {"added": {"ExactResumeHook": ours + "resume.ExactResumeHook",
                                    "ResNeStDropBlockHook": ours + "hooks.ResNeStDropBlockHook",
                                    "ResNeStInputCheckHook": ours + "hooks.ResNeStInputCheckHook"},
                          "replaced": []},
        "mmengine.optim_wrapper": {"added": {"AnyDeviceAmpOptimWrapper": ours + "amp.AnyDeviceAmpOptimWrapper"},
                                   "replaced": []},
    }
    # The documented loader: mmengine's own scheme table (CheckpointLoader.register_scheme rebuilds it) now
    # maps local paths ("") to the project's safe reader; nothing else in any framework module changed.
    assert report["changed"] == {"mmengine.runner.checkpoint:CheckpointLoader._schemes": {
        "identity": False, "keys": [""], "new": {"": ours + "compat.load_from_local"}}}


@pytest.mark.slow  # a process of its own
def test_an_installed_mmdet_that_does_not_import_fails_the_import_with_its_cause(tmp_path):
    # mmcv 2.2.0 (what `pip install -U mmcv` gives) is outside the range mmdet 3.3 / mmseg 1.2 assert on import.
    proc = _python("import mmcv\nmmcv.__version__ = '2.2.0'\nimport resnest_backbone.mm\n", tmp_path)
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("ImportError: resnest_backbone.mm: mmdet is installed but does not import"), last
    assert "AssertionError: MMCV==2.2.0 is used but incompatible" in last and "uninstall mmdet" in last


@pytest.mark.slow  # a process of its own
def test_without_mmdet_the_adapter_registers_in_mmseg(tmp_path):
    code = ("import sys\nsys.modules['mmdet'] = None  # not installed: find_spec gives None, imports fail\n"
            "import resnest_backbone.mm as mm\nfrom mmseg.registry import MODELS\n"
            "print('REGISTERED', mm.REGISTERED_IN, MODELS.get('ResNeStSA') is mm.ResNeStSA)\n")
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "REGISTERED ['mmseg'] True" in proc.stdout


def _tiny(dropblock_prob):
    """A BaseModel around a resnest14d trunk, with or without DropBlock."""
    from mmengine.model import BaseModel

    from resnest_backbone.mm import ResNeStSA

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.backbone = ResNeStSA(variant="resnest14d", dropblock_prob=dropblock_prob, out_indices=(3,))

        def forward(self, inputs, data_samples=None, mode="tensor"):
            out = self.backbone(inputs)[-1]
            return {"loss": out.pow(2).mean()} if mode == "loss" else out

    return Tiny()


def _runner(tmp_path, model, train_cfg, hooks):
    from mmengine.runner import Runner

    # experiment_name: mmengine keeps one logger / visualizer per name (by default the second it started in)
    return Runner(model=model, work_dir=str(tmp_path), experiment_name=f"run:{tmp_path}", default_scope="mmengine",
                  train_cfg=train_cfg,
                  train_dataloader=dict(dataset=[dict(inputs=torch.randn(3, 32, 32)) for _ in range(2)], batch_size=2,
                                        sampler=dict(type="DefaultSampler", shuffle=False),
                                        collate_fn=dict(type="default_collate")),
                  optim_wrapper=dict(optimizer=dict(type="SGD", lr=1e-3)), custom_hooks=hooks,
                  randomness=dict(seed=0))


def test_dropblock_hook_on_a_model_without_dropblock_is_an_error_naming_the_fix(tmp_path):
    runner = _runner(tmp_path, _tiny(0.0), dict(by_epoch=False, max_iters=1), [dict(type="ResNeStDropBlockHook")])
    with pytest.raises(ValueError, match=r"has no DropBlock2D.*Set model.backbone.dropblock_prob .* or remove "
                                         r"ResNeStDropBlockHook from custom_hooks"):
        runner.train()
    assert runner.iter == 0  # refused before the first step
    ramped = _runner(tmp_path / "ok", _tiny(0.1), dict(by_epoch=False, max_iters=1),
                     [dict(type="ResNeStDropBlockHook")])
    ramped.train()  # the same run with DropBlock in the model trains
    assert ramped.iter == 1


def test_exact_resume_refuses_a_loop_other_than_iteration_based(tmp_path):
    runner = _runner(tmp_path, _tiny(0.0), dict(by_epoch=True, max_epochs=1), [dict(type="ExactResumeHook")])
    with pytest.raises(ValueError, match=r"IterBasedTrainLoop only, not EpochBasedTrainLoop; train with "
                                         r"train_cfg=dict\(type='IterBasedTrainLoop'"):
        runner.train()
    assert runner.iter == 0
    iters = _runner(tmp_path / "ok", _tiny(0.0), dict(by_epoch=False, max_iters=1), [dict(type="ExactResumeHook")])
    iters.train()
    assert iters.iter == 1


def test_the_mm_extra_keeps_pkg_resources_while_mmengine_resolves_bases_with_it():
    """mmengine 0.10 resolves a config's `mmdet::` / `mmseg::` bases (every mmdet config here inherits one)
    through pkg_resources, which setuptools 82 removed: in a fresh environment with the newest setuptools,
    Config.fromfile failed with "No module named 'pkg_resources'" (tried 2026-12-07). While mmengine needs
    it, the [mm] extra keeps setuptools below 82."""
    import ast
    import inspect

    from mmengine.utils import package_utils

    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_call = next(node for node in ast.walk(ast.parse(f.read()))
                          if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in setup_call.keywords if k.arg == "extras_require"))
    if "pkg_resources" in inspect.getsource(package_utils.is_installed):
        assert "setuptools<82" in extras["mm"], extras["mm"]
