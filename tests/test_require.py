"""conftest.require: in a contributor's partial environment a missing part skips, and the run's summary says
what it skipped for; in the full run (RESNEST_TEST_REQUIRE_ALL=1) the same missing part is a failure naming
it. Checked on a tiny test folder run by a real pytest process, with and without the variable."""
import os
import subprocess
import sys

import pytest

from conftest import REQUIRE_ALL

pytestmark = pytest.mark.slow  # real pytest processes

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")

# The project's conftest under another name (the folder's own conftest.py re-exports its mechanism).
FOLDER_CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("resnest_tests_conftest", {CONFTEST!r})
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
require, pytest_terminal_summary = project.require, project.pytest_terminal_summary
"""
WHOLE_MODULE = """
from conftest import require
require("resnest_no_such_module", "installed by nothing")

def test_never_collected():
    pass
"""
IN_TESTS = """
import os
from conftest import require

def test_present_parts():
    assert require("json", "the standard library").dumps([1]) == "[1]"
    assert require(os.path.abspath(__file__), "this file") == os.path.abspath(__file__)

def test_missing_folder(tmp_path):
    require(str(tmp_path / "tools-not-kept"), "setup puts them there")
    raise AssertionError("not reached")

def test_broken_install():
    require("broken_part", "make env builds it")
    raise AssertionError("not reached")
"""
BROKEN = 'raise ImportError("libbroken.so: cannot open shared object file")\n'


def _run(folder, require_all, *paths):
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ALL}
    if require_all:
        env[REQUIRE_ALL] = "1"
    env["PYTHONPATH"] = str(folder)  # broken_part.py
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir",
                           str(folder), *(str(folder / p) for p in paths or ["."])], cwd=str(folder), env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "conftest.py").write_text(FOLDER_CONFTEST)
    (tmp_path / "test_whole_module.py").write_text(WHOLE_MODULE)
    (tmp_path / "test_in_tests.py").write_text(IN_TESTS)
    (tmp_path / "broken_part.py").write_text(BROKEN)
    return tmp_path


def test_partial_environment_skips_and_says_what_is_missing(folder):
    code, out = _run(folder, require_all=False)
    assert code == 0, out
    assert "1 passed, 3 skipped" in out, out
    summary = out[out.index("skipped for a missing part"):]
    assert "missing part: resnest_no_such_module (ModuleNotFoundError" in summary and "installed by nothing" in summary
    assert "tools-not-kept (no such file or folder; setup puts them there)" in summary
    assert "missing part: broken_part (ImportError: libbroken.so: cannot open shared object file; make env builds it)" \
        in summary
    assert f"{REQUIRE_ALL}=1 (the full run) makes each of these a failure" in summary


def test_full_run_fails_naming_each_missing_part(folder):
    # a part a whole module needs: a collection error, and pytest runs nothing
    code, out = _run(folder, True)
    assert code == 2 and "Interrupted: 1 error during collection" in out, out
    assert "ERROR collecting test_whole_module.py" in out and "missing part: resnest_no_such_module" in out, out
    assert f"{REQUIRE_ALL}=1 requires every part" in out
    # parts single tests need: those tests fail
    code, out = _run(folder, True, "test_in_tests.py")
    assert code == 1 and "2 failed, 1 passed" in out and "skipped" not in out, out
    assert "tools-not-kept (no such file or folder; setup puts them there)" in out, out
    assert "missing part: broken_part (ImportError: libbroken.so" in out, out
