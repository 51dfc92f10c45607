# Two entry points, each doing all set-up on a fresh machine:
#   make run    install, fetch + convert the default model, run QuantSpec generation
#   make test   install, fetch + convert the default model, run the test suite
PYTHON ?= $(shell command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Write a short story about a lighthouse keeper who finds a message in a bottle.

.PHONY: run test setup model

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m qspec_jax.default_model

run: model
	$(PY) scripts/generate.py --speculative --chat --max-new-tokens 200 --prompt "$(PROMPT)"

# two workers (pytest-xdist): the CI machine has 2 cores; 12.4 vs 17.4 min for the suite (2026-11-26)
test: model
	QSPEC_REQUIRE_DEFAULT_MODEL=1 $(PY) -m pytest -q -n 2 tests
