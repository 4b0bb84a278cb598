# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fasthess-installed
SOURCES := setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
export CUDA_HOME ?= /usr/local/cuda

.PHONY: demo test setup nvcc-check bench clean

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

test: $(STAMP) nvcc-check
	$(PY) -m pytest -q --doctest-modules fasthess tests

# Compile every CUDA source with nvcc for sm_90 (no GPU needed), so CUDA code cannot rot.
nvcc-check: $(STAMP)
	@if command -v nvcc >/dev/null 2>&1 || test -x $(CUDA_HOME)/bin/nvcc; then \
		PATH=$(CUDA_HOME)/bin:$$PATH PYTHON=$(PY) bash tools/nvcc_check.sh; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info fasthess/_C*.so $(VENV)
