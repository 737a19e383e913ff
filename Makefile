# Set-up and entry points. Every target installs what it needs, so each works on a fresh machine.
#
# Everything is installed into a virtual environment, never into the system Python (which current Debian/Ubuntu lock,
# PEP 668 "externally-managed-environment"): the active one when VIRTUAL_ENV is set, else the project's own .venv,
# made on first use with `$(BOOT_PYTHON) -m venv`. Re-running is cheap: the venv is made once, torch is installed only
# when the venv lacks torch 2.13.0, and pip finds the rest already satisfied.
#
#   make test PYTEST_ARGS="tests/unit/test_config.py -q"   a subset (default: the whole suite, as CI runs it)
#   make demo OUT=out/mine                                 another output folder
#   make install VENV=/path/to/env                         another environment (made if it does not exist)
BOOT_PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
# pip compiles what it installs (torch in 26 s instead of 10 here): where PYTHONDONTWRITEBYTECODE is set, as on the
# machines this project is developed on, nothing is compiled on import either, and every process (each Ray worker and
# actor) would compile torch and Ray again: `import torch` 4.6 s instead of 1.7, a 4-file run 30 s instead of 18
PIP := $(PYTHON) -m pip
PIP_INSTALL := $(PIP) install -q
TORCH_VERSION := 2.13.0
OUT ?= out/demo
PYTEST_ARGS ?= -m "not gpu and not wip" -q -rs --durations=15
PYTEST_FAST_ARGS ?= -m "not gpu and not integration and not slow" -q

.PHONY: venv install install-test demo test test-fast bench gpu-check clean distclean

# The environment: made only when it has no python yet (an active VIRTUAL_ENV always has one); a failed make leaves
# none, so the next run tries again.
$(PYTHON):
	$(BOOT_PYTHON) -m venv $(VENV) || { rm -f $(PYTHON); \
		echo "error: '$(BOOT_PYTHON) -m venv $(VENV)' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; \
		exit 1; }

venv: $(PYTHON)

# torch first, pinned: its CPU wheel is what this machine has; a plain requirement would pull CUDA packages.
# Skipped when the environment already holds torch $(TORCH_VERSION) (read from its metadata: no torch import).
install: $(PYTHON)
	@if ! $(PYTHON) -c "import importlib.metadata as m, sys; \
		sys.exit(m.version('torch').split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "$(PIP_INSTALL) torch==$(TORCH_VERSION)"; $(PIP_INSTALL) torch==$(TORCH_VERSION); fi
	$(PIP_INSTALL) -e .

# Test-only: the multilingual base model (the `base` extra: its tests must run, not skip), the reference
# implementation without its dependencies (torch stays pinned), the few packages it imports, Debian's
# espeak-ng/sox/ffmpeg for speech and containers the tests make themselves, and chromium (headless) to load the
# report page.
install-test: install
	$(PIP_INSTALL) -e '.[test,base]'
	$(PIP_INSTALL) --no-deps openai-whisper==20250625
	@if ! command -v espeak-ng >/dev/null || ! command -v ffmpeg >/dev/null || ! command -v sox >/dev/null \
		|| ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq espeak-ng sox ffmpeg chromium >/dev/null; \
		else echo "warning: espeak-ng/sox/ffmpeg/chromium missing and not root: tests needing them will skip"; fi; fi

# Command one: the main job on the embedded default (local Ray, packaged tiny.en, example speech in examples/).
demo: install
	$(BIN)/whisper-batch run examples/manifest.jsonl -o $(OUT)
	$(BIN)/whisper-batch status $(OUT)
	$(BIN)/whisper-batch eval $(OUT)

# Command two: the linter (ruff, configured in pyproject.toml), then the whole test suite (real Ray, real S3 server
# on 127.0.0.1, real weights; no GPU needed).
# The environment's bin first on PATH, as when it is activated: the cluster tests' `ray start` and the jobs they run
# (`python -m whisper_batch.jobs.cli ...`) must find this environment's python, not the system's.
test: install-test
	$(PYTHON) -m ruff check .
	PATH="$(abspath $(BIN)):$$PATH" $(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(PYTHON) -m pytest $(PYTEST_FAST_ARGS)

# The lab (benchmarks/ is not installed): run from the repository root, as `python -m benchmarks.X`.
bench: install-test
	$(PYTHON) -m benchmarks.model_bench

# Everything a GPU must show, one table (CUDA tests, dev-set WER vs CPU fp32, large-v3 shapes fp16/bf16, CUDA graphs,
# HF generate); without CUDA it says so and runs the same script's CPU self-test (also run by `make test`). First the
# bundle (.gpu-bundle/: tiny.en, the decoded dev sets, wheels), which is also what the lent GPU machine gets
# (docs/gpu.md).
gpu-check: install-test
	$(PYTHON) -m benchmarks.gpu_bundle
	$(PYTHON) -m benchmarks.gpu_check --bundle .gpu-bundle

clean:
	rm -rf out .pytest_cache

# clean, and the project's own environment (never an active VIRTUAL_ENV elsewhere).
distclean: clean
	rm -rf .venv
