# The project's own install steps: nothing is installed by hand.
#   make train   install minivq and Debian's Fashion-MNIST, then a short training run
#   make test    install minivq with its test extras, then the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STEPS ?= 300
OUT ?= runs/quickstart

.PHONY: install dataset train test test-all

dataset:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

install: dataset
	$(PIP) install -q -e ".[numba,test,mpi]"

train: install
	$(PYTHON) -m minivq train --steps $(STEPS) --out $(OUT)

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"
