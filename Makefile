# encoder_guard: `make demo` and `make test` set everything up from nothing (venv, pip, Debian's data).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data test test-all demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

test: setup data
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow"

test-all: setup data
	$(PY) -m pytest -q

demo: setup data
	$(VENV)/bin/encoder-guard demo --out runs/demo

bench: setup data
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/knn_faiss_vs_sklearn.py

clean:
	rm -rf $(VENV) .pytest_cache
