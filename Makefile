# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the embedded default (captioned shapes)
#               (make demo-upsample: the same, then the 4x diffusion upsampler)
#   make test   the whole test suite (make test-fast: without the slow tests)
# Both create .venv and install the package only when setup.cfg changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)
WORKDIR ?= runs/demo
CONFIG ?= configs/demo.py
PYTEST_ARGS ?=

.PHONY: demo demo-upsample test test-fast bench venv clean

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

# The demo and the 4x diffusion upsampler after it (the demo's finished stages are kept).
demo-upsample: $(STAMP)
	$(PY) -m dalle_jax.tools.demo --config=$(CONFIG):upsample --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite without the tests marked slow (subprocess jobs, multi-process, training runs).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m dalle_jax.tools.bench all

clean:
	rm -rf $(VENV) runs .pytest_cache
