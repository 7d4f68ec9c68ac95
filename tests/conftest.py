"""Shared fixtures: the offline assets built once per session, and helpers that run the real commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


def run(cmd, check=True, timeout=600, **kwargs):
    """Run a command in the repo root; on failure show its output in the assertion message."""
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """demo_assets built by the repo's own script: tiny Qwen2 model, xLAM sample, BFCL-format held-out split."""
    out = tmp_path_factory.mktemp("assets")
    run([PYTHON, "make_demo_assets.py", "--out", out])
    return out


@pytest.fixture
def demo_recipe(assets, tmp_path):
    """Write recipes/demo_cpu.yaml pointed at the session's assets and tmp_path, with overrides."""

    def write(**overrides):
        recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
        recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                      output_dir=str(tmp_path / "out"), report_to=["none"])  # tests opt in to W&B
        recipe.update(overrides)
        path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*')))}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present (make test-gpu); elsewhere they are skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
