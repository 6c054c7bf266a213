# lipbench: `make suite` runs the main job (two-moons by default), `make test` runs the tests.
# Both install into .venv first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUITE  ?= moons
RESULTS ?= results
WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: install suite test table report clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

suite: install
	$(BIN)/bench suite $(SUITE) --results $(RESULTS) --workers $(WORKERS)

test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15

# `make table SUITE=cifar10 TABLE_ARGS="--vs-paper --per-seed"`; `make report SUITE=...` writes report.md
table: install
	$(BIN)/bench table $(RESULTS) $(if $(filter-out moons,$(SUITE)),--suite $(SUITE),) $(TABLE_ARGS)

report: install
	$(BIN)/bench report $(SUITE) --results $(RESULTS)

clean-venv:
	rm -rf $(VENV)
