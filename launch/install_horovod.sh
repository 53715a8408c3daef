#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (TensorFlow + Gloo, MPI when mpicc exists) for a given Python.
#
# Usage: bash launch/install_horovod.sh [PYTHON]      (default: $PYTHON, else python3)
#
# Horovod 0.28.1 (its last release) does not build against TensorFlow 2.21 as released:
# horovod/tensorflow/xla_mpi_ops.cc includes XLA headers TF no longer ships. This script gets
# the sdist with pip, leaves that one source out of horovod/tensorflow/CMakeLists.txt and builds
# a wheel with --no-build-isolation against the TensorFlow already installed for PYTHON.
#
# Idempotent: does nothing when `PYTHON -c "import horovod.tensorflow"` works.
# Cache: the built wheel is kept in $PIPELINE_HOROVOD_CACHE (default ~/.cache/pipeline-horovod)
# under a key made of the TF version, the Python version and the MPI choice; a later run for
# the same key (e.g. CI in a fresh venv) installs that wheel in seconds instead of building.
# Set PIPELINE_HOROVOD_NO_CACHE=1 to always build from source.
set -euo pipefail

HVD_VERSION=0.28.1
PY="${1:-${PYTHON:-python3}}"

die() { echo "install_horovod: FAILED: $*" >&2; exit 1; }
say() { echo "install_horovod: $*" >&2; }

command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || die "python '$PY' not found"

if "$PY" -c "import horovod.tensorflow" >/dev/null 2>&1; then
  say "horovod.tensorflow already imports with $PY; nothing to do"
  exit 0
fi

TF_VERSION="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)" \
  || die "TensorFlow is not importable with $PY; install tensorflow first"
PY_TAG="$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])')"

if command -v mpicc >/dev/null 2>&1; then
  MPI_FLAG=(HOROVOD_WITH_MPI=1); MPI_KEY=mpi
else
  MPI_FLAG=(HOROVOD_WITHOUT_MPI=1); MPI_KEY=nompi
fi

CACHE_ROOT="${PIPELINE_HOROVOD_CACHE:-$HOME/.cache/pipeline-horovod}"
KEY="horovod-${HVD_VERSION}-tf${TF_VERSION}-${PY_TAG}-${MPI_KEY}"
CACHE_DIR="$CACHE_ROOT/$KEY"

# Runtime deps of horovod and build helpers needed with --no-build-isolation.
say "installing build/runtime helpers (packaging, wheel, setuptools, cloudpickle, psutil, pyyaml, cffi)"
"$PY" -m pip install --quiet packaging wheel "setuptools<81" cloudpickle psutil pyyaml cffi \
  || die "pip could not install build helpers"

install_wheel() {
  local whl="$1"
  say "installing cached wheel $whl"
  "$PY" -m pip install --quiet --no-deps --force-reinstall "$whl" || return 1
  "$PY" -c "import horovod, horovod.tensorflow as hvd; hvd.init(); print('horovod', horovod.__version__, 'imports; size', hvd.size())" >&2 || return 1
}

mkdir -p "$CACHE_ROOT"
# Serialise concurrent builds for the same key (several workers share this machine).
exec 9>"$CACHE_ROOT/$KEY.lock"
command -v flock >/dev/null 2>&1 && flock 9

if [ -z "${PIPELINE_HOROVOD_NO_CACHE:-}" ]; then
  WHL="$(ls "$CACHE_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)"
  if [ -n "$WHL" ]; then
    if install_wheel "$WHL"; then
      say "done (from cache $CACHE_DIR)"; exit 0
    fi
    say "cached wheel did not work; rebuilding from source"
    rm -f "$WHL"
  fi
fi

command -v cmake >/dev/null 2>&1 || die "cmake is required to build Horovod (apt-get install cmake or pip install cmake)"
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || die "a C++ compiler (g++) is required"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "building horovod $HVD_VERSION for TF $TF_VERSION ($PY_TAG, $MPI_KEY) in $WORK"

"$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$WORK" \
  || die "pip download of the horovod==$HVD_VERSION sdist failed (no registry access?)"
SDIST="$(ls "$WORK"/horovod-*.tar.gz | head -n1)"
[ -n "$SDIST" ] || die "no sdist downloaded"
tar -xzf "$SDIST" -C "$WORK" || die "could not unpack $SDIST"
SRC="$WORK/horovod-$HVD_VERSION"
CML="$SRC/horovod/tensorflow/CMakeLists.txt"
[ -f "$CML" ] || die "$CML not found in the sdist"

# Leave out the XLA op source: it includes XLA headers that TF 2.21 no longer ships.
sed -i -E 's#[^ ()"]*xla_mpi_ops\.cc##g' "$CML"
if grep -q 'xla_mpi_ops.cc' "$CML"; then die "could not remove xla_mpi_ops.cc from $CML"; fi
say "patched $CML (xla_mpi_ops.cc removed)"

mkdir -p "$CACHE_DIR"
say "compiling (about 10 minutes on 2 cores); full log follows"
env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 "${MPI_FLAG[@]}" \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$WORK/wheel" "$SRC" \
  || die "compiling horovod failed (see the compiler output above; needs cmake, g++, TF headers of $TF_VERSION)"
BUILT="$(ls "$WORK"/wheel/horovod-*.whl | head -n1)"
[ -n "$BUILT" ] || die "pip wheel produced no wheel"
cp "$BUILT" "$CACHE_DIR/.tmp.whl" && mv "$CACHE_DIR/.tmp.whl" "$CACHE_DIR/$(basename "$BUILT")"

"$PY" -m pip install --quiet --no-deps --force-reinstall "$BUILT" || die "installing the built wheel failed"
"$PY" -c "import horovod.tensorflow as hvd; hvd.init(); print('horovod.tensorflow ok, size', hvd.size())" >&2 \
  || die "horovod built but 'import horovod.tensorflow' fails (TF ABI mismatch?)"
say "done; wheel cached at $CACHE_DIR"
