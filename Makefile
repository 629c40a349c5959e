# Two entry points for a fresh machine:
#   make bench   set up .venv, build, run the benchmark on its defaults
#   make test    set up .venv, build, run the tests
# torch is installed first and pinned, so pip never pulls an unpinned (CUDA) torch.
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
MMENGINE ?= mmengine==0.10.7
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup build test packaging-check bench cuda-check gpu-check mmagic-check gpu-wheels sanitize clean

setup: $(VENV)/.deps

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) $(MMENGINE) scikit-build-core ninja numpy \
	    pytest hypothesis expecttest matplotlib pytest-benchmark
	touch $@

build: setup
	$(BIN)/pip install -q --no-build-isolation -e '.[test,bench]'

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# pygan_optim as a user installs it: sdist, wheel, non-editable installs in fresh
# venvs (7-10 minutes; tests/test_hunt_packaging_s42.py).
packaging-check: build
	$(BIN)/python -m pytest -q -p no:cacheprovider -m packaging tests/test_hunt_packaging_s42.py

bench: build
	$(BIN)/python benchmarks/bench_biggan.py $(BENCH_ARGS)

# Builds the CUDA variant against torch==2.14.1 (CUDA 13.0) in .venv-cuda and
# checks every op has a CUDA kernel registered; needs nvcc, not a GPU.
cuda-check:
	bash .ci/cuda_build_check.sh

clean:
	rm -rf build $(VENV) .venv-cuda

# On a machine with a GPU, nvcc and a CUDA torch (no venv, no registry needed):
# build, CUDA tests, compute-sanitizer, GPU benchmark; results in gpu_check_out/.
gpu-check:
	bash .ci/gpu_check.sh

# Optional: tests/test_real_mmagic_s38.py against a real MMagic 1.2.0 (downloads ~1 GB).
mmagic-check: build
	bash .ci/mmagic_check.sh

# Here, beforehand: the pure-Python wheels gpu-check needs, for Python 3.12.
GPU_WHEELS := mmengine==0.10.7 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.9 expecttest==0.3.0
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The interpret-mode tests under AddressSanitizer and ThreadSanitizer (as CI runs them).
sanitize: build
	bash .ci/sanitize.sh address
	bash .ci/sanitize.sh thread
