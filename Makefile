# Two commands for a newcomer:
#   make demo   set up, then run the pipeline on the built-in synthetic data
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo test test-ray test-pacs bench docs docs-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/siimcovid run

test: install
	$(BIN)/python -m pytest -q -m "not pacs"

# the Ray tests (engine=ray on a local cluster on 127.0.0.1), with the optional ray extra
test-ray: install
	$(BIN)/pip install --quiet -e '.[test,ray]'
	$(BIN)/python -m pytest -q tests/test_ray_folds.py tests/test_ray_evolve.py

# the documentation site into site/ (its reference generated from the code; --strict: a broken link fails)
docs: install
	$(BIN)/pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# siimcovid serve against a real PACS (Orthanc in a network namespace of its own; root, and orthanc, orthanc-dicomweb,
# dcmtk installed: .ci/run installs them), about a minute; the tests skip and say why where they cannot run
test-pacs: install
	$(BIN)/python -m pytest -q -m pacs

bench: install
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_metric.py
	$(BIN)/python benchmarks/bench_fuse.py

clean:
	rm -rf runs data_yaml/*.yaml datasets
