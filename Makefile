# Everything a fresh machine needs: `make bench` and `make test` create .venv/, install the
# dependencies, build the extension (pip install --no-build-isolation -e .) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= 2
export MAX_JOBS

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cuh csrc/*/*.cu)
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.smoothce-built

.PHONY: all venv build test test-fast bench bench-quick cuda-check clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the pip default build; with CUDA on Linux x86_64), then the tools the targets use.
$(DEPS_STAMP): | $(PY)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch ninja pybind11 pytest numpy hypothesis matplotlib scikit-learn torchmetrics tqdm
	touch $@

venv: $(DEPS_STAMP)

# An unchanged tree is not rebuilt (the stamp is newer than every source).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q -ra

test-fast: $(BUILD_STAMP)
	$(PY) -m pytest tests -q -ra -m "not slow"

bench: $(BUILD_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: $(BUILD_STAMP)
	$(PY) -m bench --quick $(BENCH_ARGS)

# CUDA compile check (no GPU needed): builds the CUDA extension for sm_80 and sm_90 into a scratch
# folder and checks the library (see .ci/cuda_check.sh).
cuda-check: $(DEPS_STAMP)
	bash .ci/cuda_check.sh

clean:
	rm -rf build dist *.egg-info smoothce/*.so $(BUILD_STAMP)
