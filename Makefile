# Two commands on a fresh machine:  `make serve`  (serve the shipped checkpoint)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/shakespeare

.PHONY: serve test lint data clean-venv

$(BIN)/matta: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel, never a CUDA build.
	$(BIN)/pip install -q -e ".[serve,deploy,dev]"
	touch $(BIN)/matta

serve: $(BIN)/matta
	$(BIN)/matta serve checkpoints/default

$(DATA)/data.json: | $(BIN)/matta
	$(BIN)/matta data prepare --out $(DATA)

data: $(DATA)/data.json

lint: $(BIN)/matta
	$(BIN)/ruff check .

test: $(BIN)/matta $(DATA)/data.json lint
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
