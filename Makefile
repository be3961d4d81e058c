# Two commands on a fresh machine:  `make serve`  (serve the shipped checkpoint)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/shakespeare

.PHONY: serve test lint data clean-venv

# Serving needs only the serve extra; the tests also need the deploy (Ray, locust) and dev extras.
$(VENV)/.serve-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU wheel, never a CUDA build.
	$(BIN)/pip install -q -e ".[serve]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.serve-installed
	$(BIN)/pip install -q -e ".[serve,deploy,dev]"
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/matta serve checkpoints/default

$(DATA)/data.json: | $(VENV)/.dev-installed
	$(BIN)/matta data prepare --out $(DATA)

data: $(DATA)/data.json

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(VENV)/.dev-installed $(DATA)/data.json lint
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
