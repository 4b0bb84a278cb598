#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu for sm_90 without linking (no GPU needed); one line per file.
# Usage: tools/nvcc_check.sh [python]   (default: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
INCLUDES=$("$PY" -c 'import sysconfig; from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))') || exit 1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# A CPU-only torch ships c10/cuda headers without their generated config header: stand one in.
mkdir -p "$TMP/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
INCLUDES="$INCLUDES -I$TMP/stub"  # searched last: a real header wins
status=0
for cu in csrc/cuda/*.cu; do
  start=$SECONDS
  # shellcheck disable=SC2086
  if "$NVCC" -c -std=c++20 -arch=sm_90 --expt-relaxed-constexpr -DWITH_CUDA -Xcompiler -fPIC $INCLUDES \
      "$cu" -o "$TMP/$(basename "$cu").o" 2>"$TMP/log"; then
    echo "ok    $cu ($((SECONDS - start)) s)"
  else
    echo "FAIL  $cu ($((SECONDS - start)) s)"
    cat "$TMP/log"
    status=1
  fi
done
exit $status
