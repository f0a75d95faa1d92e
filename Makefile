# The two commands (see README): `make demo` and `make test`. Both are idempotent:
# they create .venv at the repository root on first use and reinstall only when
# pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject: here it resolves to the CPU wheel on disk.
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# one Ray session and one actor pool for the three studies, then their report (in the
	# same process: `hypersweep report results/demo results/demo-hpo results/demo-blackbox
	# --out results/demo-report` writes the same files)
	$(BIN)/hypersweep run configs/demo.yaml configs/demo_hpo.yaml configs/demo_blackbox.yaml \
	  --report results/demo-report

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf results .pytest_cache
