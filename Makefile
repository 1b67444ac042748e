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
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo:
	@echo "make demo: the end-to-end context-extension study is not built yet." >&2
	@exit 1

clean:
	rm -rf $(VENV) *.egg-info
