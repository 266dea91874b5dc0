# One entry point for people and CI. `make companion` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PROFILE ?= companion
OUT     ?= book
JOBS    ?= 2
# torch goes in first, as the CPU wheel that CI uses (pip's find-links holds it on the CI machines); the
# package then asks only for torch>=2.1, which a CUDA build also satisfies. Elsewhere, pick the build:
# make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu (or .../whl/cu126 on a GPU node).
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=
SYSTEM_PACKAGES := dataset-fashion-mnist chromium

.PHONY: help setup system-deps companion html batch test test-fast lint bench clean
.DEFAULT_GOAL := help

help:                                 ## this list of targets (each one documented by its trailing comment)
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nbhelpers)"
	touch $@

setup: $(BIN)/.installed            ## virtualenv with the package, test and book tools

system-deps:                          ## Debian packages: Fashion-MNIST files, Chromium for the page checks
	@if [ "$$(dpkg-query -W -f='$${db:Status-Status}\n' $(SYSTEM_PACKAGES) 2>/dev/null | grep -c '^installed$$')" = "$(words $(SYSTEM_PACKAGES))" ] \
	    && command -v npm >/dev/null; then echo "system packages present: $(SYSTEM_PACKAGES) npm"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  command -v npm >/dev/null || apt-get install -y -qq npm >/dev/null; \
	else echo "skipping apt packages (not root or no apt): install $(SYSTEM_PACKAGES) and npm yourself"; fi

companion: setup system-deps          ## execute every notebook (companion profile) into book/ and build the HTML
	$(BIN)/python tools/build_book.py all --profile companion

html: setup                           ## rebuild only the HTML from the stored executed notebooks
	$(BIN)/python tools/build_book.py html

batch: setup                          ## run a profile as a batch, e.g. make batch PROFILE=paper OUT=/scratch/run1
	$(BIN)/python tools/build_book.py batch --profile $(PROFILE) --out $(OUT)

test: setup system-deps               ## what CI runs: the test suite (smoke profile included), then nbmake (ci profile)
	$(BIN)/python tools/make_smoke_assets.py >/dev/null
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup -q
	rm -rf notebooks/runs/ci
	NBHELPERS_PROFILE=ci OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) -q --nbmake notebooks/

test-fast: setup                      ## the test suite without the tests marked slow
	$(BIN)/python -m pytest -n $(JOBS) -q -m "not slow"

lint: setup                           ## ruff check and ruff format --check, as CI runs them
	$(BIN)/ruff check nbhelpers tests benchmarks tools
	$(BIN)/ruff format --check nbhelpers tests benchmarks tools

bench: setup                          ## every benchmark, ratios against plain references
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:                                ## remove the built HTML and pytest's cache
	rm -rf book/_build .pytest_cache
