# The project's own install steps: nothing is installed by hand.
#   make train   install minivq and Debian's Fashion-MNIST, then a short training run
#   make test    install minivq with its test extras, then the test suite
#
# Where it installs: into the virtual environment that is active, if one is; otherwise into
# .venv/ in this folder, made on first use. A stock Debian or Ubuntu python3 is "externally
# managed" (PEP 668) and refuses `pip install` outside a virtual environment, so none is
# installed into it. `make PYTHON=/path/to/python ...` picks an interpreter by hand.
SYSTEM_PYTHON ?= python3
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
PYTHON ?= .venv/bin/python
endif
PIP = $(PYTHON) -m pip
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STEPS ?= 300
OUT ?= runs/quickstart

.PHONY: install dataset train test test-all

# Debian ships `venv` without its pip bootstrap (package python3-venv): fetch it when missing.
.venv/bin/python:
	@$(SYSTEM_PYTHON) -m venv .venv 2>/dev/null || { rm -rf .venv; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(SYSTEM_PYTHON) -m venv .venv; }

dataset:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

install: dataset $(if $(filter .venv/bin/python,$(PYTHON)),.venv/bin/python)
	$(PIP) install -q -e ".[numba,test,mpi,threads]"

train: install
	$(PYTHON) -m minivq train --steps $(STEPS) --out $(OUT) --overwrite

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"
