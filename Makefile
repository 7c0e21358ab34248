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

# The two largest zoo models (ViT-H/14, RegNetY-128GF, 2.5 GB of weights; up to ~6 GB at their peak; marker `huge`) run alone
# after the rest, so two of them, or one beside a busy worker, never share the memory.
# MALLOC_MMAP_THRESHOLD_ makes freed weights go back to the OS between tests.
test: $(STAMP) system-deps
	MALLOC_MMAP_THRESHOLD_=1048576 $(PY) -m pytest -n 2 --dist loadgroup -q -m "not huge" tests
	MALLOC_MMAP_THRESHOLD_=1048576 $(PY) -m pytest -q -m huge tests

# Debian packages the tests need: chromium (the inspector's HTML page is checked in a headless
# browser) and graphviz (`dot` draws the inspector's graph). Installed only when missing.
.PHONY: system-deps
system-deps:
	@if [ ! -x /usr/bin/chromium ] || ! command -v dot >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "installing chromium and graphviz (apt-get)"; \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium graphviz; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check prunefx passes tests examples benchmarks

# The benchmark suite (benchmarks/run_all.py): writes docs/performance.md and docs/img/perf_*.png
# (~15 min). bench-quick is the CI mode (< 3 min) and writes to $(BENCH_OUT) instead of docs/.
BENCH_OUT ?= /tmp/prunefx-bench
bench: $(STAMP)
	$(PY) -m pip install --quiet --no-deps "torch-pruning==1.6.1"  # the peer it is compared with (its torch is ours)
	$(PY) -m benchmarks

.PHONY: bench-quick
bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
