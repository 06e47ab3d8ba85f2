# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# .venv and install vitzoo with the pinned versions of constraints.txt first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint errors-doc blocks-doc timm-suite clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

# docs/errors.md: each refused input and its message, as the tests that record them (bad_input) saw them.
errors-doc: $(STAMP)
	VITZOO_ERRORS_DOC=docs/errors.md $(BIN)/python -m pytest -q $$(grep -l "bad_input(" tests/test_*.py)

# docs/blocks.md: every slot, entry and option, from the block tables (a test fails when it is stale).
blocks-doc: $(STAMP)
	$(BIN)/python -m vitzoo.blocks.catalog docs/blocks.md

# docs/parity.md, section "timm's own model tests": timm's tests/test_models.py on every name vitzoo shares
# with timm: 2,718 cases, many hours on CPU (a day on two busy cores). Resumable: finished cases are kept
# in docs/timm_suite.jsonl (delete it to start over).
timm-suite: $(STAMP)
	$(BIN)/python tests/upstream/run_timm_suite.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
