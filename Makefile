# The two set-up commands of a fresh machine: `make quickstart` and `make test`.
# torch is pinned to 2.13.0: on the course's CPU machines that is the local CPU wheel; any other
# spec pulls a multi-GB CUDA build. On a GPU machine with torch already installed, skip the pin
# with `make quickstart TORCH=`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/tunebench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install quickstart test
install: $(BIN)/tunebench

quickstart: install
	$(BIN)/tunebench quickstart

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest
