#!/usr/bin/env bash
# Create / update the project's virtual environments. Idempotent: a second run on the same machine only
# checks stamps and imports, so it takes seconds.
#
#   bash tools/env/setup_env.sh                  # everything: what `make env` and `make test` run
#   RESNEST_ENV=d2 bash tools/env/setup_env.sh   # the detectron2 half only: what `make demo` runs
#                                                # (RESNEST_SKIP_MM=1 means the same)
#
# Parts (rough times on a fresh 2-core machine; a warm wheel cache makes the builds a few seconds):
#   d2    .venv: torch==2.14.1 torchvision==0.29.1 (1 min), detectron2 v0.6 (kept if it is a user's own
#         install; else built from the PyPI sdist pb1-detectron2==0.6 patched by tools/env/patch_sdists.py,
#         under a minute), fvcore, pycocotools, opencv, this project (editable) with its test extras
#   mm    .venv: mmcv 2.1.0 with compiled CPU ops (8-20 min the first time: the one long step), mmengine,
#         mmdet 3.3.0, mmsegmentation 1.2.2, ftfy, regex
#   lane  .venv-d2main: the second detectron2 line, upstream main as re-packaged in sal-detectron2==0.7.2 (its
#         Python sources: the cp310 wheel's compiled _C is left out), with its numpy<2, on top of .venv's
#         packages (a .pth file adds .venv's site-packages after its own). Seconds.
# Upstream detectron2's own tools/ (train_net.py, lazyconfig_train_net.py, ...) are kept unmodified beside
# each line, in .venv/detectron2-tools and .venv-d2main/detectron2-tools, for the tests that run them.
# Wheels we build from sdists are kept in $RESNEST_WHEEL_CACHE under the torch version and a digest of
# their patches (pip's own wheel cache ignores both, so it could reuse a wheel built for something else).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON_BOOTSTRAP="${PYTHON:-python3}"
VENV="$ROOT/.venv"
LANE="$ROOT/.venv-d2main"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
TORCH_TAG="torch-2.14.1"
SAL=(sal-detectron2 0.7.2)
CACHE="${RESNEST_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/resnest-backbone}"
WHEELS="$CACHE/wheels/$TORCH_TAG"
PARTS="${RESNEST_ENV:-all}"
[ "${RESNEST_SKIP_MM:-0}" = "1" ] && PARTS=d2
case "$PARTS" in
  d2) WANT=(d2) ;;
  all) WANT=(d2 mm lane) ;;
  *) echo "setup_env: RESNEST_ENV must be d2 or all, not '$PARTS'" >&2; exit 2 ;;
esac
START=$(date +%s)

log() { printf '[setup_env %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - START))" "$*"; }
wants() { [[ " ${WANT[*]} " == *" $1 "* ]]; }

# A part is up to date when its stamp records the current inputs and its imports work.
stamp_inputs() {
  cat tools/env/setup_env.sh tools/env/patch_sdists.py tools/env/fetch_sdist.py setup.py
  echo "part=$1"
}
stamp_file() { echo "$VENV/.resnest-env-stamp-$1"; }
import_check() {
  case "$1" in
    d2) "$PY" -c "import torch, torchvision, fvcore, pycocotools, panopticapi.evaluation, detectron2.engine, resnest_backbone.d2" ;;
    mm) "$PY" -c "import mmcv.ops, mmengine, mmdet, mmseg" ;;
    lane) "$LANE/bin/python" -c "import detectron2.engine, numpy, onnx, onnxruntime, resnest_backbone.d2
assert detectron2.__version__ == '${SAL[1]}' and numpy.__version__ < '2', (detectron2.__version__, numpy.__version__)" ;;
  esac
}
up_to_date() {
  [ -f "$(stamp_file "$1")" ] && [ "$(stamp_inputs "$1" | sha256sum)" = "$(cat "$(stamp_file "$1")")" ] \
    && import_check "$1" 2>/dev/null
}
todo=()
for part in "${WANT[@]}"; do up_to_date "$part" || todo+=("$part"); done
if [ ${#todo[@]} -eq 0 ]; then
  log "environment is up to date (${WANT[*]}: $VENV$(wants lane && echo ", $LANE"))"
  exit 0
fi
log "setting up: ${todo[*]} (the first time on a fresh machine: d2 ~2 min, mm 8-20 min, lane seconds)"

if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$PYTHON_BOOTSTRAP" -m venv "$VENV"
fi
"${PIP[@]}" install -q --upgrade pip
# setuptools<81: detectron2 v0.6 and mmcv 2.1.0 build scripts use pkg_resources (removed in 81).
log "installing torch, torchvision (5-6 GB when not cached: 1-2 min)"
"${PIP[@]}" install -q "setuptools>=77.0.3,<81" wheel ninja "${TORCH_PINS[@]}"

# Build a wheel from a patched PyPI sdist once per torch version and patch digest; later runs install the
# cached wheel.   build_wheel NAME VERSION PATCH_TARGET [ENV=VALUE ...]   (prints nothing; sets $wheel)
build_wheel() {
  local name="$1" version="$2" patch="$3"; shift 3
  local dist="${name//-/_}" key dir
  key=$("$PY" tools/env/patch_sdists.py key "$patch")
  dir="$WHEELS/$name-$version-patches-$key"
  wheel=$(ls "$dir"/"$dist"-"$version"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    local work sdist
    work=$(mktemp -d)
    log "building $name $version from its sdist (patched: tools/env/patch_sdists.py $patch, digest $key)"
    sdist=$("$PY" tools/env/fetch_sdist.py "$name" "$version" "$CACHE/sdists")
    tar -xzf "$sdist" -C "$work"
    "$PY" tools/env/patch_sdists.py "$patch" "$work/$name-$version"
    # --no-build-isolation: build against the torch installed above (the ops link to it), with our
    # setuptools<81; an isolated build would fetch the newest torch and setuptools.
    env "$@" "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$work/out" "$work/$name-$version"
    mkdir -p "$WHEELS"
    find "$WHEELS" -maxdepth 1 -name "$name-$version-patches-*" -exec rm -rf {} +  # builds of older patches
    mkdir -p "$dir"
    mv "$work"/out/*.whl "$dir/"
    rm -rf "$work"
    wheel=$(ls "$dir"/"$dist"-"$version"-*.whl | head -n1)
    log "built $(basename "$wheel")"
  fi
}

# Upstream's tools/ from the archive the line was installed from, unmodified; SOURCE names the archive and its
# sha256 (tests/test_upstream_tools.py compares the files with it).   keep_tools ARCHIVE(.tar.gz|.whl) DEST
keep_tools() {
  local work
  work=$(mktemp -d)
  case "$1" in
    *.whl) "$PY" -m zipfile -e "$1" "$work/x" ;;
    *) mkdir "$work/x" && tar -xzf "$1" -C "$work/x" ;;
  esac
  rm -rf "$2" && mkdir -p "$2"
  cp "$(dirname "$(find "$work/x" -path '*/tools/train_net.py' | head -n1)")"/*.py "$2"/
  echo "$1 $(sha256sum "$1" | cut -d' ' -f1)" > "$2/SOURCE"
  rm -rf "$work"
}

if wants d2; then
  # detectron2: keep a user's own install (with its C++ extension it is better than ours); replace our own
  # build (distribution pb1-detectron2) when its patches changed.
  if "$PY" -c "import detectron2" 2>/dev/null && ! "$PY" -m pip show -q pb1-detectron2 >/dev/null 2>&1; then
    log "detectron2 already importable (not this project's build): keeping it"
  else
    build_wheel pb1-detectron2 0.6 detectron2
    log "installing $(basename "$wheel")"
    "${PIP[@]}" install -q "$wheel"  # with its dependencies (cloudpickle, omegaconf, hydra-core, ...)
    "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"  # replaces an older build of the same version
    sdist="$CACHE/sdists/pb1-detectron2-0.6.tar.gz"  # verified when downloaded (build_wheel)
    [ -f "$sdist" ] || sdist=$("$PY" tools/env/fetch_sdist.py pb1-detectron2 0.6 "$CACHE/sdists")
    keep_tools "$sdist" "$VENV/detectron2-tools"
  fi
  log "installing fvcore, pycocotools, opencv, matplotlib, this project and its test extras"
  "${PIP[@]}" install -q fvcore pycocotools opencv-python-headless matplotlib tqdm
  # PQ for Panoptic FPN (detectron2's COCOPanopticEvaluator imports panopticapi.evaluation, which needs only
  # numpy and Pillow); --no-deps: the wheel pins numpy<2 and scikit-image, which would downgrade .venv's numpy
  "${PIP[@]}" install -q --no-deps panopticapi-lite==0.2.0
  "${PIP[@]}" install -q -e ".[test]"
  import_check d2
  stamp_inputs d2 | sha256sum > "$(stamp_file d2)"
fi

if wants mm; then
  if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__.startswith('2.1')" 2>/dev/null; then
    log "mmcv 2.1 with ops already importable: keeping it"
  else
    "${PIP[@]}" install -q "mmengine>=0.10,<1" addict yapf packaging pyyaml pillow
    key=$("$PY" tools/env/patch_sdists.py key mmcv)
    if ! ls "$WHEELS/mmcv-2.1.0-patches-$key"/mmcv-*.whl >/dev/null 2>&1; then
      log "mmcv 2.1.0 with CPU ops: compiling its C++ ops takes 8-20 minutes on 2 cores (once per machine)"
    fi
    build_wheel mmcv 2.1.0 mmcv MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    log "installing $(basename "$wheel")"
    "${PIP[@]}" install -q "$wheel"
  fi
  # mmseg imports ftfy and regex without declaring them; both mmdet 3.3 and mmseg 1.2 need mmcv<2.2.
  log "installing mmengine, mmdet 3.3.0, mmsegmentation 1.2.2"
  "${PIP[@]}" install -q "mmengine>=0.10,<1" mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex
  import_check mm
  stamp_inputs mm | sha256sum > "$(stamp_file mm)"
fi

if wants lane; then
  log "second detectron2 line: ${SAL[0]}==${SAL[1]} (upstream main, 2024) in $LANE"
  rm -rf "$LANE"
  "$PYTHON_BOOTSTRAP" -m venv --without-pip "$LANE"
  site=$("$LANE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  main_site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # Its own packages first, then everything of .venv (site.addsitedir also runs .venv's .pth files, e.g. the
  # editable install of this project).
  echo "import site; site.addsitedir('$main_site')" > "$site/zz_resnest_main_venv.pth"
  # The wheel is tagged cp310; only its Python sources are used (see above), so fetch it for that tag.
  mkdir -p "$CACHE/lane"
  whl=$(ls "$CACHE/lane"/sal_detectron2-"${SAL[1]}"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    "${PIP[@]}" download -q --no-deps --python-version 3.10 --only-binary=:all: -d "$CACHE/lane" \
      "${SAL[0]}==${SAL[1]}"
    whl=$(ls "$CACHE/lane"/sal_detectron2-"${SAL[1]}"-*.whl | head -n1)
  fi
  work=$(mktemp -d)
  "$PY" -m zipfile -e "$whl" "$work"
  rm -f "$work"/detectron2/_C*.so  # built for CPython 3.10: cannot load here; main runs without it
  mv "$work/detectron2" "$work"/sal_detectron2-*.dist-info "$site/"
  rm -rf "$work"
  keep_tools "$whl" "$LANE/detectron2-tools"
  # sal-detectron2 declares numpy<2 (its SemSegEvaluator calls np.array(..., copy=False)). --target installs
  # into the lane only; pip run by the lane's python would uninstall .venv's numpy 2. ml_dtypes (onnx needs
  # >=0.5.4) from 0.7.0 is built for numpy 2 only ("compiled against NumPy C-API version 0x12"): the lane gets
  # one that imports with numpy 1 (0.6.0 measured), so `import onnx` works there (import_check).
  "${PIP[@]}" install -q --no-deps --target "$site" "numpy<2" "ml_dtypes>=0.5.4,<0.7"
  import_check lane
  stamp_inputs lane | sha256sum > "$(stamp_file lane)"
fi

log "environment ready: ${WANT[*]} ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
