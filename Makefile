# The two commands: `make demo` and `make test`. Both create .venv when it is missing and install the
# package with its dependencies; a second run installs nothing (the stamp is newer than its inputs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hpcvid-installed

.PHONY: demo test install system clean-venv

$(STAMP): setup.cfg pyproject.toml requirements-local.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-local.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

system:
	bash slurm/system-packages.sh

demo: install
	$(BIN)/hpcvid demo

test: install system
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
