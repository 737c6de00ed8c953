"""The published ImageNet weights by variant name: a table of sources, a verified download, a cache.

    path = fetch_weights("resnest50")          # downloaded once, sha256-checked, then read from the cache
    path, variant = resolve_checkpoint(x)      # an existing file stays itself; a known name becomes its file

What is checked. Every published file name carries the first 8 hex digits of the file's sha256 (torch.hub's
`check_hash` convention: the official release files, and timm's, whose `clean_checkpoint.py` names files the
same way). Where only that prefix is published (every built-in entry today: no full sha256 of these files
is published that we could read), the download is checked against the prefix: that catches a wrong,
truncated, corrupted or replaced-by-an-error-page file, but 32 bits cannot stop a file crafted on purpose
to match. An entry with a full sha256 (64 hex digits; from RESNEST_WEIGHTS_SOURCES, or pinned here once
one is published) is checked in full. Either way a download is only renamed into place after its hash
matches, and the file is then read like any other by the weights-only reader (io.py), which never runs
anything in it.

How. Sources are tried in order (mirrors from RESNEST_WEIGHTS_MIRROR first). Each download goes to
`<cache>/<variant>/<file>.part` with a progress bar (tqdm, when installed, on a terminal), resumes a
`.part` left by an interrupted download with an HTTP Range request, is hashed, and renamed to `<file>`
only when the hash matches (otherwise deleted). A lock file keeps parallel processes (e.g. every rank of
a multi-GPU run) from downloading the same file at once. When every source fails, the error lists each
source and why; when none could be reached at all, it says the machine looks offline and how to pass a
local file.

Environment:
    RESNEST_CACHE              cache folder (default: $XDG_CACHE_HOME or ~/.cache, + resnest-backbone/weights)
    RESNEST_WEIGHTS_MIRROR     base URL(s), space- or comma-separated, tried first: <base>/<file>
    RESNEST_WEIGHTS_SOURCES    a JSON file replacing table entries:
                               {"resnest50": {"file": "resnest50-528c19ca.pth", "sha256": "<8 to 64 hex>",
                                              "urls": ["https://...", ...]}}
"""
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from ..core.variants import ALIASES, VARIANTS, get_variant
from .io import _EXTENSIONS, CheckpointError, _fsync_folder

CACHE_ENV, MIRROR_ENV, SOURCES_ENV = "RESNEST_CACHE", "RESNEST_WEIGHTS_MIRROR", "RESNEST_WEIGHTS_SOURCES"
TIMEOUT = 30.0  # seconds without a byte (connect or read) before a source counts as failed
MAX_BYTES = 2 << 30  # the largest published file (resnest269) is ~0.45 GB; refuse a server sending more
RESUMES = 5  # resumes of one source within one call, each after progress


@dataclass(frozen=True)
class Weights:
    name: str  # the variant the file holds (also its cache folder)
    file: str  # the published file name (kept in the cache: it names the variant for the loaders)
    sha256: str  # the full sha256 (64 hex) or the published prefix (8 hex)
    urls: Tuple[str, ...]
    provenance: str

    @property
    def full_hash(self) -> bool:
        return len(self.sha256) == 64


# ------------------------------------------------------------------------------------------------ the table
# Provenance (read 2026-11 from the public sources; the URLs were not reachable from the machine this was
# written on, so they are as published, not as tested):
# - official: zhanghang1989/ResNeSt `resnest/torch/models/resnest.py` and `ablation.py`: `_model_sha256`
#   holds the 8-hex sha256 prefixes, `_url_format` the host: GitHub release `weights_step1` (current),
#   before it `s3.us-west-1.wasabisys.com/resnest/torch/` (resnest==0.0.5 and older forks), before that
#   `hangzh.s3.amazonaws.com/encoding/models/` (gone: official issues 94, 131, 152-154, 183; not listed).
# - timm: `timm/models/resnest.py` default_cfgs before the Hugging Face hub move: release `v0.1-resnest`
#   re-hosts the official resnest50/101/200/269 and fast_4s2x40d/fast_1s4x24d files under the same names
#   and hashes; release `v0.1-weights` holds resnest14d/26d ported from GluonCV (gluon_resnest14/26).
#   timm's hub copies (timm/resnest50d.in1k model.safetensors) are re-saved files with no published hash
#   here: not listed (pin one with RESNEST_WEIGHTS_SOURCES).
_GITHUB = "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/"
_WASABI = "https://s3.us-west-1.wasabisys.com/resnest/torch/"
_TIMM_RESNEST = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-resnest/"
_TIMM_GLUON = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
_OFFICIAL = "official ResNeSt release (resnest/torch/models/{}.py _model_sha256: 8-hex sha256 prefix)"
_TIMM = "timm default_cfgs (v0.1-weights, GluonCV port; 8-hex sha256 prefix in the file name)"


def _official(name: str, short: str, module: str, timm: bool) -> Weights:
    file = f"{name}-{short}.pth"
    urls = (_GITHUB + file, _WASABI + file) + ((_TIMM_RESNEST + file,) if timm else ())
    return Weights(name, file, short, urls, _OFFICIAL.format(module) + ("; also re-hosted by timm v0.1-resnest"
                                                                       if timm else ""))


_BUILTIN: Dict[str, Weights] = {w.name: w for w in (
    Weights("resnest14d", "gluon_resnest14-9c8fe254.pth", "9c8fe254", (_TIMM_GLUON + "gluon_resnest14-9c8fe254.pth",),
            _TIMM),
    Weights("resnest26d", "gluon_resnest26-50eb607c.pth", "50eb607c", (_TIMM_GLUON + "gluon_resnest26-50eb607c.pth",),
            _TIMM),
    _official("resnest50", "528c19ca", "resnest", True),
    _official("resnest101", "22405ba7", "resnest", True),
    _official("resnest200", "75117900", "resnest", True),
    _official("resnest269", "0cc87c48", "resnest", True),
    _official("resnest50_fast_1s1x64d", "d8fbf808", "ablation", False),
    _official("resnest50_fast_2s1x64d", "44938639", "ablation", False),
    _official("resnest50_fast_4s1x64d", "f74f3fc3", "ablation", False),
    _official("resnest50_fast_1s2x40d", "32830b84", "ablation", False),
    _official("resnest50_fast_2s2x40d", "9d126481", "ablation", False),
    _official("resnest50_fast_4s2x40d", "41d14ed0", "ablation", True),
    _official("resnest50_fast_1s4x24d", "d4a4f76f", "ablation", True),
)}
# timm's names for two ablation architectures: the same files (the variant rows are identical).
_SAME_FILE = {"resnest50d_4s2x40d": "resnest50_fast_4s2x40d", "resnest50d_1s4x24d": "resnest50_fast_1s4x24d"}


def weights_table() -> Dict[str, Weights]:
    """The table in use: built-in entries, replaced by those in RESNEST_WEIGHTS_SOURCES."""
    table = dict(_BUILTIN)
    table.update({alias: table[name] for alias, name in _SAME_FILE.items()})
    path = os.environ.get(SOURCES_ENV)
    if path:
        table.update(_read_sources(path))
    return table


_EXAMPLE = '{"resnest50": {"file": "resnest50-528c19ca.pth", "sha256": "<8 to 64 hex>", "urls": ["https://..."]}}'


def _read_sources(path: str) -> Dict[str, Weights]:
    def bad(why):
        return CheckpointError(f"{SOURCES_ENV}={path}: {why}; expected " + _EXAMPLE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise bad(f"cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise bad("not a JSON object")
    out = {}
    for name, entry in data.items():
        key = _canonical(name)
        if key not in VARIANTS:
            raise bad(f"{name!r} is not a variant (known: {', '.join(sorted(VARIANTS))})")
        if not isinstance(entry, dict):
            raise bad(f"{name}: not an object")
        file, digest, urls = entry.get("file"), str(entry.get("sha256", "")).lower(), entry.get("urls")
        if not isinstance(file, str) or not file or os.path.basename(file) != file or file.startswith("."):
            raise bad(f"{name}: 'file' must be a plain file name")
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise bad(f"{name}: 'sha256' must be 8 to 64 hex digits (a prefix or the full hash)")
        if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                 for u in urls):
            raise bad(f"{name}: 'urls' must be a list of http(s) URLs")
        out[key] = Weights(key, file, digest, tuple(urls), f"{SOURCES_ENV} ({path})")
    return out


def _canonical(name: str) -> str:
    return ALIASES.get(name.lower(), name.lower())


def known_names() -> List[str]:
    return sorted(set(weights_table()) | set(ALIASES))


def weights_entry(name: str) -> Weights:
    """The table entry for a variant name (aliases such as resnest50d accepted); ValueError listing the
    known names otherwise."""
    table = weights_table()
    key = _canonical(name)
    if key not in table:
        get_variant(name)  # not a variant at all: its message lists them
        raise ValueError(f"no published weights are listed for {name!r}; listed: {', '.join(known_names())}")
    return table[key]


def looks_like_name(text: str) -> bool:
    """A bare word such as `resnest50` (no folder, no URL, no checkpoint extension): a candidate name."""
    ext = os.path.splitext(text.lower())[1]
    return bool(text) and "/" not in text and os.sep not in text and ":" not in text and ext not in _EXTENSIONS


def resolve_checkpoint(checkpoint, strict: bool = False, **fetch_kwargs) -> Tuple[str, Optional[str]]:
    """(local file, variant) for a checkpoint argument: an existing path (or anything that does not look like
    a name) is returned as it is with variant None; a listed variant name is fetched (fetch_weights) and
    returned with its canonical variant. strict: a name that is not listed raises CheckpointError naming
    the known ones (otherwise it is returned unchanged for the caller's own 'no such file')."""
    text = os.fspath(checkpoint)
    if os.path.exists(text) or not looks_like_name(text):
        return text, None
    try:
        weights_entry(text)
    except ValueError as exc:
        if not strict:
            return text, None
        raise CheckpointError(f"{text}: no such file, and not a name of published weights: {exc}") from None
    return fetch_weights(text, **fetch_kwargs), _canonical(text)


# --------------------------------------------------------------------------------------------- the download
class WeightsUnavailable(CheckpointError):
    """No source gave a file with the expected hash (each source's reason is in the message)."""


class _SourceFailed(Exception):
    def __init__(self, why: str, offline: bool = False):
        super().__init__(why)
        self.offline = offline


def default_cache_dir() -> str:
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnest-backbone", "weights")


def cached_path(name: str, cache_dir: Optional[str] = None) -> str:
    entry = weights_entry(name)
    return os.path.join(cache_dir or default_cache_dir(), entry.name, entry.file)


def hash_matches(digest: str, expected: str) -> bool:
    return digest.startswith(expected.lower())


def describe_check(entry: Weights) -> str:
    return (f"full sha256 {entry.sha256}" if entry.full_hash else
            f"sha256 prefix {entry.sha256} (the published {len(entry.sha256)} hex digits; no full hash is "
            "published)")


def fetch_weights(name: str, cache_dir: Optional[str] = None, progress: Optional[bool] = None,
                  timeout: float = TIMEOUT, log=None) -> str:
    """The local path of the verified published weights for `name`, downloading them when not cached.
    progress: a tqdm bar (None: when stderr is a terminal). Raises WeightsUnavailable (every source
    failed; offline named as such) or CheckpointError."""
    say = log or (lambda text: print(f"resnest-backbone: {text}", file=sys.stderr, flush=True))
    entry = weights_entry(name)
    final = cached_path(name, cache_dir)
    folder = os.path.dirname(final)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the weights cache {folder} ({exc.strerror}); set {CACHE_ENV} to a "
                              "writable folder") from None
    with _locked(final + ".lock"):
        if os.path.isfile(final):
            digest = sha256_of(final)
            if hash_matches(digest, entry.sha256):
                say(f"{name}: using the cached {final} ({describe_check(entry)} verified)")
                return final
            os.remove(final)
            say(f"{name}: the cached {final} has sha256 {digest}, not {entry.sha256}: deleted, downloading again")
        part = final + ".part"
        failures: List[Tuple[str, str, bool]] = []
        for url in _urls(entry):
            for fresh in (False, True):  # a mismatch after resuming an old .part: once more from scratch
                resumed = os.path.exists(part) and not fresh
                try:
                    _download(url, part, timeout, progress, say)
                except _SourceFailed as exc:
                    failures.append((url, str(exc), exc.offline))
                    break
                digest = sha256_of(part)
                if hash_matches(digest, entry.sha256):
                    os.replace(part, final)
                    _fsync_folder(folder)
                    say(f"{name}: {describe_check(entry)} verified; saved {final}")
                    return final
                os.remove(part)
                if not resumed:
                    failures.append((url, f"wrong file: sha256 {digest} does not match {entry.sha256}; deleted",
                                     False))
                    break
                say(f"{name}: the resumed download from {url} does not match; downloading it again")
    raise _unavailable(name, entry, final, failures)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _urls(entry: Weights) -> List[str]:
    mirrors = [m for m in re.split(r"[,\s]+", os.environ.get(MIRROR_ENV, "")) if m]
    return [m.rstrip("/") + "/" + entry.file for m in mirrors] + list(entry.urls)


def _download(url: str, part: str, timeout: float, progress: Optional[bool], say) -> None:
    """Download `url` into `part`, resuming what is there; _SourceFailed when the source cannot give it."""
    from .. import __version__

    if not url.startswith(("http://", "https://")):
        raise _SourceFailed("not an http(s) URL")
    resumes = 0
    while True:
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": f"resnest-backbone/{__version__}", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                return  # nothing left to send: the .part may be whole; the hash decides
            raise _SourceFailed(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise _SourceFailed(_why(exc.reason), _offline(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _SourceFailed(_why(exc), _offline(exc)) from None
        with response:
            if offset and response.status == 206 and _range_start(response) == offset:
                mode, start = "ab", offset
                say(f"resuming {url} at {offset} bytes")
            elif response.status == 200:
                mode, start = "wb", 0  # a fresh download, or the server ignored the Range: start over
                say(f"downloading {url}")
            else:
                raise _SourceFailed(f"unexpected HTTP {response.status} for a request from byte {offset}")
            length = response.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            if total is not None and total > MAX_BYTES:
                raise _SourceFailed(f"announces {total} bytes, more than any published ResNeSt file")
            received = 0
            try:
                with open(part, mode) as out, _bar(progress, total, start, os.path.basename(part)[:-5]) as bar:
                    while True:
                        block = response.read(1 << 20)
                        if not block:
                            break
                        if start + received + len(block) > MAX_BYTES:
                            raise _SourceFailed(f"sent more than {MAX_BYTES} bytes; stopped")
                        out.write(block)
                        received += len(block)
                        bar.update(len(block))
                    out.flush()
                    os.fsync(out.fileno())
                interrupted = None if total is None or start + received >= total else \
                    f"the connection closed at {start + received} of {total} bytes"
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                interrupted = f"interrupted at {start + received} bytes ({_why(exc)})"
        if interrupted is None:
            return
        if received == 0 or resumes >= RESUMES:
            raise _SourceFailed(f"{interrupted}; the partial file is kept to resume next time")
        resumes += 1
        say(f"{url}: {interrupted}; resuming")


def _range_start(response) -> Optional[int]:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _bar(progress: Optional[bool], total: Optional[int], initial: int, desc: str):
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (not a core requirement): no bar then
        progress = False
    if not progress:
        return contextlib.nullcontext(_NoBar())

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, leave=False)


class _NoBar:
    def update(self, n: int) -> None:
        pass


_OFFLINE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def _offline(reason) -> bool:
    """Nothing answered: connection refused, no route, name resolution failed, or no answer in time."""
    if isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionRefusedError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _OFFLINE_ERRNOS


def _why(reason) -> str:
    if isinstance(reason, socket.gaierror):
        return f"name resolution failed ({reason.strerror or reason})"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "no answer in time (timed out)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def _unavailable(name: str, entry: Weights, final: str, failures) -> WeightsUnavailable:
    listed = "\n".join(f"  {url}: {why}" for url, why, _ in failures)
    local = (f"download {entry.file} where the internet is reachable and pass the file instead (resnest-convert "
             f"/path/to/{entry.file} OUT; init_cfg checkpoint='/path/to/{entry.file}'; MODEL.WEIGHTS "
             f"/path/to/{entry.file}), or copy it to {final} (it is checked against {describe_check(entry)} "
             f"before use), or set {MIRROR_ENV} to a mirror")
    if failures and all(offline for _, _, offline in failures):
        return WeightsUnavailable(f"{name}: no source of the published weights could be reached: this machine "
                                  f"looks offline (or every host is blocked):\n{listed}\nTo use them offline, "
                                  f"{local}. Nothing was written.")
    return WeightsUnavailable(f"{name}: every source of the published weights failed:\n{listed}\nNothing was "
                              f"written. To go on, {local}.")


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


__all__ = ["CACHE_ENV", "MIRROR_ENV", "SOURCES_ENV", "Weights", "WeightsUnavailable", "cached_path",
           "default_cache_dir", "fetch_weights", "known_names", "looks_like_name", "resolve_checkpoint",
           "sha256_of", "weights_entry", "weights_table"]
