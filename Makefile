# Two commands on a fresh machine:  `make run` (set up, convert the sample donor, serve it)
# and `make test` (set up, lint, run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(or $(XATL_DATA_DIR),../shared/data)
STAMP  := $(VENV)/.installed

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so that nothing later pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Serves two models: the donor rebuilt as-is (attention) and its linear-cost conversion (gated linear
# attention, Q/K/V transferred). The conversion writes well only after `xatl train`.
SAMPLE := $(DATA)/stories260K
run: $(STAMP)
	test -d data/models/stories260K || $(BIN)/xatl convert $(SAMPLE)/stories260K.bin \
		--tokenizer $(SAMPLE)/tok512.bin --mixer attention --out data/models/stories260K
	test -d data/models/stories260K-gla || $(BIN)/xatl convert $(SAMPLE)/stories260K.bin \
		--tokenizer $(SAMPLE)/tok512.bin --mixer gla --transfer xatl+qkv --out data/models/stories260K-gla
	$(BIN)/xatl serve

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	XATL_DATA_DIR=$${XATL_DATA_DIR:-$(abspath $(DATA))} $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
