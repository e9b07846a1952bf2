# medfound: `make demo` runs the whole pipeline on the bundled sample data; `make test` runs the tests.
# Both create (or update) the virtual environment in .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medfound-installed
MF     := $(BIN)/medfound
DEMO   := runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/tested.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints/tested.txt
	touch $@

demo: $(STAMP)
	rm -rf $(DEMO)
	$(MF) demo --out $(DEMO)   # the steps are medfound/demo.py's: shard, inspect, pretrain, finetune, evaluate, publish

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/mae_encoder_speed.py

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check medfound tests benchmarks

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
