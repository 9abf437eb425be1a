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
EXTRAS_STAMP := $(VENV)/.integrations-installed
BUILD_STAMP := $(VENV)/.smoothce-built

.PHONY: all venv build test test-fast test-emu test-gpu bench bench-quick cuda-check clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the pip default build; with CUDA on Linux x86_64), then the tools the targets use.
$(DEPS_STAMP): | $(PY)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch ninja pybind11 pytest numpy hypothesis matplotlib scikit-learn torchmetrics tqdm
	touch $@

# The libraries the integrations adapt (smoothce.integrations; extras for users: smoothce[timm,transformers]),
# tested against the real thing. torch is held at the installed version: timm's torchvision would
# otherwise be free to pull in another torch.
$(EXTRAS_STAMP): $(DEPS_STAMP)
	$(PIP) install timm transformers accelerate \
		"torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

venv: $(DEPS_STAMP) $(EXTRAS_STAMP)

# An unchanged tree is not rebuilt (the stamp is newer than every source).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

build: $(BUILD_STAMP)

# libgomp's idle threads spin after every torch op; on 2 cores that starves the emulator's threads
# (test_cuda_emulated.py: 32 s spinning, 2.5 s passive). Tests only: the benchmark keeps the default.
test test-fast test-emu test-gpu: export OMP_WAIT_POLICY = passive

# The suite on the CPU kernels (with tests/test_cuda_emulated.py and tests/test_sanitizer.py: every
# CUDA launch plan on the emulator, threads resumed first in first out), the emulated plans again with
# released threads running on at once (lifo), then the whole suite on the emulated CUDA kernels with
# the device's fast-math arithmetic and a seeded random schedule, and on a GPU when one is visible.
test: $(BUILD_STAMP) $(EXTRAS_STAMP)
	$(PY) -m pytest tests -q -ra
	SMOOTHCE_EMU_SCHEDULE=lifo $(PY) -m pytest tests/test_cuda_emulated.py tests/test_sanitizer.py -q -ra
	SMOOTHCE_TEST_BACKEND=emu SMOOTHCE_EMU_ARITH=device SMOOTHCE_EMU_SCHEDULE=random:1 \
		$(PY) -m pytest tests -q -ra -m "not slow"
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		SMOOTHCE_TEST_BACKEND=cuda $(PY) -m pytest tests -q -ra; \
	else echo "make test: no GPU visible, the CUDA kernels were tested on the emulator only"; fi

test-fast: $(BUILD_STAMP) $(EXTRAS_STAMP)
	$(PY) -m pytest tests -q -ra -m "not slow"

# The whole suite on the CUDA kernels' source run on CPU by the emulator (tests/emu).
test-emu: $(BUILD_STAMP) $(EXTRAS_STAMP)
	SMOOTHCE_TEST_BACKEND=emu SMOOTHCE_EMU_ARITH=device SMOOTHCE_EMU_SCHEDULE=random:1 \
		$(PY) -m pytest tests -q -ra -m "not slow"

# On a machine with a GPU: the whole suite on the CUDA kernels (plus tests/test_cuda.py).
test-gpu: $(BUILD_STAMP) $(EXTRAS_STAMP)
	SMOOTHCE_TEST_BACKEND=cuda $(PY) -m pytest tests -q -ra

bench: $(BUILD_STAMP) $(EXTRAS_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: $(BUILD_STAMP) $(EXTRAS_STAMP)
	$(PY) -m bench --quick $(BENCH_ARGS)

# CUDA compile check (no GPU needed): builds the CUDA extension for sm_80 and sm_90 into a scratch
# folder and checks the library (see .ci/cuda_check.sh).
cuda-check: $(DEPS_STAMP)
	bash .ci/cuda_check.sh

# The CPU kernels' other code paths (AVX-512 without AVX512-BF16, AVX2, plain C++: those below what this
# machine builds), each built into build/cpu-variants/ and run through the CPU kernel tests
# (.ci/cpu_variants.sh; CPU_VARIANTS="avx2 default" picks some). 3–4 minutes a variant on 2 cores.
cpu-variants: $(BUILD_STAMP) $(EXTRAS_STAMP)
	PY=$(PY) bash .ci/cpu_variants.sh

clean:
	rm -rf build dist *.egg-info smoothce/*.so $(BUILD_STAMP)

# On a machine with a GPU, one command (~8 min on one H100): build for the visible GPU's architecture,
# tests/test_cuda.py, one shape per launch plan (also under compute-sanitizer memcheck, racecheck,
# synccheck, initcheck when installed), a short benchmark, then the suite on CUDA in the time left; each
# step time-limited, results and summary.txt in build/gpu-check/<time>/ (.ci/gpu_check.sh). Without a
# GPU it says so and stops before building.
gpu-check: $(DEPS_STAMP)
	BUILD_STAMP=$(BUILD_STAMP) PY=$(PY) bash .ci/gpu_check.sh

# Deletes each barrier statement of csrc/cuda in turn and runs the emulated tests on the mutated copy
# under several emulator schedules: is every deletion caught? (tools/barrier_mutation.py; slow: the
# emulator's kernels are recompiled per deletion. MUTATION_ARGS="--list", "--only 3", "--json FILE".)
barrier-mutation: $(BUILD_STAMP)
	$(PY) tools/barrier_mutation.py $(MUTATION_ARGS)

.PHONY: gpu-check barrier-mutation cpu-variants
