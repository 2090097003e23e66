# `make test` and friends create .venv when it is missing. On a CPU-only machine torch is
# installed first, pinned, so that no dependency resolution can pull a CUDA build. The editable
# install builds the C++ extension sr3_engine._C (setup.py + CMakeLists.txt), again whenever
# csrc/ changes; the test targets require it (SR3_ENGINE_REQUIRE_EXT=1) and compile-check every
# CUDA source with nvcc when nvcc exists (check-cuda).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Pinned to what the GPU machines run; the CPU interpreter (TRITON_INTERPRET=1) tests the kernels here.
TRITON_SPEC ?= triton==3.6.0
# Triton kernels run for real on a GPU and in the interpreter without one.
TRITON_INTERPRET_DEFAULT = $$($(PY) -c 'import torch; print(int(not torch.cuda.is_available()))')
PYTEST_ARGS ?= -m "not slow"
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
EXT_SOURCES := CMakeLists.txt $(shell find csrc cmake -type f 2>/dev/null)

.PHONY: install test test-slow test-all check-cuda check-triton demo bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml setup.py $(EXT_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --upgrade "setuptools>=64" wheel "pybind11>=2.12"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install "$(TRITON_SPEC)"
	$(PY) -m pip install --no-build-isolation -e ".[test,export,openvino,serve,ray]"
	touch $@

install: $(VENV)/.installed

test: install check-cuda check-triton
	SR3_ENGINE_REQUIRE_EXT=1 TRITON_INTERPRET=$${TRITON_INTERPRET:-$(TRITON_INTERPRET_DEFAULT)} \
		$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The slow tests alone: CI runs them after `make test`, so that together they are `make test-all`.
test-slow: install
	SR3_ENGINE_REQUIRE_EXT=1 TRITON_INTERPRET=$${TRITON_INTERPRET:-$(TRITON_INTERPRET_DEFAULT)} \
		$(PY) -m pytest -q -m slow tests

test-all: install check-cuda check-triton
	SR3_ENGINE_REQUIRE_EXT=1 TRITON_INTERPRET=$${TRITON_INTERPRET:-$(TRITON_INTERPRET_DEFAULT)} \
		$(PY) -m pytest -q tests

# Compiles each .cu alone (no torch) into a temporary directory that is removed afterwards, and
# fails when ptxas reports spills (-Xptxas -v prints them per kernel).
check-cuda:
	@if [ -z "$(NVCC)" ]; then echo "check-cuda: nvcc not found, skipping the CUDA compile check"; exit 0; fi; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	for source in $(CUDA_SOURCES); do \
		echo "$(NVCC) -c -arch=$(CUDA_ARCH) -Xptxas -v $$source"; \
		"$(NVCC)" -c -arch=$(CUDA_ARCH) -std=c++17 -Xptxas -v -o "$$tmp/$$(basename $$source).o" "$$source" \
			> "$$tmp/ptxas.log" 2>&1 || { cat "$$tmp/ptxas.log"; exit 1; }; \
		if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$$tmp/ptxas.log"; then \
			echo "check-cuda: $$source spills registers (above)"; exit 1; fi; \
	done

# Every Triton kernel compiled for sm_90 and sm_80 with Triton's own compiler and ptxas, no GPU
# needed; fails on a compile error or a spill (kernels/compile_check.py says what it covers).
check-triton: install
	env -u TRITON_INTERPRET $(PY) -m sr3_engine.kernels.compile_check --arch 90 80

# The CPU suite (tiny config and demo-x4, every backend side by side, about 30 minutes on 2 cores), then its
# section and chart in bench/RESULTS.md. On a GPU machine see docs/BENCHMARKS.md.
BENCH_JSON ?= .benchmarks/bench-cpu.json
# Eager and compiled bf16 are left out: on a CPU without AVX-512 BF16 their convolutions are
# emulated, a demo-x4 row takes many minutes, and no comparison the suite reports depends on them.
BENCH_ARGS ?= --device cpu --benchmark-min-rounds 3 --benchmark-max-time 0.1 -k "not eager-bf16 and not compile-bf16"
bench: install
	@mkdir -p $(dir $(BENCH_JSON))
	SR3_ENGINE_REQUIRE_EXT=1 $(PY) -m pytest -q bench $(BENCH_ARGS) --benchmark-json $(BENCH_JSON)
	$(PY) -m bench.report $(BENCH_JSON) --command 'make bench  # = pytest -q bench $(BENCH_ARGS)'

# On a GPU machine (see the GPU notes): its python3 already has every package and there is no
# network, so no virtual environment; builds for sm_90, tests, benchmarks, writes OUT (bench/gpu_check.py).
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) -m bench.gpu_check --out "$(OUT)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache sr3_engine/_C*.so

demo: install
	$(PY) -m sr3_engine demo
