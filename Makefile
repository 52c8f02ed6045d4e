# The two README commands: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
DEMO_DIR ?= demo

.PHONY: setup test test-all demo bench clean

setup: .setup-stamp

.setup-stamp: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $@

test: setup
	$(PYTHON) -m pytest -q

test-all: setup
	$(PYTHON) -m pytest -q --runslow

demo: setup
	PYTHON=$(PYTHON) bash scripts/demo.sh $(DEMO_DIR)

bench: setup
	$(PYTHON) bench/quality.py
	$(PYTHON) bench/speed.py

clean:
	rm -rf .setup-stamp build *.egg-info .pytest_cache $(DEMO_DIR)
