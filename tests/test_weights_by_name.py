"""Published weights by variant name (resnest_backbone/convert/sources.py), against an HTTP server on
127.0.0.1 started here: the real sources are not reachable from the test machines, so the table is
pointed at the local server with RESNEST_WEIGHTS_SOURCES, pinning the full sha256 of a real checkpoint, and
the built-in entries' own path (their 8-hex sha256 prefix) is served through RESNEST_WEIGHTS_MIRROR."""
import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import require
from resnest_backbone import build_resnest
from resnest_backbone.convert import CheckpointError, WeightsUnavailable, fetch_weights, load_weights
from resnest_backbone.convert.cli import main as convert_main
from resnest_backbone.convert.sources import CACHE_ENV, SOURCES_ENV, sha256_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights():
    """A real resnest14d checkpoint (official names, with classifier), its bytes and sha256."""
    torch.manual_seed(0)
    state = build_resnest("resnest14d", num_classes=10).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return state, data, hashlib.sha256(data).hexdigest()


class _Server:
    """Serves `files` (URL path -> bytes) with Range support; records (path, Range header) per request;
    paths in `cut` are sent only halfway once (the connection closes mid-body)."""

    def __init__(self):
        self.files, self.requests, self.cut = {}, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def dead_url(path="/w.pth"):
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def table(tmp_path, monkeypatch, weights):
    """point(urls, sha256=...) writes a sources table for resnest14d and sets the environment to use it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv("RESNEST_WEIGHTS_MIRROR", raising=False)

    def point(urls, sha256=weights[2]):
        path = tmp_path / "sources.json"
        path.write_text(json.dumps({"resnest14d": {"file": f"resnest14d-{weights[2][:8]}.pth", "sha256": sha256,
                                                   "urls": list(urls)}}))
        monkeypatch.setenv(SOURCES_ENV, str(path))
        return cache / "resnest14d" / f"resnest14d-{weights[2][:8]}.pth"

    return point


def test_builtin_table(monkeypatch, tmp_path):
    # Every variant has a published file; its 8-hex sha256 prefix is the one in its published name; the cache
    # path names the variant, so the loaders' file-name evidence (avd_first!) holds for downloaded files.
    from resnest_backbone.convert import variant_from_filename
    from resnest_backbone.convert.sources import cached_path, weights_table
    from resnest_backbone.core.variants import VARIANTS, get_variant

    monkeypatch.delenv(SOURCES_ENV, raising=False)
    table = weights_table()
    assert set(VARIANTS) <= set(table)
    for name, entry in table.items():
        assert len(entry.sha256) == 8 and f"-{entry.sha256}.pth" in entry.file and entry.provenance
        assert entry.urls and all(u.startswith("https://") and u.endswith("/" + entry.file) for u in entry.urls)
        named = variant_from_filename(cached_path(name, str(tmp_path)))
        assert named is not None and get_variant(named).arch() == get_variant(name).arch(), name


def test_builtin_entries_are_checked_by_their_published_prefix(server, weights, tmp_path, monkeypatch, capsys):
    """The path every built-in entry takes (8-hex sha256 prefix, no RESNEST_WEIGHTS_SOURCES), through the
    built-in table itself, served by a mirror (RESNEST_WEIGHTS_MIRROR: <mirror>/<published file name>); the
    remote URLs are left out (not reachable from the test machines)."""
    import dataclasses

    from resnest_backbone.convert import sources

    state, data, digest = weights
    monkeypatch.delenv(SOURCES_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(sources.MIRROR_ENV, server.url + "/mirror")
    builtin = sources.weights_entry("resnest14d")
    assert builtin is sources._BUILTIN["resnest14d"] and builtin.sha256 == "9c8fe254" and not builtin.full_hash

    # The real entry: the mirror is asked for its published file; a file of another hash is refused by the prefix.
    monkeypatch.setitem(sources._BUILTIN, "resnest14d", dataclasses.replace(builtin, urls=()))
    server.files["/mirror/gluon_resnest14-9c8fe254.pth"] = data
    with pytest.raises(WeightsUnavailable) as err:
        fetch_weights("resnest14d", progress=False, log=lambda _: None)
    assert f"{server.url}/mirror/gluon_resnest14-9c8fe254.pth: wrong file: sha256 {digest} does not match 9c8fe254" \
        in str(err.value)
    assert os.listdir(tmp_path / "cache" / "resnest14d") == ["gluon_resnest14-9c8fe254.pth.lock"]

    # The same entry with the served file's own prefix in its file name, as the published files carry theirs:
    # downloaded, checked by the prefix, cached, converted by name, and loaded by name from the cache.
    prefix, file = digest[:8], f"gluon_resnest14-{digest[:8]}.pth"
    monkeypatch.setitem(sources._BUILTIN, "resnest14d", dataclasses.replace(builtin, file=file, sha256=prefix, urls=()))
    server.files[f"/mirror/{file}"] = data
    out = tmp_path / "r14.pkl"
    assert convert_main(["resnest14d", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"sha256 prefix {prefix} (the published 8 hex digits; no full hash is published) verified" in err, err
    assert sha256_of(tmp_path / "cache" / "resnest14d" / file) == digest
    assert server.requests[-1] == (f"/mirror/{file}", None)
    model = build_resnest("resnest14d")
    load_weights(model, "resnest14d")
    assert torch.equal(model.state_dict()["layer2.0.conv2.fc2.weight"], state["layer2.0.conv2.fc2.weight"])
    assert f"sha256 prefix {prefix}" in capsys.readouterr().err and len(server.requests) == 2  # from the cache

    # A cached file whose prefix no longer matches is deleted and fetched again; a served one that does not
    # match (one bit changed) is refused and nothing is kept.
    (tmp_path / "cache" / "resnest14d" / file).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    server.files[f"/mirror/{file}"] = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(WeightsUnavailable, match=f"does not match {prefix}"):
        fetch_weights("resnest14d", progress=False, log=lambda _: None)
    assert sorted(os.listdir(tmp_path / "cache" / "resnest14d")) == [builtin.file + ".lock", file + ".lock"]


@pytest.mark.slow
def test_cli_downloads_verifies_converts_then_uses_the_cache(server, table, weights, tmp_path):
    state, data, digest = weights
    server.files["/releases/r14.pth"] = data
    cached = table([server.url + "/releases/r14.pth"])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def convert(out):
        return subprocess.run([sys.executable, "-m", "resnest_backbone.convert.cli", "resnest14d", str(out)],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)

    proc = convert(tmp_path / "r14_d2.pkl")
    assert proc.returncode == 0, proc.stderr
    assert f"full sha256 {digest} verified" in proc.stderr and "wrote" in proc.stdout
    assert "variant: resnest14d (decided by: variant name)" in proc.stdout
    assert sha256_of(cached) == digest and sorted(os.listdir(cached.parent)) == [cached.name, cached.name + ".lock"]
    with open(tmp_path / "r14_d2.pkl", "rb") as f:
        out = pickle.load(f)
    assert out["resnest"]["variant"] == "resnest14d" and out["resnest"]["decided_by"] == "variant name"
    assert torch.equal(torch.from_numpy(out["model"]["layer1.0.conv2.fc1.weight"]), state["layer1.0.conv2.fc1.weight"])
    assert server.requests == [("/releases/r14.pth", None)]

    server.close()  # the second call needs no network
    proc = convert(tmp_path / "again.pkl")
    assert proc.returncode == 0, proc.stderr
    assert "using the cached" in proc.stderr and len(server.requests) == 1

    model = build_resnest("resnest14d")  # load_weights takes the name too (from the cache)
    load_weights(model, "resnest14d")
    assert torch.equal(model.state_dict()["layer2.0.conv2.fc2.weight"], state["layer2.0.conv2.fc2.weight"])


def test_wrong_hash_is_refused_deleted_and_never_read(server, table, weights, tmp_path, capsys):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    server.files["/r14.pth"] = pickle.dumps({"conv1.0.weight": Payload()})  # would run if unpickled
    cached = table([server.url + "/r14.pth"])
    out = tmp_path / "out" / "r14.pkl"
    assert convert_main(["resnest14d", str(out)]) == 2
    err = capsys.readouterr().err
    assert "every source of the published weights failed" in err
    assert f"{server.url}/r14.pth: wrong file: sha256 " in err and "does not match" in err and "deleted" in err
    assert not marker.exists() and not out.parent.exists()
    assert os.listdir(cached.parent) == [cached.name + ".lock"]  # no .part, no file

    server.files["/r14.pth"] = weights[1][:-1] + bytes([weights[1][-1] ^ 1])  # one bit changed: refused too
    with pytest.raises(WeightsUnavailable, match="wrong file"):
        fetch_weights("resnest14d", progress=False, log=lambda _: None)
    assert os.listdir(cached.parent) == [cached.name + ".lock"]


def test_cached_file_that_no_longer_matches_is_downloaded_again(server, table, weights):
    server.files["/r14.pth"] = weights[1]
    cached = table([server.url + "/r14.pth"])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    assert fetch_weights("resnest14d", progress=False, log=lambda _: None) == str(cached)
    assert sha256_of(cached) == weights[2] and len(server.requests) == 1


def test_dead_and_missing_sources_are_skipped(server, table, weights):
    server.files["/good.pth"] = weights[1]
    table([dead_url(), server.url + "/gone.pth", server.url + "/good.pth"])
    said = []
    path = fetch_weights("resnest14d", progress=False, log=said.append)
    assert sha256_of(path) == weights[2]
    assert [p for p, _ in server.requests] == ["/gone.pth", "/good.pth"]
    assert any("full sha256" in line and "verified" in line for line in said)


def test_interrupted_download_resumes_with_range(server, table, weights):
    data, digest = weights[1], weights[2]
    server.files["/r14.pth"] = data
    server.cut.add("/r14.pth")
    cached = table([server.url + "/r14.pth"])
    said = []
    assert sha256_of(fetch_weights("resnest14d", progress=True, log=said.append)) == digest
    half = len(data) // 2
    assert server.requests == [("/r14.pth", None), ("/r14.pth", f"bytes={half}-")]
    assert any("resuming" in line for line in said)

    # A .part left by a killed process: the next call asks only for the rest.
    os.remove(cached)
    cached.with_name(cached.name + ".part").write_bytes(data[:1000])
    server.requests.clear()
    assert sha256_of(fetch_weights("resnest14d", progress=False, log=lambda _: None)) == digest
    assert server.requests == [("/r14.pth", "bytes=1000-")]

    # A stale .part of other bytes: the resumed file does not match, so it is fetched again from scratch.
    os.remove(cached)
    cached.with_name(cached.name + ".part").write_bytes(b"x" * 1000)
    server.requests.clear()
    assert sha256_of(fetch_weights("resnest14d", progress=False, log=lambda _: None)) == digest
    assert server.requests == [("/r14.pth", "bytes=1000-"), ("/r14.pth", None)]


def test_offline_message(table, tmp_path, capsys):
    cached = table([dead_url("/a.pth"), dead_url("/b.pth")])
    out = tmp_path / "r14.pkl"
    assert convert_main(["resnest14d", str(out), "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "looks offline" in err and err.count("connection refused") == 2
    assert "pass the file instead" in err and f"resnest-convert /path/to/{cached.name} OUT" in err
    assert not out.exists() and not cached.exists()


def test_names_and_files(table, tmp_path, capsys, weights, monkeypatch):
    # A name that is neither a file nor a variant: the known names are listed, nothing is fetched.
    assert convert_main(["resnest51", str(tmp_path / "o.pkl")]) == 2
    assert "not a name of published weights" in capsys.readouterr().err
    # An existing file of that name wins over the table (no network is tried).
    table([dead_url()])
    torch.save(weights[0], tmp_path / "resnest14d")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_weights(build_resnest("resnest14d"), "resnest14d")
    # An existing output is refused before anything is downloaded.
    (tmp_path / "exists.pkl").write_bytes(b"x")
    assert convert_main(["resnest26d", str(tmp_path / "exists.pkl")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_mm_init_cfg_by_name(server, table, weights):
    require("mmengine", "make env installs the OpenMMLab stack")
    require("mmdet", "make env installs mmdet==3.3.0")
    from resnest_backbone.mm import ResNeStSA

    server.files["/r14.pth"] = weights[1]
    table([server.url + "/r14.pth"])
    backbone = ResNeStSA(variant="resnest14d", init_cfg=dict(type="Pretrained", checkpoint="resnest14d"))
    backbone.init_weights()
    assert backbone.load_report.complete
    assert torch.equal(backbone.state_dict()["layer3.0.conv2.fc1.weight"], weights[0]["layer3.0.conv2.fc1.weight"])
    with pytest.raises(CheckpointError, match="not a name of published weights"):
        ResNeStSA(variant="resnest14d", init_cfg=dict(type="Pretrained", checkpoint="resnest51")).init_weights()


@pytest.mark.d2
def test_detectron2_model_weights_by_name(server, table, weights):
    require("detectron2", "make env installs detectron2")
    from detectron2.modeling import build_model

    from conftest import d2_cfg
    from resnest_backbone.d2 import SafeDetectionCheckpointer

    server.files["/r14.pth"] = weights[1]
    table([server.url + "/r14.pth"])
    cfg = d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest14d", "MODEL.FPN.OUT_CHANNELS": 32,
                    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
                    "MODEL.ROI_HEADS.NUM_CLASSES": 3, "MODEL.WEIGHTS": "resnest14d"})
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    trunk = model.backbone.bottom_up
    assert torch.equal(trunk.layer2[0].conv2.fc2.weight, weights[0]["layer2.0.conv2.fc2.weight"])
    assert torch.equal(trunk.bn1.running_var, weights[0]["bn1.running_var"])
    # A d2 model of another variant refuses the file by name evidence and shapes: nothing loaded.
    other = build_model(d2_cfg(**{"MODEL.RESNEST.VARIANT": "resnest26d", "MODEL.FPN.OUT_CHANNELS": 32,
                                  "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 32}))
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        SafeDetectionCheckpointer(other).load("resnest14d")
