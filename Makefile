# Two entry points: `make run` (train the quickstart job on a local Ray) and `make test`.
# Both create .venv and install the project into it when it is missing or older than
# pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/hetero_bg

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DATA)/dataset.json: | $(STAMP)
	$(BIN)/raysegbg data make hetero_bg --out $(DATA) --n 1000 --size 64 --seed 0

run: $(STAMP) $(DATA)/dataset.json
	$(BIN)/raysegbg train --config configs/quickstart.yaml --workers 2

# three pytest workers: the tests on the session's Ray run in order on one, those that start
# clusters of their own on another, the in-process tests fill in beside them (tests/conftest.py
# groups them); TEST_WORKERS=0 runs everything in this process
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

lint: $(STAMP)
	$(BIN)/ruff check raysegbg tests benchmarks
	$(BIN)/ruff format --check raysegbg tests benchmarks

clean:
	rm -rf $(VENV) runs data
