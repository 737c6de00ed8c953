#!/usr/bin/env bash
# Create / update the project's virtual environment (.venv). Idempotent: a second run on the same machine
# only checks a stamp and imports, so it takes seconds.
#
#   bash tools/env/setup_env.sh            # what `make env` runs
#   RESNEST_SKIP_MM=1 bash tools/env/setup_env.sh   # detectron2 half only (no 25-40 min mmcv build)
#
# What it installs (see DEVELOPERS.md for why each pin):
#   torch==2.14.1 torchvision==0.29.1, "setuptools>=77.0.3,<81" wheel ninja
#   detectron2 v0.6 (kept if it already imports; else built from the PyPI sdist pb1-detectron2==0.6 with
#     tools/env/patch_sdists.py), fvcore, pycocotools, opencv-python-headless
#   mmcv 2.1.0 with compiled CPU ops (kept if mmcv.ops already imports; else built from the PyPI sdist),
#     mmengine, mmdet 3.3.0, mmsegmentation 1.2.2, ftfy, regex
#   this project, editable, with its extras
# Wheels we build from sdists are kept in $RESNEST_WHEEL_CACHE under a folder named after the torch version
# (pip's own wheel cache ignores the torch version, so a wheel built against another torch could be reused).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON_BOOTSTRAP="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
TORCH_TAG="torch-2.14.1"
CACHE="${RESNEST_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/resnest-backbone}"
WHEELS="$CACHE/wheels/$TORCH_TAG"
WANT_MM=$([ "${RESNEST_SKIP_MM:-0}" = "1" ] && echo 0 || echo 1)

log() { printf '[setup_env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The stamp records the inputs of the last successful run; when they are unchanged and everything still
# imports, there is nothing to do.
stamp_inputs() {
  cat tools/env/setup_env.sh tools/env/patch_sdists.py tools/env/fetch_sdist.py setup.py
  echo "mm=$WANT_MM"
}
STAMP="$VENV/.resnest-env-stamp"
IMPORT_CHECK="import torch, torchvision, detectron2, fvcore, pycocotools, resnest_backbone"
[ "$WANT_MM" = 1 ] && IMPORT_CHECK="$IMPORT_CHECK, mmcv.ops, mmengine, mmdet, mmseg"
if [ -f "$STAMP" ] && [ "$(stamp_inputs | sha256sum)" = "$(cat "$STAMP")" ] \
   && "$PY" -c "$IMPORT_CHECK" 2>/dev/null; then
  log "environment is up to date ($VENV)"
  exit 0
fi

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$PYTHON_BOOTSTRAP" -m venv "$VENV"
fi
"${PIP[@]}" install -q --upgrade pip
# setuptools<81: detectron2 v0.6 and mmcv 2.1.0 build scripts use pkg_resources (removed in 81).
"${PIP[@]}" install -q "setuptools>=77.0.3,<81" wheel ninja "${TORCH_PINS[@]}"

# Build a wheel from a patched PyPI sdist once per torch version; later runs install the cached wheel.
#   build_wheel NAME VERSION PATCH_TARGET [ENV=VALUE ...]
build_wheel() {
  local name="$1" version="$2" patch="$3"; shift 3
  local dist="${name//-/_}"
  local wheel
  wheel=$(ls "$WHEELS"/"$dist"-"$version"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    local work
    work=$(mktemp -d)
    log "building $name $version from its sdist (patched: tools/env/patch_sdists.py $patch)"
    local sdist
    sdist=$("$PY" tools/env/fetch_sdist.py "$name" "$version" "$CACHE/sdists")
    tar -xzf "$sdist" -C "$work"
    "$PY" tools/env/patch_sdists.py "$patch" "$work/$name-$version"
    mkdir -p "$WHEELS"
    # --no-build-isolation: build against the torch installed above (the ops link to it), with our
    # setuptools<81; an isolated build would fetch the newest torch and setuptools.
    env "$@" "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$work/out" "$work/$name-$version"
    wheel=$(ls "$work"/out/*.whl)
    mv "$wheel" "$WHEELS/"
    wheel="$WHEELS/$(basename "$wheel")"
    rm -rf "$work"
  fi
  "${PIP[@]}" install -q "$wheel"
}

# detectron2: keep a working install (a user's own build with its C++ extension is better than ours).
if "$PY" -c "import detectron2" 2>/dev/null; then
  log "detectron2 already importable: keeping it"
else
  build_wheel pb1-detectron2 0.6 detectron2
fi
"${PIP[@]}" install -q fvcore pycocotools opencv-python-headless matplotlib tqdm

if [ "$WANT_MM" = 1 ]; then
  if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__.startswith('2.1')" 2>/dev/null; then
    log "mmcv 2.1 with ops already importable: keeping it"
  else
    log "mmcv 2.1.0 with CPU ops: the first build takes 25-40 minutes on 2 cores"
    "${PIP[@]}" install -q "mmengine>=0.10,<1" addict yapf packaging pyyaml pillow
    build_wheel mmcv 2.1.0 mmcv MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  fi
  # mmseg imports ftfy and regex without declaring them; both mmdet 3.3 and mmseg 1.2 need mmcv<2.2.
  "${PIP[@]}" install -q "mmengine>=0.10,<1" mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex
fi

"${PIP[@]}" install -q -e ".[test]"

"$PY" -c "$IMPORT_CHECK"
stamp_inputs | sha256sum > "$STAMP"
log "environment ready: $VENV ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
