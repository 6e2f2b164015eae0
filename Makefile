# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the embedded default (captioned shapes)
#   make test   the whole test suite
# Both create .venv and install the package only when setup.cfg changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)
WORKDIR ?= runs/demo
CONFIG ?= configs/shapes.py
PYTEST_ARGS ?=

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "dall-e==0.1"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) -m dalle_jax.tools.demo --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m dalle_jax.tools.bench_input --config=configs/bench_input.py

clean:
	rm -rf $(VENV) runs .pytest_cache
