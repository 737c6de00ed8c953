"""Download one source distribution from the package index and check its sha256.

Why not `pip download`: pip refuses pb1-detectron2's metadata (its `all` extra names a direct URL,
"Distributions from PyPI cannot declare direct URL dependencies"), even with --no-deps. The simple index
(PEP 503) gives the file's URL and hash, which is all we need.

Usage: python fetch_sdist.py NAME VERSION DEST_DIR   -> prints the path of the verified .tar.gz
"""
import hashlib
import os
import re
import sys
import urllib.request

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def fetch_sdist(name: str, version: str, dest: str) -> str:
    filename = f"{name}-{version}.tar.gz"
    path = os.path.join(dest, filename)
    page = urllib.request.urlopen(f"{INDEX}/{name}/", timeout=120).read().decode()
    match = re.search(r'href="([^"#]*/' + re.escape(filename) + r')#sha256=([0-9a-f]{64})"', page)
    if not match:
        sys.exit(f"fetch_sdist: {filename} is not listed on {INDEX}/{name}/")
    url, sha256 = match.groups()
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


if __name__ == "__main__":
    print(fetch_sdist(*sys.argv[1:4]))
