#!/usr/bin/env bash
# Install the peer libraries of benchmarks/compare_peers.py into benchmarks/.peers (a --target dir).
# --no-deps keeps pip from touching torch/numpy/scipy of the project venv; compare_peers.py puts
# the target dir on sys.path itself. Usage: bash benchmarks/install_peers.sh [python]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-${PYTHON:-$here/../.venv/bin/python}}"
target="$here/.peers"
mkdir -p "$target"
"$py" -m pip install --quiet --no-deps --upgrade --target "$target" -r "$here/requirements-peers.txt"
PYTHONPATH="$target" "$py" - <<'PY'
import importlib
for m in ("pyhessian", "hessian_eigenthings", "curvlinops", "backpack", "einconv", "einops", "linear_operator"):
    try:
        importlib.import_module(m); print("ok  ", m)
    except Exception as e:  # noqa: BLE001
        print("FAIL", m, type(e).__name__, e)
PY
