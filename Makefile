# The README's commands. Each creates the virtual environment first if it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench browser clean-var

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) manage.py migrate --verbosity 0
	$(PY) manage.py demo $(DEMO_ARGS)

browser:
	@bash scripts/ensure-chromium

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not browser and not worker and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy coordinator sitesagent

bench: $(STAMP)
	$(PY) bench/svt.py
	$(PY) bench/aggregate.py
	$(PY) bench/wire.py
	$(PY) bench/round_overhead.py
	$(PY) bench/live_metrics.py
	$(PY) bench/training_overhead.py
	$(PY) bench/dpsgd_step.py

clean-var:
	-$(PY) manage.py embedded_redis stop
	rm -rf var
