"""Download one source distribution from the package index pip is configured to use, and check its sha256.

Why not `pip download`: pip refuses pb1-detectron2's metadata (its `all` extra names a direct URL,
"Distributions from PyPI cannot declare direct URL dependencies"), even with --no-deps. The simple index
(PEP 503) gives the file's URL and hash, which is all we need.

The index is pip's own: PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, else `pip config` (index-url, extra-index-url),
else pip's built-in default. The project names no registry host.

Usage: python fetch_sdist.py NAME VERSION DEST_DIR   -> prints the path of the verified .tar.gz
"""
import hashlib
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request


def _pip_config() -> dict:
    """`pip config list` as {key: value} (keys like global.index-url; the last definition wins)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")
    return values


def index_urls() -> list:
    """The simple-index URLs pip would search, main index first."""
    config = _pip_config()

    def setting(name):
        for key in (f":env:.{name}", f"download.{name}", f"install.{name}", f"global.{name}"):
            if config.get(key):
                return config[key]
        return None

    main = setting("index-url")
    if not main:
        from pip._internal.models.index import PyPI  # pip's built-in default index

        main = PyPI.simple_url
    extra = (setting("extra-index-url") or "").split()
    return [url.rstrip("/") for url in [main, *extra] if url.startswith(("http://", "https://"))]


def fetch_sdist(name: str, version: str, dest: str) -> str:
    filename = f"{name}-{version}.tar.gz"
    path = os.path.join(dest, filename)
    tried = []
    for index in index_urls():
        try:
            page = urllib.request.urlopen(f"{index}/{name}/", timeout=120).read().decode()
        except (urllib.error.URLError, OSError) as exc:
            tried.append(f"{index} ({exc})")
            continue
        match = re.search(r'href="([^"#]*/' + re.escape(filename) + r')#sha256=([0-9a-f]{64})"', page)
        if not match:
            tried.append(f"{index} (not listed)")
            continue
        url, sha256 = match.groups()
        url = urllib.parse.urljoin(f"{index}/{name}/", url)
        if os.path.exists(path) and hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256:
            return path
        data = urllib.request.urlopen(url, timeout=600).read()
        if hashlib.sha256(data).hexdigest() != sha256:
            sys.exit(f"fetch_sdist: sha256 mismatch for {url}")
        os.makedirs(dest, exist_ok=True)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path
    sys.exit(f"fetch_sdist: {filename} not found; tried: {'; '.join(tried) or 'no http(s) index configured'}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(fetch_sdist(*sys.argv[1:4]))
