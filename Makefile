# The two commands a new user runs (see README):  make demo   /   make test
# Both create .venv on first use (or reuse it) and install what they need into it.
#   TORCH_SPEC   torch (and the torchvision built for it) to install when the venv has none; a GPU
#                user may pass their own pair. The default pair loads on CPU and GPU alike.
#   VENV_ARGS    e.g. --system-site-packages to reuse a preinstalled CUDA torch
#   PYTEST_ARGS  extra pytest arguments, e.g. -k zoo or -m "not slow"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
VENV_ARGS ?=
PYTEST_ARGS ?=
FLOOR_VENV ?= .venv-floor
BIN := $(VENV)/bin
STAMP := $(VENV)/.unsloth_like-installed
TEST_STAMP := $(VENV)/.unsloth_like-test-tools-installed

.PHONY: demo test test-fast test-floor bench-unsloth doctor clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("unsloth_like needs Python >= 3.10, found " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev,plots]"
	touch $@

# What only the tests need (DeepSpeed for the ZeRO tests, built without CUDA ops). llama-cpp-python (the gguf-check extra) compiles llama.cpp from
# source: ~10 min on 2 cores the first time, seconds afterwards from pip's wheel cache;
# GGML_NATIVE=OFF makes that cached wheel portable (a -march=native build crashes on CPUs without
# the same extensions). Go runs the Ollama template tests (tests/gguf_export); without it they are
# skipped, never failed. llama.cpp's Jinja engine (scripts/build_llamacpp_jinja.py, ~1 min once,
# a no-op when up to date) renders the exported chat templates as llama-server and Ollama do.
$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -e ".[dev,plots,gguf-check,vision,deepspeed]"
	@command -v go >/dev/null || (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q golang-go >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q golang-go >/dev/null 2>&1)) || echo "note: Go not installed; Ollama template tests will be skipped"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m unsloth_like demo --overwrite

JINJA_RENDERER = $(BIN)/python scripts/build_llamacpp_jinja.py || echo "note: llama.cpp's Jinja renderer not built; its chat-template tests will be skipped"

# The environment report first (versions, CPU, whether bitsandbytes dequantises right on it), so
# that a failure below can be attributed to its host.
test: $(TEST_STAMP)
	$(BIN)/python -m unsloth_like doctor
	@$(JINJA_RENDERER)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m unsloth_like doctor
	@$(JINJA_RENDERER)
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# The suite against the lowest version of every dependency pyproject.toml admits (and of the
# vision extra: torchvision must be the one built for the floor torch).
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(VENV_ARGS) $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip packaging
	$(FLOOR_VENV)/bin/python scripts/floor_requirements.py vision > $(FLOOR_VENV)/floor.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c $(FLOOR_VENV)/floor.txt -e ".[dev,vision]"
	$(FLOOR_VENV)/bin/python -m pip check
	$(FLOOR_VENV)/bin/python -m unsloth_like doctor
	$(FLOOR_VENV)/bin/python -m pytest -n 2 -p no:cacheprovider $(PYTEST_ARGS)

# Ours against Unsloth itself (its CPU backend on a CPU, its kernels on a GPU), every variant in one
# venv of its own: Unsloth pins transformers <= 5.17 and trl <= 1.15, our lowest supported releases,
# so there every variant runs on them. BENCH_ARGS: more `unsloth-like bench` flags.
PEERS_VENV ?= .venv-peers
UNSLOTH_SPEC ?= unsloth==2026.10.9 unsloth_zoo==2026.10.9 transformers==5.17.0 trl==1.15.0
BENCH_ARGS ?=

bench-unsloth:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(VENV_ARGS) $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -c 'import torch' 2>/dev/null || $(PEERS_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(PEERS_VENV)/bin/python -m pip install --quiet -e ".[plots]" $(UNSLOTH_SPEC)
	$(PEERS_VENV)/bin/python -m unsloth_like bench --name unsloth $(BENCH_ARGS)

doctor: $(STAMP)
	$(BIN)/python -m unsloth_like doctor

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(PEERS_VENV) outputs .pytest_cache build/llamacpp-jinja
