# One entry point for people and CI. `make companion` and `make test` work on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PROFILE ?= companion
OUT     ?= book
JOBS    ?= 2

.PHONY: setup system-deps companion html batch test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev,book]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nbhelpers)"
	touch $@

setup: $(BIN)/.installed            ## virtualenv with the package, test and book tools

system-deps:                          ## Debian packages: Fashion-MNIST files, Chromium for the page checks
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null; \
	  command -v npm >/dev/null || apt-get install -y -qq npm >/dev/null; \
	else echo "skipping apt packages (not root or no apt): install dataset-fashion-mnist and chromium yourself"; fi

companion: setup system-deps          ## execute every notebook (companion profile) into book/ and build the HTML
	$(BIN)/python tools/build_book.py all --profile companion

html: setup                           ## rebuild only the HTML from the stored executed notebooks
	$(BIN)/python tools/build_book.py html

batch: setup                          ## run a profile as a batch, e.g. make batch PROFILE=paper OUT=/scratch/run1
	$(BIN)/python tools/build_book.py batch --profile $(PROFILE) --out $(OUT)

test: setup system-deps               ## the full test suite (what CI runs)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadgroup -q

test-fast: setup                      ## skip tests marked slow
	$(BIN)/python -m pytest -n $(JOBS) -q -m "not slow"

lint: setup
	$(BIN)/ruff check nbhelpers tests benchmarks tools
	$(BIN)/ruff format --check nbhelpers tests benchmarks tools

bench: setup                          ## every benchmark, ratios against plain references
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf book/_build .pytest_cache
