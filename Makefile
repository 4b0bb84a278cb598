# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fasthess-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test setup nvcc-check package-check docs bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -m fasthess
	touch $@

demo: $(STAMP)
	$(PY) -m experiments run finding1-quick --out runs/demo

# FASTHESS_REQUIRE_NATIVE=1: the extension was built, so a kernel test that finds no native kernel fails, not skips.
test: $(STAMP) nvcc-check
	FASTHESS_REQUIRE_NATIVE=1 $(PY) -m pytest -q --doctest-modules fasthess tests
	$(MAKE) package-check docs

# sdist + wheel build, a fresh venv with only the pinned torch builds the sdist, the installed wheel reports the
# native backend and passes the sdist's kernel and packaging tests from outside the checkout (.ci/package_check.sh).
package-check: $(STAMP)
	bash .ci/package_check.sh $(abspath $(PY))

# The docs site, strictly (warnings fail); the gallery runs every examples/*.py (docs/hooks/gallery.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 MPLBACKEND=Agg $(VENV)/bin/mkdocs build --strict --site-dir site

# Compile every CUDA source with nvcc for sm_90 (no GPU needed), so CUDA code cannot rot.
nvcc-check: $(STAMP)
	@if command -v nvcc >/dev/null 2>&1 || test -x $(CUDA_HOME)/bin/nvcc; then \
		PATH=$(CUDA_HOME)/bin:$$PATH PYTHON=$(PY) bash tools/nvcc_check.sh; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build dist site *.egg-info fasthess/_C*.so $(VENV)
