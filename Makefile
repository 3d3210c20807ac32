# lth: `make demo` runs the embedded demo study through `dvc repro`; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup system-deps demo ui test test-fast bench clean

setup: $(STAMP)

# The venv is rebuilt only when the lock or the package metadata change, so a second `make setup` is instant.
$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Real Fashion-MNIST offline, from Debian's package (needs root; otherwise torchvision downloads it).
system-deps:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

demo: setup system-deps
	@start=$$(date +%s); \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc metrics show && \
	echo "demo finished in $$(( $$(date +%s) - start )) s: open reports/index.html; run 'make ui' for MLflow"

# MLflow's UI on 127.0.0.1:5000, opened on the study's runs (PORT=5001 make ui for another port).
ui: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/lth ui --port $(or $(PORT),5000) --open

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q

test-fast: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q -m "not e2e"

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks

clean:
	rm -rf data/prepared models results reports mlflow.db mlruns .dvc/tmp
