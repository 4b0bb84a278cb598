# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
# make demo installs only what the demo needs (requirements-demo.txt); make test adds the rest on top
# (requirements-dev.txt: tests, packaging, integrations, docs). One stamp for each layer.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.fasthess-demo
DEV_STAMP  := $(VENV)/.fasthess-dev
# The demo layer is installed without byte-compiling: Python compiles a module when it is first imported, so
# only the modules the demo runs get a .pyc (pip would compile all of them: 200 MB, mostly never imported).
DEMO_PIP   := $(PY) -m pip install -q --no-compile
SOURCES := setup.py pyproject.toml requirements-demo.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test setup nvcc-check package-check docs bench clean

setup: $(DEV_STAMP)

$(DEMO_STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(DEMO_PIP) --upgrade pip
	$(DEMO_PIP) -r requirements-demo.txt
	$(DEMO_PIP) --no-build-isolation -e .
	$(PY) -m fasthess
	touch $@

$(DEV_STAMP): $(DEMO_STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m fasthess_experiments run finding1-quick --out runs/demo

# FASTHESS_REQUIRE_NATIVE=1: the extension was built, so a kernel test that finds no native kernel fails, not skips.
test: $(DEV_STAMP) nvcc-check
	FASTHESS_REQUIRE_NATIVE=1 $(PY) -m pytest -q --doctest-modules fasthess tests
	$(MAKE) package-check docs

# sdist + wheel build, a fresh venv with only the pinned torch builds the sdist, the installed wheel reports the
# native backend and passes the sdist's kernel and packaging tests from outside the checkout (.ci/package_check.sh).
package-check: $(DEV_STAMP)
	bash .ci/package_check.sh $(abspath $(PY))

# The docs site, strictly (warnings fail); the gallery runs every examples/*.py (docs/hooks/gallery.py).
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 MPLBACKEND=Agg $(VENV)/bin/mkdocs build --strict --site-dir site

# Compile every CUDA source with nvcc for sm_90 (no GPU needed), so CUDA code cannot rot.
nvcc-check: $(DEV_STAMP)
	@if command -v nvcc >/dev/null 2>&1 || test -x $(CUDA_HOME)/bin/nvcc; then \
		PATH=$(CUDA_HOME)/bin:$$PATH PYTHON=$(PY) bash tools/nvcc_check.sh; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

bench: $(DEV_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build dist site *.egg-info fasthess/_C*.so $(VENV)
