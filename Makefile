# The two commands a newcomer runs on a fresh machine:
#   make demo   installs what it needs, then runs the quickstart pipeline on embedded defaults, a second
#               run of it, and serves the result with a canary rollout (infra/local/demo.sh)
#   make test   installs what it needs, then runs every test that can run on a 2-core CPU machine
# Both are idempotent: a second run reuses .venv and only reinstalls when pyproject.toml changed.

VENV ?= .venv
VENV_QUANTIZE ?= .venv-quantize
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint install install-test install-quantize clean

demo: install
	VENV=$(VENV) bash infra/local/demo.sh

test: install-test
	$(BIN)/ruff check platform operators jobs tests benchmarks
	$(BIN)/mypy
	PYTHONPATH=platform:operators $(BIN)/lint-imports
	$(BIN)/python -m pytest --timeout=1200 -ra $(PYTEST_ARGS) || { bash infra/local/ray-failure-tail.sh; exit 1; }

lint: install-test
	$(BIN)/ruff check platform operators jobs tests benchmarks
	$(BIN)/mypy
	PYTHONPATH=platform:operators $(BIN)/lint-imports

install:
	bash infra/local/install.sh core

install-test:
	bash infra/local/install.sh test

# Only the quantize stage's environment (llm-compressor); install and install-test build it too.
install-quantize:
	bash infra/local/install.sh quantize

clean:
	rm -rf $(VENV) $(VENV_QUANTIZE) .kubeforge .pytest_cache .mypy_cache .ruff_cache
