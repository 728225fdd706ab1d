# Two commands on a fresh clone:  `make run` (set up + whole pipeline)  and  `make test` (set up + tests).
# Both create .venv if it is missing and install llmpipe into it (once; again when pyproject changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmpipe-installed
# torch==2.13.0 resolves to the CPU wheel on this machine. Elsewhere, for a CPU-only box, use e.g.
#   make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: install run test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_PIP_ARGS) torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llmpipe run

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The quick lane while editing: everything but the end-to-end tests marked `slow` (CI runs `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

bench: $(STAMP)
	-$(BIN)/python benchmarks/ingest_normalize.py
	-$(BIN)/python benchmarks/dedup.py
	-$(BIN)/python benchmarks/tokenizer.py
	-$(BIN)/python benchmarks/pretrain.py
	-$(BIN)/python benchmarks/recipe.py
	-$(BIN)/python benchmarks/generate.py

clean:
	rm -rf data reports plots metrics dvc.lock .llmpipe
