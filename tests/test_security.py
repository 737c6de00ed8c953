"""Issue 6, checkpoints: nothing we are handed is executed, on every load path.

Each hostile file carries a payload that creates a marker file when unpickled; a control test proves the
payload really fires under plain pickle / torch.load(weights_only=False), so the refusals below are
meaningful. Legitimate layouts (pickle protocols 2-5, numpy arrays in .pth, torch's legacy format,
safetensors) must still load."""
import _pickle
import argparse
import ast
import functools
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from resnest_backbone import build_resnest
from resnest_backbone.convert import (CheckpointError, convert_checkpoint, load_state_dict, load_weights,
                                      read_checkpoint)
from resnest_backbone.convert.cli import main as convert_main
from resnest_backbone.convert.io import save_d2_pkl


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@functools.lru_cache(maxsize=1)
def _trunk_state():
    return OrderedDict(build_resnest("resnest14d").state_dict())


def _trunk_with(payload):
    """A real ResNeSt state_dict with the payload hidden among the weights."""
    state = OrderedDict(_trunk_state())
    state["layer1.0.conv2.fc1.weight"] = payload
    return state


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(marker, {kind: path}) written once for the module; every test checks the marker stays absent."""
    marker, files = _hostile_files(tmp_path_factory.mktemp("hostile"))
    yield marker, files
    assert not marker.exists()


def _hostile_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = Payload(str(marker))
    files = {}
    files["pkl"] = tmp_path / "evil.pkl"  # detectron2 format
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": {k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                               for k, v in _trunk_with(payload).items()},
                     "__author__": "x", "matching_heuristics": True}, f, protocol=2)
    files["pth"] = tmp_path / "evil.pth"  # torch zip format
    torch.save(_trunk_with(payload), files["pth"])
    files["legacy_pth"] = tmp_path / "evil_legacy.pth"  # torch's pre-1.6 format
    torch.save(_trunk_with(payload), files["legacy_pth"], _use_new_zipfile_serialization=False)
    files["pickle_as_pth"] = tmp_path / "evil_plain.pth"  # a plain pickle behind a .pth name
    with open(files["pickle_as_pth"], "wb") as f:
        pickle.dump({"a": np.zeros(3, np.float32), "b": payload}, f, protocol=4)
    files["object_array"] = tmp_path / "evil_objarray.pkl"  # payload inside a numpy object array
    with open(files["object_array"], "wb") as f:
        pickle.dump({"conv1.0.weight": np.array([payload, 1], dtype=object)}, f, protocol=4)
    return marker, files


def test_payload_fires_without_protection(tmp_path):
    # Control: the payload is real, so a refusal below is a refusal of working exploit code.
    marker, files = _hostile_files(tmp_path)
    with open(files["pkl"], "rb") as f:
        pickle.load(f, encoding="latin1")  # what detectron2's own DetectionCheckpointer does with a .pkl
    assert marker.exists()
    marker.unlink()
    torch.load(files["pth"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["pkl", "pth", "legacy_pth", "pickle_as_pth", "object_array"])
def test_hostile_checkpoint_refused_by_every_reader(hostile, kind):
    marker, files = hostile
    path = str(files[kind])
    for load in (read_checkpoint, load_state_dict):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert path in message and "refused" in message and "posix.system" in message
        assert "Nothing in the file was executed" in message
        assert "weights_only set to False" not in message  # torch's advice to disable the protection
    with pytest.raises(CheckpointError):
        load_weights(build_resnest("resnest14d"), path)
    assert not marker.exists()


def test_hostile_checkpoint_refused_by_converter_cli(hostile, tmp_path, capsys):
    marker, files = hostile
    for kind in ("pkl", "pth"):
        out = tmp_path / f"out_{kind}.pkl"
        assert convert_main([str(files[kind]), str(out)]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and str(files[kind]) in err
        assert not out.exists()
    assert not marker.exists()
    assert not list(tmp_path.glob("out_*"))  # no temporary files either


@pytest.mark.d2
def test_hostile_checkpoint_refused_by_detectron2_checkpointer(hostile, tmp_path):
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    marker, files = hostile
    model = build_resnest("resnest14d")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = SafeDetectionCheckpointer(model, str(tmp_path / "run"))
    for kind in ("pkl", "pth", "legacy_pth"):
        with pytest.raises(CheckpointError, match="refused"):
            checkpointer.load(str(files[kind]))
    # --resume path: last_checkpoint pointing at a hostile file
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "evil.pth").write_bytes(files["pth"].read_bytes())
    (run / "last_checkpoint").write_text("evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        checkpointer.resume_or_load("", resume=True)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_pickled_outside_torch_save_is_refused(tmp_path):
    # pickle.dump of a tensor reconstructs through torch internals (and torch.load of raw bytes): refused.
    path = tmp_path / "tensor.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1.0.weight": torch.zeros(2)}, f, protocol=4)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_numpy_pickles_of_any_protocol_load(tmp_path, protocol):
    weights = {"conv1.0.weight": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
               "scalar": np.float64(2.5), "ints": np.arange(3, dtype=np.int64)}
    path = tmp_path / f"p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": OrderedDict(weights), "__author__": "me"}, f, protocol=protocol)
    out = load_state_dict(str(path))
    assert torch.equal(out["conv1.0.weight"], torch.from_numpy(weights["conv1.0.weight"]))
    assert out["scalar"].item() == 2.5 and out["ints"].tolist() == [0, 1, 2]


def test_training_checkpoints_with_numpy_and_namespace_load(tmp_path):
    # timm / mmcv training checkpoints carry argparse.Namespace args and numpy values: data, admitted.
    path = tmp_path / "checkpoint-3.pth.tar"
    state = build_resnest("resnest14d").state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1, model="resnest14d"),
                "metric": np.float64(0.5), "epoch": 3}, path)
    data = read_checkpoint(str(path))
    assert data["args"].lr == 0.1 and data["epoch"] == 3
    assert set(load_state_dict(str(path))) == set(state)


def test_legacy_torch_format_loads(tmp_path):
    path = tmp_path / "legacy.pth"
    state = build_resnest("resnest14d").state_dict()
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(str(path))["layer4.0.conv2.fc2.weight"], state["layer4.0.conv2.fc2.weight"])


def test_safetensors_in_and_out(tmp_path):
    from safetensors.torch import save_file

    model = build_resnest("resnest14d", num_classes=7)
    src = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    out = tmp_path / "mmdet.safetensors"
    convert_checkpoint(str(src), str(out), "mmdet")
    back = tmp_path / "official_back.safetensors"
    convert_checkpoint(str(out), str(back), "official")
    fresh = build_resnest("resnest14d")
    report = load_weights(fresh, str(back))
    assert report.complete and report.naming == "official"
    for key, value in fresh.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, model.state_dict()[key]), key


class Unpickling:
    """Every unpickling call made while active, seen through sys.setprofile (which reports calls of C
    functions too), wherever the unpickler was bound and whatever it is called: the C unpickler's `loads`/`load`
    and any `Unpickler(...).load()` (the safe reader's restricted subclass included), pickle's pure-Python
    unpickler, torch's weights-only unpickler and torch.serialization's load."""

    PYTHON = {os.path.join("", "pickle.py"): ("load", "loads", "_load", "_loads"),
              os.path.join("torch", "_weights_only_unpickler.py"): ("load",),
              os.path.join("torch", "serialization.py"): ("load", "_load", "_legacy_load")}

    def __enter__(self):
        self.calls, self._before = [], sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._before)

    def _profile(self, frame, event, arg):
        if event == "c_call":
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, (_pickle.Unpickler, pickle._Unpickler)) or \
                    (getattr(arg, "__module__", None) == "_pickle" and arg.__name__ in ("load", "loads")):
                self.calls.append(f"{type(owner).__qualname__}.{arg.__name__}")
        elif event == "call":
            code = frame.f_code
            for path, names in self.PYTHON.items():
                if code.co_filename.endswith(os.sep + path) and code.co_name in names:
                    self.calls.append(f"{path}:{code.co_name}")


def test_safetensors_never_reach_an_unpickler(tmp_path):
    from safetensors.torch import save_file

    weights = build_resnest("resnest14d").state_dict()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    for kind, write in (("pkl", lambda p: save_d2_pkl(weights, str(p))), ("pth", lambda p: torch.save(weights, p))):
        control = tmp_path / f"w.{kind}"  # the same weights in the pickle formats: the unpicklers are seen
        write(control)
        with Unpickling() as seen:
            read_checkpoint(str(control))
        assert seen.calls, kind
    with Unpickling() as seen:
        assert torch.equal(read_checkpoint(str(path))["conv1.0.weight"], weights["conv1.0.weight"])
        load_state_dict(str(path))
        load_weights(build_resnest("resnest14d"), str(path))
        convert_checkpoint(str(path), str(tmp_path / "mmdet.safetensors"), "mmdet")
    assert seen.calls == []


@pytest.mark.parametrize("version", ["1.12.1", "2.5.1"])
def test_old_torch_refuses_pickled_torch_files(tmp_path, monkeypatch, version):
    # torch.load(weights_only=True) does not exist before 1.13 and had a bypass before 2.6 (CVE-2025-32434):
    # such a torch reads no pickled torch file, and says what to do; .pkl (our own unpickler) and
    # .safetensors (no pickle) still read.
    from safetensors.torch import save_file

    path = tmp_path / "w.pth"
    torch.save({"conv1.0.weight": torch.ones(1)}, path)
    legacy = tmp_path / "legacy.pth"
    torch.save({"conv1.0.weight": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    pkl, st = tmp_path / "w.pkl", tmp_path / "w.safetensors"
    with open(pkl, "wb") as f:
        pickle.dump({"conv1.0.weight": np.ones(1, np.float32)}, f, protocol=4)
    save_file({"conv1.0.weight": torch.ones(1)}, str(st))
    monkeypatch.setattr(torch, "__version__", version)
    for name in (path, legacy):
        with pytest.raises(CheckpointError, match=rf"refused: torch {version} .*CVE-2025-32434.*upgrade torch "
                                                  r"\(>= 2.6\), or convert the file to .safetensors"):
            read_checkpoint(str(name))
    assert read_checkpoint(str(pkl))["conv1.0.weight"].tolist() == [1.0]
    assert read_checkpoint(str(st))["conv1.0.weight"].tolist() == [1.0]



# ------------------------------------------------------------------------------------------- static check
# Nothing but the safe reader unpickles or loads weights. An AST pass over every .py in resnest_backbone/ and
# tools/ resolves each name and attribute chain to what it is bound to (imports with their aliases, relative
# imports, assignments, `getattr(module, "name")`, `vars(module)["name"]` / `module.__dict__["name"]`,
# `importlib.import_module("name")` / `__import__`, names one of our modules imports from another, classes
# derived from a loader), then flags every reference to something that unpickles, called or not. Out of reach,
# as for any static check: attributes named by a computed string (`getattr(torch, name)`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_READER = "resnest_backbone/convert/io.py"
# Everything that unpickles, or hands a file to a framework loader that does, by qualified name.
UNPICKLING = {f"{module}.{name}" for module, names in {
    "pickle": ("load", "loads", "Unpickler", "_Unpickler", "_load", "_loads"),
    "_pickle": ("load", "loads", "Unpickler"),
    "cPickle": ("load", "loads", "Unpickler"),
    "dill": ("load", "loads", "Unpickler"),
    "cloudpickle": ("load", "loads"),
    "joblib": ("load",),
    "shelve": ("open", "Shelf", "DbfilenameShelf", "BsdDbShelf"),
    "pandas": ("read_pickle",),
    "pandas.io.pickle": ("read_pickle",),
    "torch": ("load",),
    "torch.serialization": ("load", "_load", "_legacy_load"),
    "torch.hub": ("load", "load_state_dict_from_url"),
    "torch.utils.model_zoo": ("load_url",),
    "torch.jit": ("load",),
    "torch.package": ("PackageImporter",),
    "mmengine": ("load",),
    "mmengine.fileio": ("load",),
    "mmengine.runner": ("load_checkpoint", "CheckpointLoader.load_checkpoint"),
    "mmengine.runner.checkpoint": ("load_checkpoint", "_load_checkpoint", "load_from_local",
                                   "CheckpointLoader.load_checkpoint"),
    "mmcv": ("load",),
    "mmcv.runner": ("load_checkpoint",),
}.items() for name in names}
UNPICKLERS = {"pickle.Unpickler", "pickle._Unpickler", "_pickle.Unpickler", "cPickle.Unpickler", "dill.Unpickler"}
# detectron2's / fvcore's checkpointers read files with their _load_file (pickle for a .pkl): a class derived
# from one is allowed only if it replaces _load_file (and never calls the original: flagged below).
CHECKPOINTERS = {"detectron2.checkpoint.DetectionCheckpointer", "detectron2.checkpoint.Checkpointer",
                 "detectron2.checkpoint.detection_checkpoint.DetectionCheckpointer",
                 "fvcore.common.checkpoint.Checkpointer"}
UNSAFE = UNPICKLING | UNPICKLERS | CHECKPOINTERS
NUMPY_LOADS = {"numpy.load", "numpy.lib.npyio.load", "numpy.lib.format.read_array"}  # unpickle if allow_pickle
# Calls on objects of unknown type under a framework loader's name (e.g. `runner.load_checkpoint(...)`).
LOADER_NAMES = {"load_state_dict_from_url", "load_url", "_load_checkpoint", "load_checkpoint", "read_pickle",
                "DetectionCheckpointer", "Checkpointer"}
_BUILTINS = {"getattr", "vars", "__import__"}


class _Module:
    """One source file: its module name, AST, and what each of its names is bound to (qualified names)."""

    def __init__(self, path, source):
        parts = path[:-len(".py")].split("/")
        self.package = ".".join(parts[:-1])  # what a relative import with one dot starts from
        self.name = self.package if parts[-1] == "__init__" else ".".join(parts)
        self.path, self.tree, self.safe_reader = path, ast.parse(source, path), path == SAFE_READER
        self.names, self.allowed_bases = {}, set()

    def bind(self, resolve):
        """One pass over the bindings; whether anything changed (repeated to a fixed point: an alias may be
        bound from a name bound later in the file, or in another module)."""
        before = dict(self.names)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    self.names[alias.asname or top] = alias.name if alias.asname else top
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = self.package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    if alias.name != "*":
                        self.names[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                value = resolve(self, node.value)
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(target, ast.Name) and value:
                        self.names[target.id] = value
            elif isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                for base in node.bases:
                    qualified = resolve(self, base)
                    if (qualified in UNPICKLERS and self.safe_reader and "find_class" in methods) or \
                            (qualified in CHECKPOINTERS and "_load_file" in methods):
                        self.allowed_bases.add(id(base))  # the restricted unpickler; a checkpointer made safe
                    elif qualified in UNSAFE:
                        self.names[node.name] = qualified  # the subclass loads as its base does
        return self.names != before


def _resolver(modules):
    """resolve(module, expression) -> the qualified name it denotes, or None."""

    def follow(name, depth=0):  # a name of one of our modules -> what it is bound to there
        head, _, rest = name.rpartition(".")
        while head and depth < 10:
            module = modules.get(head)
            first, _, tail = rest.partition(".")
            if module is not None and first in module.names:
                return follow(module.names[first] + (f".{tail}" if tail else ""), depth + 1)
            head, _, more = head.rpartition(".")
            rest = f"{more}.{rest}"
        return name

    def constant(node):
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    def resolve(module, node):
        if isinstance(node, ast.Name):
            if node.id in module.names:
                return follow(module.names[node.id])
            return f"builtins.{node.id}" if node.id in _BUILTINS else None
        if isinstance(node, ast.Attribute):
            base = resolve(module, node.value)
            return base and (f"{base}.__dict__" if node.attr == "__dict__" else follow(f"{base}.{node.attr}"))
        if isinstance(node, ast.Subscript):  # vars(m)["name"], m.__dict__["name"]
            base, key = resolve(module, node.value), constant(node.slice)
            return follow(f"{base[:-len('.__dict__')]}.{key}") if base and key and base.endswith(".__dict__") \
                else None
        if isinstance(node, ast.Call) and node.args:
            func, first = resolve(module, node.func), node.args[0]
            if func == "builtins.vars":
                base = resolve(module, first)
                return base and f"{base}.__dict__"
            if func == "builtins.getattr" and len(node.args) >= 2 and constant(node.args[1]):
                base = resolve(module, first)
                return base and follow(f"{base}.{constant(node.args[1])}")
            if func == "importlib.import_module" and constant(first):
                return follow(constant(first))
            if func == "builtins.__import__" and constant(first):
                fromlist = len(node.args) >= 4 or any(k.arg == "fromlist" for k in node.keywords)
                return follow(constant(first) if fromlist else constant(first).split(".")[0])
        return None

    return resolve


def unsafe_loads(sources):
    """{path relative to the repository: source} -> ["path:line: what"] for every reference to something
    that unpickles, outside the safe reader; in it, torch.load with weights_only=True and its restricted
    Unpickler subclass (one that defines find_class) only."""
    modules = {m.name: m for m in (_Module(path, source) for path, source in sources.items())}
    resolve = _resolver(modules)
    for _ in range(10):
        if not any([m.bind(resolve) for m in modules.values()]):
            break
    found = []
    for module in modules.values():
        parents = {id(child): parent for parent in ast.walk(module.tree) for child in ast.iter_child_nodes(parent)}

        def report(node, what):
            found.append(f"{module.path}:{node.lineno}: {what}")

        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                report(node, f"from {node.module} import * (names that cannot be checked)")
            if isinstance(node, ast.Call):
                func = resolve(module, node.func)
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if func in NUMPY_LOADS:
                    keywords = {k.arg: k.value for k in node.keywords}
                    allow = keywords.get("allow_pickle", node.args[2] if len(node.args) > 2 else None)
                    safe = allow is None or isinstance(allow, ast.Constant) and allow.value is False
                    if None in keywords or not safe:
                        report(node, f"{func} with allow_pickle (unpickles object arrays)")
                elif func is None and name in LOADER_NAMES:
                    report(node, f"{name}(...) (a framework loader's name)")
                elif name == "_load_file" and isinstance(node.func.value, ast.Call) and \
                        getattr(node.func.value.func, "id", "") == "super":
                    report(node, "super()._load_file(...) (the framework checkpointer's unpickling reader)")
            if not isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) or \
                    not isinstance(getattr(node, "ctx", ast.Load()), ast.Load) or id(node) in module.allowed_bases:
                continue
            qualified = resolve(module, node)
            if qualified not in UNSAFE:
                continue
            call = parents.get(id(node))
            if qualified == "torch.load" and module.safe_reader:
                if isinstance(call, ast.Call) and call.func is node and all(k.arg for k in call.keywords) and any(
                        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in call.keywords):
                    continue  # the safe reader's weights-only torch.load
                qualified += " without weights_only=True"
            report(node, qualified)
    return found


def _python_files():
    for top in ("resnest_backbone", "tools"):
        for folder, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")


# The export checks read back the TorchScript file they have just written (never a file they were handed).
EXEMPT = {("resnest_backbone/export.py", "torch.jit.load"), ("resnest_backbone/d2/export.py", "torch.jit.load")}


def test_nothing_but_the_safe_reader_loads_weights():
    files = sorted(_python_files())
    assert SAFE_READER in files and "tools/export.py" in files and "resnest_backbone/d2/checkpoint.py" in files
    sources = {}
    for rel in files:
        with open(os.path.join(REPO, rel)) as f:
            sources[rel] = f.read()
    problems = [p for p in unsafe_loads(sources) if (p.split(":")[0], p.rsplit(": ", 1)[1]) not in EXEMPT]
    assert not problems, f"weights loaded outside {SAFE_READER}:\n" + "\n".join(problems)
    # the check sees the safe reader's own loaders: the same code outside it is flagged
    moved = unsafe_loads({"resnest_backbone/convert/copy_of_io.py": sources[SAFE_READER]})
    assert any("torch.load" in p for p in moved) and any("pickle.Unpickler" in p for p in moved), moved


# (source, what must be reported): each way of reaching an unpickler must be caught.
UNSAFE_SNIPPETS = [
    ("import pickle\npickle.load(open('x', 'rb'))", "pickle.load"),
    ("import pickle\npickle.loads(b'')", "pickle.loads"),
    ("import pickle as pk\npk.load(f)", "pickle.load"),
    ("import _pickle\n_pickle.loads(b'')", "_pickle.loads"),
    ("from pickle import loads as l\nl(b'')", "pickle.loads"),
    ("from pickle import *\nloads(b'')", "import *"),
    ("import pickle\nf = pickle.loads\nf(b'')", "pickle.loads"),
    ("import pickle\nclass U(pickle.Unpickler):\n    pass\nU(f).load()", "pickle.Unpickler"),
    ("import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise KeyError\n"
     "U(f).load()", "pickle.Unpickler"),  # a restricted unpickler, but not the safe reader's
    ("import pickle\nvars(pickle)['loads'](b'')", "pickle.loads"),
    ("import pickle\npickle.__dict__['loads'](b'')", "pickle.loads"),
    ("import importlib\nimportlib.import_module('pickle').loads(b'')", "pickle.loads"),
    ("__import__('pickle').loads(b'')", "pickle.loads"),
    ("import torch\ntorch.load('x')", "torch.load"),
    ("import torch\ntorch.load('x', weights_only=False)", "torch.load"),
    ("import torch\ntorch.load('x', weights_only=True)", "torch.load"),  # outside the safe reader: not ours
    ("import torch\ntorch.serialization.load('x')", "torch.serialization.load"),
    ("import torch.serialization as s\ns._legacy_load(f)", "torch.serialization._legacy_load"),
    ("import torch\ngetattr(torch, 'load')('x')", "torch.load"),
    ("import torch\nload = getattr(torch, 'load')\nload('x')", "torch.load"),
    ("from torch import load as L\nL('x')", "torch.load"),
    ("import torch\nloader = torch.load\nloader('x')", "torch.load"),
    ("import torch\ndef f(path, read=torch.load):\n    return read(path)", "torch.load"),
    ("import torch\ntorch.jit.load('x.ts')", "torch.jit.load"),
    ("from torch.hub import load_state_dict_from_url as get\nget(u)", "torch.hub.load_state_dict_from_url"),
    ("import torch.utils.model_zoo as mz\nmz.load_url(u)", "torch.utils.model_zoo.load_url"),
    ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle"),
    ("import numpy as np\nnp.load('x', allow_pickle=1)", "allow_pickle"),
    ("import numpy as np\nnp.load('x', None, True)", "allow_pickle"),
    ("import numpy as np\nnp.load('x', **options)", "allow_pickle"),
    ("import pandas as pd\npd.read_pickle('x')", "pandas.read_pickle"),
    ("import joblib\njoblib.load('x')", "joblib.load"),
    ("import shelve\nshelve.open('x')", "shelve.open"),
    ("import dill\ndill.loads(b'')", "dill.loads"),
    ("from detectron2.checkpoint import DetectionCheckpointer\nDetectionCheckpointer(m).load('x')",
     "DetectionCheckpointer"),
    ("from fvcore.common.checkpoint import Checkpointer\nCheckpointer(m).load('x')", "Checkpointer"),
    ("from detectron2.checkpoint import DetectionCheckpointer as D\nclass C(D):\n    pass\nC(m).load('x')",
     "DetectionCheckpointer"),
    ("from detectron2.checkpoint import DetectionCheckpointer\nclass C(DetectionCheckpointer):\n"
     "    def _load_file(self, f):\n        return super()._load_file(f)", "super()._load_file"),
    ("from mmengine.runner.checkpoint import _load_checkpoint\n_load_checkpoint('x')", "_load_checkpoint"),
    ("from mmengine.runner import CheckpointLoader\nCheckpointLoader.load_checkpoint('x')",
     "CheckpointLoader.load_checkpoint"),
    ("import mmengine\nmmengine.load('x.pkl')", "mmengine.load"),
    ("runner.load_checkpoint('x')", "load_checkpoint(...)"),
]


@pytest.mark.parametrize("source,what", UNSAFE_SNIPPETS, ids=[f"unsafe{i}" for i in range(len(UNSAFE_SNIPPETS))])
def test_the_static_check_catches_each_unsafe_load(source, what):
    found = unsafe_loads({"resnest_backbone/module.py": source})
    assert any(what in problem for problem in found), found


def test_the_static_check_follows_names_across_our_modules():
    # a name one of our modules imports from another that bound it to an unpickler
    sources = {"resnest_backbone/a.py": "import pickle as p\nfrom torch import load\n",
               "resnest_backbone/sub/__init__.py": "",
               "resnest_backbone/sub/b.py": "from ..a import p, load\np.loads(b'')\nload('x')\n",
               "tools/c.py": "from resnest_backbone import a\na.p.Unpickler(f).load()\n"}
    found = unsafe_loads(sources)
    assert "resnest_backbone/sub/b.py:2: pickle.loads" in found and "resnest_backbone/sub/b.py:3: torch.load" in found
    assert "tools/c.py:2: pickle.Unpickler" in found


# Safe look-alikes: the check must not flag them (it would be useless if it flagged everything).
SAFE_SNIPPETS = [
    "import pickle\npickle.dump(x, f)\npickle.dumps(x)\nraise pickle.UnpicklingError('x')",
    "import json, yaml\njson.load(f)\nyaml.safe_load(f)",
    "import numpy as np\nnp.load('x')\nnp.load('x', allow_pickle=False)\nnp.save('x', a)",
    "model.load_state_dict(state)\nself.load(x)\nobj.load()",
    "def load(path):\n    return path\nload('x')",
    "import torch\ntorch.save(x, f)\ngetattr(torch, 'float16')\ntorch.serialization.safe_globals([])",
    "from safetensors.torch import load_file\nload_file('x')",
    "from resnest_backbone.convert.io import read_checkpoint\nread_checkpoint('x')",
    "from detectron2.checkpoint import DetectionCheckpointer\nclass S(DetectionCheckpointer):\n"
    "    def _load_file(self, f):\n        return read_checkpoint(f)\nS(m).load('x')",
    "from mmengine.runner.checkpoint import CheckpointLoader\nCheckpointLoader.register_scheme(prefixes='', loader=f)",
]


@pytest.mark.parametrize("source", SAFE_SNIPPETS, ids=[f"safe{i}" for i in range(len(SAFE_SNIPPETS))])
def test_the_static_check_passes_safe_look_alikes(source):
    assert unsafe_loads({"resnest_backbone/module.py": source}) == []


def test_the_safe_reader_may_use_only_its_own_loaders():
    reader = {"torch.load('x', weights_only=True)": [],
              "torch.load('x')": ["torch.load without weights_only=True"],
              "torch.load('x', weights_only=flag)": ["torch.load without weights_only=True"],
              "torch.load('x', **kw)": ["torch.load without weights_only=True"],
              "f = torch.load": ["torch.load without weights_only=True"],
              "pickle.loads(b'')": ["pickle.loads"],
              "class R(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise KeyError\nR(f).load()": [],
              "class R(pickle.Unpickler):\n    pass\nR(f).load()": ["pickle.Unpickler"]}
    for body, expected in reader.items():
        found = [p.split(": ", 1)[1] for p in unsafe_loads({SAFE_READER: "import pickle\nimport torch\n" + body})]
        assert found == expected if not expected else set(found) == set(expected), (body, found)
