# One entry point for humans and CI. `make setup` builds .venv from the repo's files only.
VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
BFCL_EVAL := bfcl-eval==2026.3.23

.PHONY: setup demo test assets bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	# bfcl-eval ships the BFCL v4 data and the official checker; its own dependencies are 6 GB and unused here.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(BFCL_EVAL)
	touch $@

# Tiny Qwen2-architecture model, tokenizer and xlam-schema sample data (deterministic, offline).
assets: setup
	$(PY) make_demo_assets.py --out demo_assets

# The main job on the offline default: FSDP across 2 CPU processes, then BFCL-style eval before/after.
demo: assets
	$(ACCELERATE) launch --config_file accelerate_configs/cpu_fsdp_full.yaml train_sft.py recipes/demo_cpu.yaml
	$(PY) eval_bfcl.py --model demo_assets/tiny-qwen2 --data-dir demo_assets/bfcl_heldout --categories all --max-new-tokens 64 --overwrite --output-dir runs/demo_eval/before
	$(PY) eval_bfcl.py --model runs/demo_cpu --data-dir demo_assets/bfcl_heldout --categories all --max-new-tokens 64 --overwrite --output-dir runs/demo_eval/after
	$(PY) eval_bfcl.py compare runs/demo_eval/before runs/demo_eval/after --plot runs/demo_eval/compare.png

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs demo_assets
