#!/usr/bin/env bash
# Downloads the Liger-Kernel wheel (pure Python + Triton, ~1 MB) into benchmarks/wheels/ so that
# benchmarks/gpu_suite.sh can install it on a GPU machine without network access.
#
#   bash benchmarks/fetch_wheels.sh                 # latest release
#   LIGER_VERSION=0.8.5 bash benchmarks/fetch_wheels.sh
#
# Only wheels of at most 2 MB are meant to be committed; a larger download is reported and left uncommitted.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
SPEC="liger-kernel${LIGER_VERSION:+==$LIGER_VERSION}"
mkdir -p benchmarks/wheels
"$PY" -m pip download "$SPEC" --no-deps --only-binary=:all: --python-version 3.12 -d benchmarks/wheels
# Keep only the newest liger wheel.
ls -1t benchmarks/wheels/liger_kernel-*.whl | tail -n +2 | xargs -r rm -f
for whl in benchmarks/wheels/*.whl; do
  size=$(wc -c < "$whl")
  echo "$whl: $size bytes"
  if [ "$size" -gt 2097152 ]; then
    echo "warning: $whl is over 2 MB; do not commit it" >&2
  fi
done
