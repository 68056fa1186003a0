# The two commands a new user needs:  make app   and   make test
# Each creates .venv and installs the project into it when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: app test bench clean-venv

app: $(STAMP)
	$(PY) app.py $(ARGS)

test: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
