# Two commands on a fresh machine:  `make run` (set up, start the service, run the sample job)
# and `make test` (set up, lint, run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The data folder (stories260K, TinyStories, ...): $XATL_DATA_DIR, else ../shared/data where it exists.
# Without one, `make test` skips the tests that need it and `make run` downloads the sample donor.
DATA   ?= $(or $(XATL_DATA_DIR),$(wildcard ../shared/data))
# PyPI's torch for Linux is the CUDA build (with triton and the nvidia-* packages, several GB): the
# CPU build comes from PyTorch's own index. Where that index is unreachable, pip's configured
# find-links or mirrors still serve a local CPU wheel. A GPU machine installs its CUDA build itself.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first (alone: its dependencies come from PyPI with the project's)
	$(BIN)/pip install -q --retries 1 --no-deps --index-url $(TORCH_INDEX) torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda and \
		f'torch {torch.__version__} is a CUDA build; the CPU install wants the CPU one from {\"$(TORCH_INDEX)\"}')"
	touch $(STAMP)

install: $(STAMP)

# The whole service on this machine (API, its own Redis, a local worker; files under data/), and the
# sample job: stories260K uploaded over REST, converted to gated linear attention, trained briefly
# (SAMPLE_TOKENS), evaluated beside the donor and served. Ctrl-C stops everything.
SAMPLE_TOKENS ?= 1600000
run: $(STAMP)
	$(BIN)/xatl sample $(if $(DATA),--data-dir $(DATA)) --link data/sample
	$(BIN)/xatl serve --data-dir data --sample-job data/sample --sample-tokens $(SAMPLE_TOKENS)

lint: $(STAMP)
	$(BIN)/ruff check .

# XATL_DATA_DIR reaches the tests only when there is a data folder: then a missing file fails its test.
test: lint
	$(if $(DATA),XATL_DATA_DIR=$(abspath $(DATA))) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
