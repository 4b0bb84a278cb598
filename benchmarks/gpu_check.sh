#!/usr/bin/env bash
# GPU check of the native kernels (run on a CUDA machine, no network needed):
#   1. builds fasthess._C with CUDA in place (sm_90),
#   2. runs tests/test_ops.py (CUDA parametrizations included; CUDA kernels must be loaded),
#   3. runs the CUDA kernel benchmarks with --benchmark-json,
#   4. reports the accumulate kernel's best bandwidth as a fraction of the H200's 4.3 TB/s.
# Everything lands flat in $OUT (7 files).  Budget: build <= 5 min, tests <= 2 min, benchmarks <= 2.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to an output folder}"
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FASTHESS_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok     $name ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
  else
    echo "FAILED $name ($((SECONDS - start)) s, rc=$?)" | tee -a "$SUMMARY"
    tail -n 30 "$OUT/$name.log"
    status=1
  fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$CUDA_HOME/bin/nvcc" --version | tail -n 2
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } >"$OUT/env.txt" 2>&1

step build 300 "$PY" setup.py build_ext --inplace
step loaded 60 "$PY" -c '
from fasthess import _ext
assert _ext._LOAD_ERROR is None, _ext._LOAD_ERROR
missing = [op for op in ("accumulate_dot", "tridiag_eigh") if not _ext.has_kernel(op, "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
print("backend", _ext.backend(), _ext.native_ops())'
step test_ops 150 "$PY" -m pytest tests/test_ops.py -q -p no:cacheprovider -ra
step bench 150 env FASTHESS_BENCH_TABLE="$OUT/bench_table.md" "$PY" -m pytest benchmarks/bench_ops.py \
  --benchmark-only -q -s -p no:cacheprovider -k cuda --benchmark-max-time=0.5 --benchmark-json="$OUT/bench.json"

"$PY" - "$OUT/bench.json" >>"$SUMMARY" 2>&1 <<'PYEOF' || status=1
import json, sys
PEAK = 4300.0  # GB/s, H200 HBM3e
rows = [b for b in json.load(open(sys.argv[1]))["benchmarks"]
        if b["name"].startswith("test_accumulate[native") and b["params"]["device"] == "cuda"]
for b in sorted(rows, key=lambda b: -b["extra_info"]["GBps"]):
    print(f'{b["group"]}: {b["extra_info"]["GBps"]:.0f} GB/s = {b["extra_info"]["GBps"] / PEAK:.1%} of 4.3 TB/s')
best = max(b["extra_info"]["GBps"] for b in rows)
print(f"accumulate_dot best bandwidth: {best:.0f} GB/s = {best / PEAK:.1%} of 4.3 TB/s")
PYEOF
echo "exit status $status" | tee -a "$SUMMARY"
exit $status
