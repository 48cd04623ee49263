# make demo: the built-in demo pipeline (synthetic cameras, all four tasks) until Ctrl-C
# make test: lint (ruff, the import-layer contracts), then the whole test suite against real Redis servers
#            and real processes
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo demo-models test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plantsight up --demo $(if $(DEMO_FOR),--for $(DEMO_FOR))

# Trained models for the demo, from synthetic data, into the user's cache (the demo uses them when there).
DEMO_MODELS ?= $(or $(PLANTSIGHT_DEMO_MODELS),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/plantsight/demo-models)
demo-models: $(STAMP)
	for t in classify detect segment thermal; do \
	  $(VENV)/bin/plantsight synth $$t --out $(DEMO_MODELS)/data-$$t --n 400 --seed 0 && \
	  $(VENV)/bin/plantsight train $$t --data $(DEMO_MODELS)/data-$$t --out $(DEMO_MODELS)/$$t || exit 1; \
	done

# Code style and import order, and the layers: bench -> services -> shared, service packages independent.
lint: $(STAMP)
	$(VENV)/bin/ruff check services shared bench tests
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
