# The two commands a newcomer types: `make test` and `make demo`. Each sets up .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's machines `torch==2.13.0` is a CPU build on local disk; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy the unpinned requirement.
TORCH_SPEC ?= torch==2.13.0
# where this project's machines keep that wheel (used only if the folder exists)
WHEELS := $(wildcard /opt/wheels)

.PHONY: test demo bench tscd-then-dm setup clean-venv test-inception

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

# issue 17's pipeline: TSCD 8 -> 4 -> 2 then DMD2 on the same LoRA (tscd_then_dm.yaml), then the before/after table
# (digits-FID at 1, 2, 4 steps of the TSCD LoRA and of the refined LoRA, ratio to the teacher). A finished stage is
# reused. About 25 min training + 5-10 min scoring on 2 cores alone; STAGES_ARGS="--max_train_steps 20" and
# QUALITY_ARGS="--num_images 100 --batch_size 100" make a smoke run.
STAGES_OUT ?= runs/tscd_then_dm
STAGES_ARGS ?=
QUALITY_ARGS ?=
tscd-then-dm: setup
	HF_HUB_OFFLINE=1 $(PY) -m stepdistill train --config train_scripts/configs/tiny_digits/tscd_then_dm.yaml \
		--output_dir $(STAGES_OUT) $(STAGES_ARGS)
	HF_HUB_OFFLINE=1 $(PY) eval/stages_quality.py $(STAGES_OUT) --output_json $(STAGES_OUT)/quality.json $(QUALITY_ARGS)

clean-venv:
	rm -rf $(VENV)

# A separate lane, not part of `make test` or CI: Inception FID/KID and open_clip need torchvision, which does not
# import beside the CPU torch 2.13 build; torch 2.14.1 + torchvision 0.29.1 (on this project's machines' disk) do.
# Own venv; the tests marked `inception` build the Inception network with random weights (no download) and check the
# resizes, crop and CLIP preprocessing against torchvision, clean-fid and open_clip themselves.
INCEPTION_VENV ?= .venv-inception
INCEPTION_TORCH ?= torch==2.14.1 torchvision==0.29.1
IPY := $(INCEPTION_VENV)/bin/python
# clean-fid and open_clip_torch are the papers' own libraries, installed only as the references the lane checks our
# resize, crop and CLIP inputs against (stepdistill itself computes through torchmetrics and transformers)

$(INCEPTION_VENV)/.installed: pyproject.toml
	test -x $(IPY) || $(PYTHON) -m venv $(INCEPTION_VENV)
	$(IPY) -m pip install -q --upgrade pip
	$(IPY) -m pip install -q $(INCEPTION_TORCH)
	$(IPY) -m pip install -q -e ".[dev,fid]"
	$(IPY) -m pip install -q clean-fid open_clip_torch
	touch $@

test-inception: $(INCEPTION_VENV)/.installed
	HF_HUB_OFFLINE=1 $(IPY) -m pytest -q -m inception
