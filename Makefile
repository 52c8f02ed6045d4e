# The two README commands: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
DEMO_DIR ?= demo

.PHONY: setup test demo bench clean

setup: .setup-stamp

.setup-stamp: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $@

test: setup
	$(PYTHON) -m pytest -q

# The CPU demo is a packaged experiment (amrseg/experiments/demo.yaml: emoji-VOC; fashion.yaml: the smaller
# Fashion-MNIST one, `amrseg run fashion`); PRESET=amr make demo: another preset.
demo: setup
	$(PYTHON) -m amrseg run demo --out $(DEMO_DIR) $(if $(PRESET),--set preset=$(PRESET))

# The README's figures: the full emoji benchmark (10,000 scenes, five presets) takes hours on a 2-core
# CPU; `python bench/quality.py --help` for a smaller run (--train, --presets).
bench: setup
	$(PYTHON) bench/quality.py
	$(PYTHON) bench/speed.py

clean:
	rm -rf .setup-stamp build *.egg-info .pytest_cache $(DEMO_DIR)
