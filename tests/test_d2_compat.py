"""Importing resnest_backbone.d2 changes nothing in detectron2 but its registries: every attribute of every
detectron2 module it loads, and of every class defined there, is the same object before and after, the
default config is unchanged, and the registries only gain the plugin's entries. The workarounds for detectron2
versions (resnest_backbone/d2/compat.py) are applied by the entry points that need them, explicitly."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SNAPSHOT = r"""
import importlib, json, sys, warnings
warnings.simplefilter("ignore")

def snapshot():
    modules = {n: m for n, m in list(sys.modules.items()) if n.split(".")[0] == "detectron2" and m is not None}
    attrs = {}
    for name, module in modules.items():
        for key, value in list(vars(module).items()):
            attrs[f"{name}:{key}"] = id(value)
            if isinstance(value, type) and value.__module__ == name:  # a class defined there: its members too
                for member, item in list(vars(value).items()):
                    attrs[f"{name}:{key}.{member}"] = id(item)
    return attrs

def registries():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.config.defaults import _C
    from detectron2.utils.registry import Registry
    found = {"DatasetCatalog": sorted(DatasetCatalog.keys()), "MetadataCatalog": sorted(MetadataCatalog.list()),
             "default config": _C.dump()}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "detectron2" and module is not None:
            for key, value in list(vars(module).items()):
                if isinstance(value, Registry):
                    found[value._name] = sorted(value._obj_map)
    return found

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
before, regs_before = snapshot(), registries()
import resnest_backbone.d2
after, regs_after = snapshot(), registries()
print(json.dumps({"changed": sorted(k for k in before if k in after and before[k] != after[k]),
                  "removed": sorted(k for k in before if k not in after),
                  "new_modules": sorted({k.split(":")[0] for k in after} - {k.split(":")[0] for k in before}),
                  "registries": {k: [v, regs_after.get(k)] for k, v in regs_before.items() if v != regs_after.get(k)}}))
"""


def _run(*args):
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_adapter_changes_only_detectron2s_registries():
    import resnest_backbone.d2  # noqa: F401  (here: which detectron2 modules it loads, to import them first there)

    modules = sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "detectron2" and m is not None)
    assert "detectron2.engine.defaults" in modules and "detectron2.checkpoint" in modules
    found = _run(json.dumps(modules))
    assert found["changed"] == [] and found["removed"] == [] and found["new_modules"] == [], found
    changed = found["registries"]
    assert sorted(changed) == ["BACKBONE", "DatasetCatalog", "MetadataCatalog", "SEM_SEG_HEADS"], sorted(changed)
    for key, (before, after) in changed.items():  # entries added, none replaced or removed
        assert set(before) < set(after), key
    assert {"build_resnest_fpn_backbone", "build_resnest_deeplab_backbone"} <= set(
        changed["BACKBONE"][1])
    assert all(name.startswith("resnest_demo") for name in set(changed["DatasetCatalog"][1]) - set(
        changed["DatasetCatalog"][0]))


def test_the_snapshot_sees_a_patch():
    """Control: the comparison above would see what the launcher (d2/run.py) does on purpose, in its process."""
    probe = SNAPSHOT.replace("import resnest_backbone.d2\nafter",
                             "import resnest_backbone.d2\nfrom resnest_backbone.d2.compat import "
                             "use_plugin_in_unmodified_tools\nuse_plugin_in_unmodified_tools()\nafter")
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps(["detectron2.engine.defaults",
                                                                                 "detectron2.checkpoint"])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"detectron2.checkpoint:DetectionCheckpointer",
            "detectron2.engine.defaults:DetectionCheckpointer"} <= set(found["changed"])
    assert "default config" in found["registries"]
