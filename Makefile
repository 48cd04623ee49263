# make demo: the built-in demo pipeline (synthetic cameras, all four tasks) until Ctrl-C
# make test: the whole test suite against real Redis servers and real processes
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test install bench check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plantsight up --demo $(if $(DEMO_FOR),--for $(DEMO_FOR))

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	../shared/checks/pipeline
	../shared/checks/models

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
