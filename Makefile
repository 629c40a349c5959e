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

.PHONY: setup build test bench cuda-check clean

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

bench: build
	$(BIN)/python benchmarks/bench_biggan.py $(BENCH_ARGS)

# Builds the CUDA variant against torch==2.14.1 (CUDA 13.0) in .venv-cuda and
# checks every op has a CUDA kernel registered; needs nvcc, not a GPU.
cuda-check:
	bash .ci/cuda_build_check.sh

clean:
	rm -rf build $(VENV) .venv-cuda
