# One command each: `make test`, `make bench`, `make wheel`. Each creates (or reuses) .venv, installs what it needs,
# builds the C++ extension, then runs.
#
# On a machine that already has a CUDA torch and no network (the lent GPU machine), use that Python as it is:
#     make test VENV= PYTHON=python3
# (VENV empty = no virtual environment and no installs; the extension is rebuilt against that Python's torch.)
PYTHON ?= python3
VENV ?= .venv
JOBS ?= 2

ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
DEPS := .deps-system
else
PY := $(VENV)/bin/python
DEPS := $(VENV)/.seqfast-deps
endif

# Rebuild when any source changes (ninja then recompiles only what changed).
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc)

.PHONY: test test-wheel test-asan bench bench-sweep build wheel clean gpu-check

$(VENV)/.seqfast-deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.deps-system:
	@$(PY) -c "import torch, triton, pytest" || \
	  (echo "VENV= mode uses $(PY) as it is: it needs torch, triton and pytest installed"; exit 1)

# The extension is built in place (editable install: seqfast/_C*.so, kernels/ mapped to seqfast.kernels).
# flock: one C++ build at a time on this 2-core machine.
.build-stamp: $(DEPS) $(SOURCES)
	MAX_JOBS=$(JOBS) flock /tmp/seqfast-build.lock \
	  $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: .build-stamp

test: .build-stamp
	$(PY) -m pytest tests

# Benchmarks: plots, progress bars, the optional ONNX Runtime comparison (requirements-bench.txt; VENV= mode uses
# what that Python has). BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_DEPS := $(if $(strip $(VENV)),$(VENV)/.seqfast-bench-deps,)

$(VENV)/.seqfast-bench-deps: requirements-bench.txt $(DEPS)
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $@

# torch eager vs seqfast on every op and module (quick default: minutes), tables + plots in benchmarks/results/
bench: .build-stamp $(BENCH_DEPS)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# the performance-floor sweep (ops x dtypes x batch x hidden x inference/training, SDPA, decoder steps; <= 20 min)
bench-sweep: .build-stamp $(BENCH_DEPS)
	$(PY) benchmarks/sweep.py $(BENCH_ARGS)

# On a lent GPU machine (no network): `make gpu-check VENV= PYTHON=python3` builds the extension against that torch,
# runs the CUDA tests and the GPU benchmarks, and writes benchmarks/results/<gpu>-<date>.md, within 8 minutes.
# Without CUDA it is a dry run (Triton's interpreter, tiny shapes). GPU_CHECK_ARGS passes options through.
gpu-check: $(if $(strip $(VENV)),$(DEPS),)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

wheel: $(DEPS)
	MAX_JOBS=$(JOBS) flock /tmp/seqfast-build.lock \
	  $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

test-wheel: wheel
	SEQFAST_TEST_WHEEL=1 SEQFAST_WHEEL_DIR=dist $(PY) -m pytest tests/test_wheel.py

# The C++-backed tests against the extension built with AddressSanitizer + UBSan (setup.py, SEQFAST_SANITIZE) in
# build/asan/ (the in-place extension is left alone); the sanitizer runtime is preloaded into Python. Not in CI: slow.
ASAN_TESTS ?= tests/test_cpp_*.py tests/test_own_gemm.py tests/test_sdpa.py tests/test_rnn.py tests/test_rnn_cell.py
test-asan: $(DEPS)
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg
	SEQFAST_SANITIZE=1 MAX_JOBS=$(JOBS) flock /tmp/seqfast-build.lock \
	  $(PY) setup.py -q build_ext --build-lib build/asan/lib --build-temp build/asan/tmp
	cp -r seqfast build/asan/pkg/ && rm -f build/asan/pkg/seqfast/_C*.so && cp build/asan/lib/seqfast/_C*.so build/asan/pkg/seqfast/
	cp -r kernels build/asan/pkg/seqfast/kernels
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONPATH=build/asan/pkg $(PY) -P -m pytest -p no:cacheprovider -q $(ASAN_TESTS)

clean:
	rm -rf build dist *.egg-info .build-stamp seqfast/_C*.so
