# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench-ingest clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ferray demo

# CI's suite: everything but the multi-minute end-to-end tests (marked `slow`), to stay under 20 minutes.
test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" --durations=15

# Everything, the slow tests included (~37 minutes on 2 CPUs).
test-all: $(STAMP)
	$(VENV)/bin/pytest -q --durations=25

bench-ingest: $(STAMP)
	$(VENV)/bin/python bench/ingest.py

clean:
	rm -rf $(VENV) ferray-demo .pytest_cache
