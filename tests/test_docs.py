"""The documentation cannot drift from the code: every link and named file exists, every named test exists,
every shell command in README.md / MODEL_ZOO.md / docs/ parses with the tool's own argument parser (and its
config and overrides resolve), and every python snippet compiles and imports what it names."""
import argparse
import ast
import importlib
import os
import re
import runpy
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "MODEL_ZOO.md", "CHANGELOG.md"]
               + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")])
# Words that stand for a value the reader supplies; a command with one of them is parsed, not resolved.
PLACEHOLDERS = {"CFG", "CFG.yaml", "FILE", "FILE.pth", "HOST:PORT", "URL"}
TOP_DIRS = ("resnest_backbone/", "tools/", "configs/", "tests/", "docs/", "benchmarks/", ".ci/")


def _text(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def _blocks(text, languages):
    """(language, code) of the fenced blocks whose language is in `languages`."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
            if m.group(1) in languages]


def _slug(heading):
    """GitHub's anchor for a heading."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(page):
    text = re.sub(r"^```.*?^```", "", _text(page), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_and_named_files_exist(page):
    text = _text(page)
    here = os.path.dirname(page)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(here, path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            problems.append(f"link {target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            problems.append(f"link {target}: no heading #{anchor} in {resolved}")
    for name in set(re.findall(r"`([^`\s]+)`", text)):
        name = name.split("::")[0].rstrip(",.")
        # a path of this repository: a file with its extension, or a folder with its slash
        if name.startswith(TOP_DIRS) and re.search(r"\.\w+$|/$", name) and not re.search(r"[{*<]|\.\.\.", name):
            if not os.path.exists(os.path.join(ROOT, name)):
                problems.append(f"`{name}` does not exist")
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


def _test_names():
    names = {}
    folder = os.path.join(ROOT, "tests")
    for f in os.listdir(folder):
        if f.startswith("test_") and f.endswith(".py"):
            with open(os.path.join(folder, f), encoding="utf-8") as src:
                tree = ast.parse(src.read())
            names[f] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


@pytest.mark.parametrize("page", PAGES)
def test_named_tests_exist(page):
    text, known = _text(page), _test_names()
    problems = []
    for file, test in re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", text):
        if file not in known:
            problems.append(f"tests/{file} does not exist")
        elif test and test not in known[file]:
            problems.append(f"tests/{file}::{test} does not exist")
    everything = set().union(*known.values())
    for test in re.findall(r"`(test_\w+)`", text):
        if test not in everything:
            problems.append(f"no test named {test}")
    assert not problems, f"{page}:\n  " + "\n  ".join(problems)


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def _parse_with_tool(monkeypatch, entry, argv):
    """Run a tool's entry point up to its argument parsing: the tool's own parser parses `argv` (an error
    there fails the test), then the run stops before doing anything."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        entry(argv)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as exc:
        pytest.fail(f"{argv}: the tool's parser refused it (exit {exc.code})")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
    pytest.fail(f"{argv}: the tool returned without parsing arguments")


def _commands(page):
    """Shell commands of the page's bash blocks: continuation lines joined, comments dropped."""
    out = []
    for _, code in _blocks(_text(page), {"bash", "sh"}):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _check_train_net_config(args):
    """The config a train_net command names resolves, and its overrides are keys of that config."""
    if args.config_file in PLACEHOLDERS:
        return
    from resnest_backbone.d2.lazy import is_lazy_config
    from resnest_backbone.model_zoo import get_config_file
    from resnest_backbone.d2.train import get_resnest_cfg

    path = get_config_file(args.config_file)
    opts = list(args.opts or [])
    if is_lazy_config(path):
        from detectron2.config import LazyConfig

        LazyConfig.apply_overrides(LazyConfig.load(path), opts)
        return
    cfg = get_resnest_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(opts)


@pytest.mark.parametrize("page", PAGES)
def test_shell_commands_parse(page, monkeypatch):
    commands = _commands(page)
    for command in commands:
        words = shlex.split(command)
        while words and (words[0] in ("python", "nice") or words[0].endswith("/python") or "=" in words[0]):
            words = words[1:]
        tool, args = words[0], words[1:]
        if tool == "make":
            with open(os.path.join(ROOT, "Makefile")) as f:
                targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
            assert set(args) <= targets, f"{page}: `{command}`: no make target {set(args) - targets}"
        elif tool == "pip":
            with open(os.path.join(ROOT, "setup.py")) as f:
                declared = set(re.findall(r'^\s+"(\w+)": \[', f.read(), re.M))
            for extras in re.findall(r"\[([\w,]+)\]", command):
                unknown = set(extras.split(",")) - declared
                assert not unknown, f"{page}: `{command}`: setup.py has no extra {unknown}"
        elif tool == "-m":
            assert importlib.util.find_spec(args[0]) is not None, f"{page}: `{command}`: no module {args[0]}"
        elif tool == "resnest-convert":
            from resnest_backbone.convert.cli import main

            _parse_with_tool(monkeypatch, main, args)
        elif tool.startswith("tools/"):
            assert os.path.isfile(os.path.join(ROOT, tool)), f"{page}: `{command}`: no {tool}"
            module = runpy.run_path(os.path.join(ROOT, tool), run_name="docs_check")
            entry = module.get("run") or module["main"]
            parsed = _parse_with_tool(monkeypatch, entry, args)
            if tool == "tools/train_net.py":
                _check_train_net_config(parsed)
        elif tool in ("git", "cd", "export"):
            continue
        else:
            pytest.fail(f"{page}: `{command}`: the docs check does not know the command {tool!r}")


@pytest.mark.parametrize("page", PAGES)
def test_python_snippets_compile_and_import(page):
    for language, code in _blocks(_text(page), {"python"}):
        tree = ast.parse(code)  # a syntax error fails here
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "resnest_backbone":
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)
                           and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
                assert not missing, f"{page}: `from {node.module} import` {missing}: not there"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "resnest_backbone":
                        importlib.import_module(alias.name)
