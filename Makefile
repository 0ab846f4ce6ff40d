# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv/ through `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-alibi bench bench-drift bench-probing bench-resource bench-replay clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/inferwatch demo --duration $${DURATION:-60}

# Two test processes (each with its own broker): much of the suite waits on daemons, brokers and
# group joins. --dist loadfile keeps a file's tests (and its module fixtures) in one process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The alibi-detect adapter is tested in a venv of its own: alibi-detect 0.13 pins numpy<2 (so river
# 0.23), which the main venv's river 0.26 cannot share. About 1 GB; built once, then reused.
ALIBI_VENV := .venv-alibi
ALIBI_STAMP := $(ALIBI_VENV)/.installed

$(ALIBI_STAMP): pyproject.toml
	test -x $(ALIBI_VENV)/bin/python || $(PYTHON) -m venv $(ALIBI_VENV)
	$(ALIBI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ALIBI_VENV)/bin/python -m pip install --quiet -e '.[alibi,dev]'
	touch $(ALIBI_STAMP)

test-alibi: $(ALIBI_STAMP)
	$(ALIBI_VENV)/bin/python -m pytest -q tests/alibi $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/throughput.py

bench-drift: install
	$(BIN)/python bench/drift_quality.py

bench-probing: install
	$(BIN)/python bench/probing_quality.py

bench-resource: install
	$(BIN)/python bench/resource_quality.py

bench-replay: install
	$(BIN)/python bench/replay.py

clean:
	rm -rf $(VENV) $(ALIBI_VENV) build *.egg-info .pytest_cache
