# The two set-up commands (see README): `make demo` and `make test`. Both create .venv on
# first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

lint: $(STAMP)
	$(PY) -m ruff check prunefx passes tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/reconfigure_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
