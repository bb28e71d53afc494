# The two commands a newcomer types: `make test` and `make demo`. Each sets up .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's machines `torch==2.13.0` is a CPU build on local disk; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy the unpinned requirement.
TORCH_SPEC ?= torch==2.13.0
# where this project's machines keep that wheel (used only if the folder exists)
WHEELS := $(wildcard /opt/wheels)

.PHONY: test demo bench setup clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(WHEELS),--find-links $(WHEELS)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/stepdistill demo --output_dir runs/demo

# every method on tiny-digits with its shipped config -> bench/RESULTS.md, results.json, fid_vs_nfe.png
# (BENCH_BUDGET=full: the shipped configs, hours on 2 cores; quick: a tenth of the iterations)
BENCH_BUDGET ?= full
bench: setup
	HF_HUB_OFFLINE=1 $(PY) eval/bench_methods.py --budget $(BENCH_BUDGET)

clean-venv:
	rm -rf $(VENV)
