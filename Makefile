# make demo: the built-in demo pipeline (synthetic cameras, all four tasks) until Ctrl-C
# make test: lint (ruff, the import-layer contracts), then the whole test suite against real Redis servers
#            and real processes
# make test-quality: the training goals on photographs that take longer than make test allows
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo demo-models test test-quality lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plantsight up --demo $(if $(DEMO_FOR),--for $(DEMO_FOR))

# Rebuild the demo's trained models in shared/demo_models/ (synthetic data, fixed seeds; a few minutes).
demo-models: $(STAMP)
	$(PY) -m shared.training.demo_models

# Code style and import order, and the layers: bench -> services -> shared, service packages independent.
lint: $(STAMP)
	$(VENV)/bin/ruff check services shared bench tests
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The training goals that take longer than make test allows (about ten minutes on two CPU cores).
test-quality: $(STAMP)
	$(PY) -m pytest -m quality $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
