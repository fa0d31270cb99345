# Two entry points, both self-contained on a fresh machine:
#   make demo   installs everything into .venv and runs the main job
#   make test   installs everything into .venv and runs lint, type checks and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo bench loadtest test lint typecheck pytest proto clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,loadtest]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/midx-sampler demo

bench: $(STAMP)
	$(BIN)/midx-sampler bench --markdown docs/benchmarks.md

# A 5-minute load test against a server on loopback; the report goes to out/loadtest.
loadtest: $(STAMP)
	$(BIN)/python loadtest/run.py --run-time-seconds 300 --out out/loadtest

lint: $(STAMP)
	$(BIN)/ruff check service client tests scripts loadtest
	$(BIN)/ruff format --check service client tests scripts loadtest

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py
