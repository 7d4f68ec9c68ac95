# One entry point for humans and CI. `make setup` builds .venv from the repo's files only.
VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
BFCL_EVAL := bfcl-eval==2026.3.23

.PHONY: setup demo sweep-demo test test-gpu wheels wheel-list wheels-gpu lease-wheels assets bench clean

# The pinned uv installs the same pinned wheels pip would, from the same places: 16 s (21 s with its cache empty) where
# pip took 75 s in a fresh clone on the 2-core machine (2026-12-01). It does not read pip's configuration, so pip's
# find-links and index-url (this machine's CPU torch wheel, a company mirror) are passed on.
# `make setup INSTALLER=pip` installs with pip instead.
INSTALLER ?= uv
UV := uv==0.13.9
PIP_SETTING = $(strip $(1) $(shell python3 -m pip config get global.$(2) 2>/dev/null))
UV_SOURCES = $(foreach d,$(sort $(call PIP_SETTING,$(PIP_FIND_LINKS),find-links)),--find-links $(d)) \
             $(foreach u,$(firstword $(call PIP_SETTING,$(PIP_INDEX_URL),index-url)),--index-url $(u))
PIP_INSTALL = $(PY) -m pip install --quiet --disable-pip-version-check --no-compile

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	python3 -m venv $(VENV)
	# The pinned stack, then bfcl-eval without its dependencies: it ships the BFCL v4 data and the official checker; its
	# own dependencies are 6 GB and unused here.
ifeq ($(INSTALLER),uv)
	$(PIP_INSTALL) $(UV)
	$(VENV)/bin/uv pip install --quiet --python $(PY) $(UV_SOURCES) -r requirements.txt -c constraints.txt
	$(VENV)/bin/uv pip install --quiet --python $(PY) $(UV_SOURCES) --no-deps $(BFCL_EVAL)
else
	$(PIP_INSTALL) -r requirements.txt -c constraints.txt
	$(PIP_INSTALL) --no-deps $(BFCL_EVAL)
endif
	touch $@

# No bytecode is compiled at install (--no-compile; compiling all of .venv took 37 s): Python compiles each module the
# first time it is imported and keeps it, so the first command pays about 15 s once. That needs bytecode writing on,
# which some machines turn off (PYTHONDONTWRITEBYTECODE=1 here): without it every process would compile again.
unexport PYTHONDONTWRITEBYTECODE

# Tiny Qwen2-architecture model, tokenizer and xlam-schema sample data (deterministic, offline). DEMO_SEED changes the
# training rows, the tokenizer, the model's initial weights and the training seed; never the held-out questions.
DEMO_SEED ?= 0
assets: setup
	$(PY) make_demo_assets.py --out demo_assets --seed $(DEMO_SEED)

# The main job on the offline default: FSDP across 2 CPU processes, then BFCL-style eval before/after, then the
# before/after table and its pictures (runs/demo_cpu/before_after.png, loss_curve.png).
# 160 new tokens: the longest held-out answer (3 parallel calls) is 99 tokens, as make_demo_assets.py prints;
# tests/test_demo.py checks the bound.
DEMO_MAX_NEW_TOKENS := 160
DEMO_EVAL = $(PY) eval_bfcl.py --data-dir demo_assets/bfcl_heldout --categories all --max-new-tokens $(DEMO_MAX_NEW_TOKENS) --overwrite
demo: assets
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_fsdp_full.yaml train_sft.py recipes/demo_cpu.yaml --seed $$((42 + $(DEMO_SEED)))
	$(DEMO_EVAL) --model demo_assets/tiny-qwen2 --output-dir runs/demo_eval/before > runs/demo_eval_before.log
	$(DEMO_EVAL) --model runs/demo_cpu --output-dir runs/demo_eval/after > runs/demo_eval_after.log
	$(PY) demo_report.py --run runs/demo_cpu --before runs/demo_eval/before --after runs/demo_eval/after

# The study's sweep runner on the offline default: a baseline and two learning rates of the tiny model, scored on a few
# BFCL prompts, into runs/sweeps/demo_cpu/ (results.md, results.csv, plots). Run again, it skips what is done.
sweep-demo: assets
	$(PY) sweep.py sweeps/demo_cpu.yaml

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Tests marked `gpu`: real runs on the GPUs present (skipped without CUDA). On a GPU node whose Python already has the
# stack (e.g. installed from wheelhouse/), skip the venv: `make test-gpu PY=python3`.
test-gpu:
	$(PY) -m pytest -q -m gpu -rs tests

# Offline install bundle for GPU nodes without internet: every pinned wheel except torch (the node keeps its CUDA
# build), for the node's Python and platform. Install there with
#   pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
# ONLY="trl datasets" restricts it to some packages (what a node's image lacks).
WHEEL_PYTHON ?= 3.11
WHEEL_PLATFORM ?= x86_64
WHEELHOUSE ?= wheelhouse
ONLY ?=
PLATFORM_TAGS = $(foreach n,17 24 27 28 31 34 35,--platform manylinux_2_$(n)_$(WHEEL_PLATFORM)) --platform manylinux2014_$(WHEEL_PLATFORM) --platform any
WHEEL_ARGS = --disable-pip-version-check --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) --implementation cp $(PLATFORM_TAGS)

wheels: wheel-list
	python3 -m pip download $(WHEEL_ARGS) -d $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt
	python3 -m pip download $(WHEEL_ARGS) -d $(WHEELHOUSE) $(BFCL_EVAL)
	echo "$(BFCL_EVAL)  # install with --no-deps" > $(WHEELHOUSE)/README.txt
	@echo "wheels: $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels in $(WHEELHOUSE)/ for Python $(WHEEL_PYTHON) on $(WHEEL_PLATFORM)"

# requirements.txt + constraints.txt pin the whole dependency closure; torch stays out (the node keeps its own).
wheel-list:
	mkdir -p $(WHEELHOUSE)
	grep -hE '^[A-Za-z0-9_.-]+==' requirements.txt constraints.txt | grep -viE '^torch==' \
	  | awk -F== -v only="$(ONLY)" 'BEGIN{n=split(tolower(only),o," ");for(i=1;i<=n;i++)keep[o[i]]=1} \
	      !seen[tolower($$1)]++ && (n==0 || keep[tolower($$1)])' > $(WHEELHOUSE)/requirements.txt

# The optional GPU extras (QLoRA's bitsandbytes, Liger kernels) as their own set.
wheels-gpu:
	mkdir -p $(WHEELHOUSE)/gpu
	grep -hE '^[A-Za-z0-9_.-]+==' requirements-gpu.txt > $(WHEELHOUSE)/gpu/requirements.txt
	python3 -m pip download $(WHEEL_ARGS) -d $(WHEELHOUSE)/gpu -r $(WHEELHOUSE)/gpu/requirements.txt
	@echo "wheels-gpu: $$(ls $(WHEELHOUSE)/gpu/*.whl | wc -l) wheels in $(WHEELHOUSE)/gpu/"

# The wheelhouse the GPU lease carries (benchmarks/LEASE.md): what the device's Python 3.12 image lacks or has at
# other versions, plus the GPU extras. Run on a machine with network, then carry wheelhouse/ into the device call.
lease-wheels:
	$(MAKE) wheels WHEEL_PYTHON=3.12 ONLY="trl datasets dill multiprocess transformers peft fsspec"
	$(MAKE) wheels-gpu WHEEL_PYTHON=3.12

clean:
	rm -rf runs demo_assets
