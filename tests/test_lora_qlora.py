"""LoRA and QLoRA: the rank series as recipe overrides, adapters under FSDP2 that keep every rank's shard in each
checkpoint and through a kill and resume (conftest's lora_fsdp_runs: two real 2-process launches and a resume), and
QLoRA's launch checks, which stop before any data or model is loaded and so run on CPU."""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import LORA_KILL_AFTER, PYTHON, REPO, run, tiny_linear_layers
from safetensors.torch import load_file, save_file

from fcsft import callbacks
from fcsft import recipe as fcsft_recipe

SERIES = yaml.safe_load((REPO / "sweeps" / "phase4_lora_ranks.yaml").read_text())


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


# --- the rank series ------------------------------------------------------------------------------------------------


def test_rank_series_points_are_valid_overrides_with_alpha_tied_to_rank():
    recipe = yaml.safe_load((REPO / SERIES["recipe"]).read_text())
    assert recipe["lora_alpha"] == 2 * recipe["lora_r"]  # the tie the recipe documents
    assert [p["lora_r"] for p in SERIES["points"]] == [8, 16, 32, 64]
    assert (REPO / SERIES["accelerate_config"]).is_file()
    for point in SERIES["points"]:
        overrides = [x for key, value in point.items() for x in (f"--{key}", str(value))]
        # train_sft.py's own parser, as the sweep's command line gives it (bf16 off: there is no GPU here)
        _, _, model_args = fcsft_recipe.parse_recipe([str(REPO / SERIES["recipe"]), *overrides, "--bf16", "false"])
        assert model_args.use_peft and model_args.lora_r == point["lora_r"]
        assert model_args.lora_alpha == 2 * model_args.lora_r


# --- adapters under FSDP2: every rank's shard, every checkpoint, kill and resume ---------------------------------------


def test_every_checkpoint_and_the_final_adapter_hold_every_ranks_shard(lora_fsdp_runs, assets):
    from transformers import AutoModelForCausalLM

    out = lora_fsdp_runs["reference"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["sharding"]["mesh_shape"] == [2] and summary["num_processes"] == 2
    r = SERIES["points"][0]["lora_r"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (r, 2 * r)
    for folder in (out / "checkpoint-8", out / "checkpoint-12", out):
        tensors = adapter(folder)
        assert len(tensors) == 2 * tiny_linear_layers(assets), folder
        assert all(min(t.shape) == r for t in tensors.values()), folder  # full shapes, not a rank's half
        # FSDP2 shards dim 0 over the 2 ranks; lora_B starts at zero, so a half that was lost or reset stays zero
        for name, t in tensors.items():
            if "lora_B" in name:
                half = t.shape[0] // 2
                assert t[:half].abs().sum() > 0 and t[half:].abs().sum() > 0, f"{folder}: {name}"
    # the sharded state the trainer resumes from has a file from each rank, next to the gathered adapter
    assert sorted(p.name for p in (out / "checkpoint-8" / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    final, last = adapter(out), adapter(out / "checkpoint-12")
    assert all(torch.equal(final[k], last[k]) for k in final)  # the last checkpoint is the final model
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers with peft installed
    assert sum("lora_B" in n for n, _ in model.named_parameters()) == tiny_linear_layers(assets)


def test_killed_and_resumed_adapter_equals_the_uninterrupted_one(lora_fsdp_runs):
    reference, resumed = lora_fsdp_runs["reference"], lora_fsdp_runs["resumed"]
    assert f"resume: continuing from {resumed / LORA_KILL_AFTER}" in lora_fsdp_runs["stderr"]
    # the adapter before the kill equals the uninterrupted run's at the same step ...
    before, same_step = adapter(resumed / LORA_KILL_AFTER), adapter(reference / LORA_KILL_AFTER)
    assert before.keys() == same_step.keys() and all(torch.equal(before[k], same_step[k]) for k in before)
    # ... and after resuming, training continues exactly: same losses, same final adapter
    losses = lambda out: {h["step"]: h["loss"] for h in json.loads((out / "run_summary.json").read_text())["log_history"]  # noqa: E731
                          if "loss" in h}
    expected, got = losses(reference), losses(resumed)
    for step in range(9, 13):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    final, uninterrupted = adapter(resumed), adapter(reference)
    assert final.keys() == uninterrupted.keys()
    for name in final:
        torch.testing.assert_close(final[name], uninterrupted[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_partial_adapter_stops_every_rank(tmp_path):
    """The guard behind the checkpoints above: an adapter saved with a rank's half of a tensor is refused."""
    params = [torch.nn.Parameter(torch.zeros(8, 16)), torch.nn.Parameter(torch.zeros(16, 8)),
              torch.nn.Parameter(torch.zeros(16, 16), requires_grad=False)]
    trainer = SimpleNamespace(model=SimpleNamespace(parameters=lambda: iter(params)),
                              accelerator=SimpleNamespace(is_main_process=True, num_processes=1))
    save_file({"a.lora_A.weight": torch.zeros(8, 16), "a.lora_B.weight": torch.zeros(16, 8)},
              tmp_path / "adapter_model.safetensors")
    callbacks.check_saved_adapter(trainer, tmp_path)  # complete: passes
    save_file({"a.lora_A.weight": torch.zeros(8, 16), "a.lora_B.weight": torch.zeros(8, 8)},  # rank 0's rows only
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match=f"the adapter saved in {tmp_path} lacks 1 of the 2 trained tensors"):
        callbacks.check_saved_adapter(trainer, tmp_path)


# --- QLoRA: clear one-line errors before any data or model is loaded ------------------------------------------------


def test_qlora_recipe_stops_at_once_without_bitsandbytes():
    """This machine has neither bitsandbytes nor a GPU: one line that names the key and the fix, no traceback, and
    nothing loaded (the recipe's dataset is a gated hub id that HF_HUB_OFFLINE=1 could not fetch anyway)."""
    proc = run([PYTHON, "train_sft.py", "recipes/xlam_qlora.yaml"], check=False,
               env={**os.environ, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (  # after cpu_fsdp.py's notice that it patches the FSDP launch
        "train_sft.py: load_in_4bit: true in recipes/xlam_qlora.yaml needs bitsandbytes, which is not installed "
        "(pip install -r requirements-gpu.txt)")


def qlora_model_args(**changes):
    from trl import ModelConfig, TrlParser

    model_args = TrlParser((ModelConfig,)).parse_args_and_config(
        ["--config", str(REPO / "recipes" / "xlam_qlora.yaml")], return_remaining_strings=True)[0]
    return dataclasses.replace(model_args, **changes)


FSDP_GPU = dict(fsdp=True, mixed_precision="bf16", bitsandbytes_installed=True, cuda_available=True)


@pytest.mark.parametrize("changes, environment, expected", [
    ({}, dict(FSDP_GPU, bitsandbytes_installed=False), "needs bitsandbytes, which is not installed"),
    ({}, dict(FSDP_GPU, cuda_available=False), "needs a CUDA GPU for bitsandbytes' quantized weights"),
    ({"use_peft": False}, FSDP_GPU, "only adapters can train: set use_peft: true"),
    ({"bnb_4bit_quant_storage": None}, FSDP_GPU,
     "bnb_4bit_quant_storage: uint8 in R under FSDP: FSDP2 cannot shard 4-bit weights packed in an integer dtype"),
    ({"bnb_4bit_quant_storage": "float16"}, FSDP_GPU,
     "bnb_4bit_quant_storage: float16 in R under FSDP: FSDP2 would cast the packed 4-bit bytes from float16 to the "
     "compute dtype bfloat16 as numbers (garbage weights); set bnb_4bit_quant_storage: bfloat16"),
    ({"bnb_4bit_quant_storage": "float32"}, FSDP_GPU, "from float32 to the compute dtype bfloat16 as numbers"),
    ({"bnb_4bit_quant_storage": "bfloat16"}, dict(FSDP_GPU, mixed_precision="fp16"),
     "from bfloat16 to the compute dtype float16"),
    ({"bnb_4bit_quant_storage": "bfloat16", "dtype": "float32"}, dict(FSDP_GPU, mixed_precision="no"),
     "compute dtype float32"),
    ({"load_in_4bit": False, "load_in_8bit": True}, FSDP_GPU, "load_in_8bit: true in R: FSDP cannot shard 8-bit"),
    ({}, FSDP_GPU, None),                                                   # the recipe with fsdp_qlora.yaml
    ({"bnb_4bit_quant_storage": None}, dict(FSDP_GPU, fsdp=False), None),   # DDP / one GPU: uint8 is fine
    ({"bnb_4bit_quant_storage": "float32", "dtype": "float32"}, dict(FSDP_GPU, mixed_precision="no"), None),
    ({"load_in_4bit": False}, dict(FSDP_GPU, bitsandbytes_installed=False, cuda_available=False), None),  # plain LoRA
])
def test_quantization_checks(changes, environment, expected):
    problem = fcsft_recipe.quantization_problem(qlora_model_args(**changes), "R", **environment)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and "\n" not in problem


def test_qlora_recipe_and_its_accelerate_config_agree():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / "fsdp_qlora.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    model_args = qlora_model_args()
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_peft
    assert fcsft_recipe.quantization_problem(model_args, "recipes/xlam_qlora.yaml", fsdp=True,
                                          mixed_precision=config.mixed_precision, bitsandbytes_installed=True,
                                          cuda_available=True) is None
    assert "accelerate_configs/fsdp_qlora.yaml" in (REPO / "recipes" / "xlam_qlora.yaml").read_text()
