# Every target sets itself up from nothing: the first one creates .venv and installs the
# package with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SWEEP ?= default
FIG ?=
ARGS ?=

.PHONY: install test lint sweep figures bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

sweep: install
	$(BIN)/python -m sweeps run $(SWEEP) $(ARGS)

figures: install
	$(BIN)/python -m figures $(FIG) $(ARGS)

bench: install
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) results bench/out .pytest_cache .ruff_cache *.egg-info
