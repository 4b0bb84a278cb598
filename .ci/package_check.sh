#!/usr/bin/env bash
# Packaging check (called by `make package-check`, part of `make test`):
#   1. `python -m build` makes the sdist and, from the unpacked sdist, the wheel;
#   2. a fresh venv holding only the pinned torch builds the sdist itself (`pip install --no-build-isolation`);
#   3. the wheel, installed there with the [test] and [experiments] extras, reports the native backend, runs
#      the runner under its one name (fasthess-experiments, python -m fasthess_experiments), and passes the
#      sdist's own kernel and packaging tests run from outside any checkout (native kernels required: a skipped
#      opcheck is a failure).
# Usage: .ci/package_check.sh [python-of-the-dev-venv]   (torch pin: TORCH_PIN, default torch==2.13.0)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-$repo/.venv/bin/python}"
pin="${TORCH_PIN:-torch==2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
say() { printf '[package-check %3ss] %s\n' "$SECONDS" "$*"; }

say "python -m build (sdist, then the wheel from it)"
"$py" -m build --no-isolation --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=("$work"/dist/fasthess-*.tar.gz)
wheel=("$work"/dist/fasthess-*-cp310-abi3-*.whl)
test -f "${sdist[0]}" && test -f "${wheel[0]}" || { ls "$work/dist"; echo "expected an sdist and a cp310-abi3 wheel"; exit 1; }

say "fresh venv with only $pin builds the sdist"
"$("$py" -c 'import sys; print(sys._base_executable)')" -m venv "$work/venv"
v="$work/venv/bin/python"
"$v" -m pip install -qq "$pin"
"$v" -m pip install -qq --no-build-isolation "${sdist[0]}" > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
cd "$work"  # from here on nothing may import the checkout
"$v" -m fasthess | tee "$work/info.txt"
grep -q "backend: cpu\|backend: cuda" "$work/info.txt" || { echo "the sdist build did not load its native extension"; exit 1; }

say "the wheel with [test,experiments], $pin in the same command"
"$v" -m pip install -qq --force-reinstall --no-deps "${wheel[0]}"
"$v" -m pip install -qq "$pin" "${wheel[0]}[test,experiments]"
"$v" -m pip check
"$v" -m fasthess | tee "$work/info.txt"
grep -q "backend: cpu\|backend: cuda" "$work/info.txt" || { echo "the installed wheel did not load its native extension"; exit 1; }
"$v" -c 'import fasthess, sys; sys.exit(0 if "site-packages" in fasthess.__file__ else f"imported {fasthess.__file__}")'
for runner in "$work/venv/bin/fasthess-experiments" "$v -m fasthess_experiments"; do  # the runner's one name
    $runner list > "$work/list.txt"
    grep -q "^finding1-quick" "$work/list.txt" || { cat "$work/list.txt"; echo "$runner list failed"; exit 1; }
done

say "the sdist's tests against the installed wheel"
mkdir "$work/src" && tar -xzf "${sdist[0]}" -C "$work/src" --strip-components=1
FASTHESS_REQUIRE_NATIVE=1 "$v" -m pytest -q -p no:cacheprovider --rootdir "$work/src" -c "$work/src/pyproject.toml" \
    "$work/src/tests/test_ops.py" "$work/src/tests/test_packaging.py"
say "done"
