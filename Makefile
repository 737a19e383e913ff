# Set-up and entry points. Every target installs what it needs, so each works on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= out/demo

.PHONY: install install-test demo test test-fast bench gpu-check clean

# torch first, pinned: its CPU wheel is what this machine has; a plain requirement would pull CUDA packages.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .

# Test-only: the multilingual base model (the `base` extra: its tests must run, not skip), the reference
# implementation without its dependencies (torch stays pinned), the few packages it imports, Debian's
# espeak-ng/sox/ffmpeg for speech and containers the tests make themselves, and chromium (headless) to load the
# report page.
install-test: install
	$(PIP) install -q -e '.[test,base]'
	$(PIP) install -q --no-deps openai-whisper==20250625
	@if ! command -v espeak-ng >/dev/null || ! command -v ffmpeg >/dev/null || ! command -v sox >/dev/null \
		|| ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq espeak-ng sox ffmpeg chromium >/dev/null; \
		else echo "warning: espeak-ng/sox/ffmpeg/chromium missing and not root: tests needing them will skip"; fi; fi

# Command one: the main job on the embedded default (local Ray, packaged tiny.en, example speech in examples/).
demo: install
	whisper-batch run examples/manifest.jsonl -o $(OUT)
	whisper-batch status $(OUT)
	whisper-batch eval $(OUT)

# Command two: the whole test suite (real Ray, real S3 server on 127.0.0.1, real weights; no GPU needed).
test: install-test
	$(PYTHON) -m pytest -m "not gpu and not wip" -q -rs --durations=15

test-fast: install-test
	$(PYTHON) -m pytest -m "not gpu and not integration and not slow" -q

bench: install-test
	$(PYTHON) -m benchmarks.model_bench

# Everything a GPU must show, one table (CUDA tests, dev-set WER vs CPU fp32, large-v3 shapes fp16/bf16, CUDA graphs,
# HF generate); without CUDA it says so and runs the same script's CPU self-test (also run by `make test`).
gpu-check: install-test
	$(PYTHON) -m benchmarks.gpu_check

clean:
	rm -rf out .pytest_cache
