"""tools/env: the sdist fetcher takes its index from pip's own configuration (no registry host in the project)
and trusts a file only when its sha256 matches the index; the sdist patches are idempotent and keyed."""
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_TOOLS = os.path.join(REPO, "tools", "env")
sys.path.insert(0, ENV_TOOLS)
import fetch_sdist  # noqa: E402
import patch_sdists  # noqa: E402


def _pip_env(monkeypatch, tmp_path, config_text=None, **env):
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    config = tmp_path / "pip.conf"
    config.write_text(config_text or "")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_index_from_the_environment(monkeypatch, tmp_path):
    _pip_env(monkeypatch, tmp_path, PIP_INDEX_URL="http://127.0.0.1:1/simple/",
             PIP_EXTRA_INDEX_URL="http://127.0.0.1:2/simple file:///nowhere")
    assert fetch_sdist.index_urls() == ["http://127.0.0.1:1/simple", "http://127.0.0.1:2/simple"]


def test_index_from_pip_config(monkeypatch, tmp_path):
    _pip_env(monkeypatch, tmp_path, "[global]\nindex-url = http://127.0.0.1:3/simple\n")
    assert fetch_sdist.index_urls() == ["http://127.0.0.1:3/simple"]


def test_index_defaults_to_pips_own(monkeypatch, tmp_path):
    from pip._internal.models.index import PyPI

    _pip_env(monkeypatch, tmp_path)
    assert fetch_sdist.index_urls() == [PyPI.simple_url.rstrip("/")]


@pytest.fixture
def index(tmp_path):
    """A PEP 503 simple index on loopback with pkg-1.0.tar.gz (its hash listed) and bad-1.0.tar.gz (wrong hash)."""
    files = {}
    for name in ("pkg", "bad"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = f"{name} contents".encode()
            info = tarfile.TarInfo(f"{name}-1.0/README")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        files[f"/files/{name}-1.0.tar.gz"] = buf.getvalue()
    pages = {f"/simple/{name}/": (f'<a href="../../files/{name}-1.0.tar.gz#sha256='
                                  f'{hashlib.sha256(files[f"/files/{name}-1.0.tar.gz"]).hexdigest() if name == "pkg" else "0" * 64}">'
                                  f'{name}-1.0.tar.gz</a>').encode() for name in ("pkg", "bad")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path) or files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", files
    server.shutdown()


def _fetch(url, name, dest):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_INDEX_URL=url, PIP_CONFIG_FILE=os.devnull)
    return subprocess.run([sys.executable, os.path.join(ENV_TOOLS, "fetch_sdist.py"), name, "1.0", str(dest)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_fetch_checks_the_hash(index, tmp_path):
    url, files = index
    proc = _fetch(url, "pkg", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    with open(path, "rb") as f:
        assert f.read() == files["/files/pkg-1.0.tar.gz"]
    proc = _fetch(url, "bad", tmp_path / "out")  # served, but not the file the index vouches for
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "bad-1.0.tar.gz")
    proc = _fetch(url, "absent", tmp_path / "out")
    assert proc.returncode != 0 and "absent-1.0.tar.gz not found" in proc.stderr and url in proc.stderr


@pytest.mark.parametrize("target", sorted(patch_sdists.PATCHES))
def test_patch_key_follows_the_patches(target, monkeypatch):
    key = patch_sdists.patch_key(target)
    assert key == patch_sdists.patch_key(target) and len(key) == 12
    other = next(t for t in patch_sdists.PATCHES if t != target)
    monkeypatch.setitem(patch_sdists.PATCHES, target, patch_sdists.PATCHES[target] + patch_sdists.PATCHES[other])
    assert patch_sdists.patch_key(target) != key


def test_detectron2_patches_are_idempotent(tmp_path):
    cache = os.environ.get("RESNEST_WHEEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnest-backbone")
    sdist = os.path.join(cache, "sdists", "pb1-detectron2-0.6.tar.gz")
    require(sdist, "tools/env/setup_env.sh downloads it when it builds detectron2")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "pb1-detectron2-0.6"

    def snapshot():
        return {p: p.read_bytes() for p in root.rglob("*.py")}

    for patch in patch_sdists.PATCHES["detectron2"]:
        patch(root)
    once = snapshot()
    for patch in patch_sdists.PATCHES["detectron2"]:
        patch(root)
    assert snapshot() == once
    assert not (root / "detectron2" / "_C.py").exists()  # no stand-in: `import detectron2._C` fails, as on main
    assert "COCOeval_opt = COCOeval" in (root / "detectron2/evaluation/coco_evaluation.py").read_text()
