# Two commands on a fresh machine:  make demo   |   make test
# Each creates .venv, installs the dependencies, builds the extension, then runs.
# A second call rebuilds only what changed (stamps in .make/).

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMPS      := .make
TORCH_SPEC  ?= torch==2.14.1
DEPS        := numpy transformers datasets pyyaml matplotlib tqdm pybind11 ninja pytest pytest-benchmark pytest-xdist trl
OPENRLHF_SPEC := openrlhf==0.11.2
# ninja and the venv's tools must be on PATH for torch's extension builder
export PATH := $(CURDIR)/$(BIN):$(PATH)
# The CUDA kernels are built (and required) wherever nvcc exists, GPU or not.
CUDA_FLAGS  := $(if $(shell command -v nvcc 2>/dev/null),RLHF_KERNELS_FORCE_CUDA=1,)
SOURCES     := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null | grep -v build_config.h)

.PHONY: test demo build bench-cpu bench bench-quick readme coverage gpu info clean

# pytest-xdist workers for the test suites: one per core, at most 4 (each holds torch, transformers and Triton's
# interpreter: ~1-2 GB); 0 (one process) on a single core. `make test TEST_WORKERS=0` runs them in one process.
# Each file goes to one worker (its module fixtures built once), in the collection's order, where tests/conftest.py
# puts the slow ones first (xdist's own reorder, by test count, would leave the one-test sm_90 compile to the end).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)
XDIST       = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMPS)/build
	RLHF_KERNELS_REQUIRE_EXTENSION=1 $(BIN)/python -m pytest -q $(XDIST)

demo: $(STAMPS)/build
	$(BIN)/python -m rlhf_kernels.cli demo

bench-cpu: $(STAMPS)/build
	$(BIN)/python -m pytest benchmarks/bench_cpu_logprobs.py benchmarks/bench_cpu_kernels.py -q -s -p no:cacheprovider \
		--benchmark-columns=min,median,max,rounds

bench: $(STAMPS)/build
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMPS)/build
	$(BIN)/python -m benchmarks.run --quick --threads 1

# README's benchmark block, regenerated from the committed benchmarks/results/
readme: $(STAMPS)/build
	$(BIN)/python -m benchmarks.update_readme
	$(BIN)/rlhf-kernels settings --update-readme README.md

# Which cells of DESIGN §6's GPU grid the committed results cover, and the commands for the rest
coverage: $(STAMPS)/build
	$(BIN)/python -m benchmarks.coverage

info: $(STAMPS)/build
	$(BIN)/python -m rlhf_kernels.cli info

build: $(STAMPS)/build

# On a GPU machine with its own preinstalled python (no venv, no network):
# build in place, then `pytest -m gpu` and every benchmark, logs under $$OUT.
gpu:
	OUT=$${OUT:-$(CURDIR)/gpu_out} PYTHON=$${PYTHON:-python3} bash benchmarks/gpu_suite.sh

# A short lent-GPU session in one call: what closes open issues first (setup, headline, the fused PPO probe, fused-linear
# headline, pytest -m gpu, sanitize, profile), stages skipped or cut to end within GPU_DEADLINE seconds
# (default 540). On the lent tool: TAR_OUT=$OUT/g.tgz OUT=/tmp/g GPU_DEADLINE=540 make gpu-quick
.PHONY: gpu-quick
gpu-quick:
	OUT=$${OUT:-$(CURDIR)/gpu_out} PYTHON=$${PYTHON:-python3} GPU_DEADLINE=$${GPU_DEADLINE:-540} bash benchmarks/gpu_suite.sh priority

# The benchmark grid's gaps only (issue 5): setup, then the bench stages resumed, torch.compile's rows last.
# On the lent tool: TAR_OUT=$OUT/g.tgz OUT=/tmp/g GPU_DEADLINE=540 make gpu-grid
.PHONY: gpu-grid
gpu-grid:
	OUT=$${OUT:-$(CURDIR)/gpu_out} PYTHON=$${PYTHON:-python3} GPU_DEADLINE=$${GPU_DEADLINE:-540} bash benchmarks/gpu_suite.sh setup grid

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@touch $@

$(STAMPS)/deps: $(STAMPS)/venv Makefile
	$(BIN)/pip install -q $(TORCH_SPEC) $(DEPS)
	# OpenRLHF for its drop-in's tests only: pure Python, its heavy dependencies (DeepSpeed, flash-attn, ray) stubbed there
	$(BIN)/pip install -q --no-deps $(OPENRLHF_SPEC)
	@touch $@

$(STAMPS)/build: $(STAMPS)/deps $(SOURCES)
	$(CUDA_FLAGS) $(BIN)/pip install -q --no-build-isolation --no-deps -e .
	@touch $@

clean:
	rm -rf build $(STAMPS) rlhf_kernels/_C*.so csrc/build_config.h *.egg-info

# The oldest versions pyproject.toml allows (torch 2.6, Triton 3.2 with a numpy of its time: its interpreter needs < 2.4;
# transformers 4.45 with a datasets of its time; no trl, whose releases that import need newer transformers), the
# CPU suite, in a venv and a copy of the tree of their own (.make/oldest: the in-place build's _C*.so has the
# same name for both torches). torch 2.6 is a CUDA 12 build and refuses CUDA 13's nvcc, so its extension holds the
# CPU kernels only (RLHF_KERNELS_SKIP_CUDA=1; the CUDA sources compile in `make test`). CI runs it after `make test`.
# --oldest-versions (tests/conftest.py): what can differ between versions, once; the version-independent tests (the
# CUDA device code's host emulation), 3 of every 4 fuzz seeds and the sm_90 compile's candidate sweep are make test's.
OLDEST      := $(STAMPS)/oldest
OLDEST_SPEC ?= torch==2.6.0 triton==3.2.0 numpy<2.3 transformers==4.45.2 datasets<4
OLDEST_DEPS := pyyaml matplotlib tqdm pybind11 ninja pytest pytest-benchmark pytest-xdist
.PHONY: test-oldest
test-oldest: $(STAMPS)/oldest-deps
	rm -rf $(OLDEST)/src && mkdir -p $(OLDEST)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf - | tar -xf - -C $(OLDEST)/src
	cd $(OLDEST)/src && PATH=$(CURDIR)/$(OLDEST)/venv/bin:$$PATH RLHF_KERNELS_SKIP_CUDA=1 \
		$(CURDIR)/$(OLDEST)/venv/bin/pip install -q --no-build-isolation --no-deps -e .
	cd $(OLDEST)/src && RLHF_KERNELS_SKIP_CUDA=1 RLHF_KERNELS_REQUIRE_EXTENSION=1 \
		$(CURDIR)/$(OLDEST)/venv/bin/python -m pytest -q $(XDIST) --oldest-versions

# The C++ CPU kernels under AddressSanitizer and UBSan (DESIGN §2: nothing reads out of bounds, nothing crashes): a
# copy of the tree in .make/asan built with GCC's sanitizers (CPU kernels only), then the op, trainer and build
# tests with their runtimes preloaded, Triton's interpreted cases left out; the first out-of-bounds access or
# undefined behaviour ends the run with its stack. Not part of `make test` (about 10 minutes here).
ASAN        := $(STAMPS)/asan
SANITIZE    := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
ASAN_TESTS  ?= tests/ops tests/trainer tests/integrations tests/test_build.py
.PHONY: asan
asan: $(STAMPS)/deps
	rm -rf $(ASAN) && mkdir -p $(ASAN)
	git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf - | tar -xf - -C $(ASAN)
	cd $(ASAN) && RLHF_KERNELS_SKIP_CUDA=1 CFLAGS="$(SANITIZE)" LDFLAGS="-fsanitize=address,undefined" \
		$(CURDIR)/$(BIN)/python setup.py -q build_ext --inplace
	cd $(ASAN) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$(CURDIR)/$(ASAN) \
		RLHF_KERNELS_SKIP_CUDA=1 RLHF_KERNELS_REQUIRE_EXTENSION=1 \
		$(CURDIR)/$(BIN)/python -m pytest -q -p no:cacheprovider -k "not triton" $(ASAN_TESTS)

# A fresh venv each time the pins change, so nothing newer lingers from an earlier set
$(STAMPS)/oldest-deps: Makefile
	rm -rf $(OLDEST)/venv && mkdir -p $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)/venv
	$(OLDEST)/venv/bin/pip install -q --upgrade pip setuptools wheel
	$(OLDEST)/venv/bin/pip install -q $(foreach s,$(OLDEST_SPEC),"$(s)") $(OLDEST_DEPS)
	@touch $@
