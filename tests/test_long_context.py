"""Long context: the 8K recipe (xlam rows packed into 8,192-token sequences, activation checkpointing) trains through
FSDP2 over 2 CPU processes; packed rows do not attend to each other; the context-parallel config and recipe agree with
what accelerate 1.15 / TRL 1.16 accept (the cp run itself needs GPUs: torch's ring attention replaces CUDA kernels)."""

import json

import pytest
import torch
import yaml
from conftest import ACCELERATE, LAUNCH_ROWS, REPO, run

from fcsft import recipe as fcsft_recipe
from fcsft.errors import UserError


def test_packed_8k_recipe_trains_through_fsdp(assets, tmp_path):
    """recipes/xlam_8k.yaml as it is (max_length 8192, bfd packing, one sequence per device, activation
    checkpointing), with only what the tiny model and CPU need changed, for one optimizer step."""
    recipe = yaml.safe_load((REPO / "recipes" / "xlam_8k.yaml").read_text())
    assert (recipe["max_length"], recipe["packing"], recipe["activation_checkpointing"]) == (8192, True, True)
    assert [source["path"] for source in recipe.pop("datasets")] == [  # xlam.yaml's mixture, replaced by the sample
        "Salesforce/xlam-function-calling-60k", "MadeAgents/xlam-irrelevance-7.5k"]
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  output_dir=str(tmp_path / "out"), dtype="float32", bf16=False, optim="adamw_torch", report_to=["none"],
                  max_steps=1, gradient_accumulation_steps=1, logging_steps=1, save_strategy="no", max_samples=LAUNCH_ROWS,
                  dataloader_num_workers=0, dataset_num_proc=1)
    path = tmp_path / "xlam_8k_cpu.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / "cpu_fsdp_full.yaml", "train_sft.py", path])

    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DistributedType.FSDP" and summary["sharding"]["mesh_shape"] == [2]
    assert summary["sharding"]["dtensor_parameters"] == summary["sharding"]["parameters"]
    step = next(h for h in summary["log_history"] if "loss" in h)
    assert torch.isfinite(torch.tensor(step["loss"])) and step["grad_norm"] > 0
    # TRL counts real tokens over both ranks: two packed sequences of up to 8,192 tokens, nearly full (rows of a few
    # hundred tokens fill the bins), where the same rows unpacked would be one row per sequence
    assert 0.95 * 2 * 8192 <= step["num_tokens"] <= 2 * 8192
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_packed_rows_do_not_attend_to_each_other(assets):
    """TRL's padding-free collator on a packed sequence (as bfd packing hands it over: seq_lengths) and transformers'
    sdpa give each row the loss it has alone: the block-diagonal mask built from position_ids holds (TRL#3910 was a
    leak). transformers 5.23 builds that mask only without a KV cache: SFTTrainer.compute_loss passes use_cache=False,
    as here; a forward with the config's use_cache=True (eval, generate) would let packed rows see each other."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2", attn_implementation="sdpa").train()
    rows = [torch.randint(10, 1000, (n,)).tolist() for n in (37, 61, 23)]
    with torch.no_grad():  # the tiny model has no dropout: train mode is deterministic
        alone = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss.item() * (len(r) - 1) for r in rows]
        expected = sum(alone) / sum(len(r) - 1 for r in rows)
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            [{"input_ids": sum(rows, []), "seq_lengths": [len(r) for r in rows]}])
        assert packed["position_ids"][0].tolist() == sum((list(range(len(r))) for r in rows), [])
        loss = model(**packed, use_cache=False).loss.item()
        leaky = model(**packed, use_cache=True).loss.item()  # the mask is skipped: the test can tell a leak
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(leaky - expected) > 1e-3


# --- context parallelism: config, recipe and the checks train_sft.py makes before loading anything -------------------


def test_context_parallel_config_and_recipe_agree(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / "fsdp_cp.yaml"))
    sizes = config.parallelism_config
    cp = sizes["parallelism_config_cp_size"]
    assert cp > 1 and sizes["parallelism_config_dp_shard_size"] * cp == config.num_processes
    assert config.fsdp_config["fsdp_version"] == 2 and not config.fsdp_config["fsdp_activation_checkpointing"]
    # what accelerate launch exports to each process, read by train_sft.py
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", str(cp))
    _, training_args, model_args = fcsft_recipe.parse_recipe(
        [str(REPO / "recipes" / "xlam_16k_cp.yaml"), "--bf16", "false"])  # bf16 off: no GPU here
    assert not training_args.packing and model_args.attn_implementation == "sdpa"
    assert training_args.pad_to_multiple_of % (2 * cp) == 0 and training_args.max_length == 16384
    with pytest.raises(UserError, match="packing: true in .*xlam_16k.yaml cannot run with context parallelism"):
        fcsft_recipe.parse_recipe([str(REPO / "recipes" / "xlam_16k.yaml"), "--bf16", "false"])


@pytest.mark.parametrize("flags, expected", [
    (["--attn_implementation", "flash_attention_2"], "attn_implementation: flash_attention_2 in R: context "
                                                     "parallelism (cp_size 4) supports only sdpa"),
    (["--pad_to_multiple_of", "12"], "pad_to_multiple_of: 12 in R: context parallelism splits each sequence into "
                                     "2 x cp_size = 8 equal chunks; set it to a multiple of 8"),
    (["--padding_free", "true"], "padding_free: true in R cannot run with context parallelism"),
    (["--pad_to_multiple_of", "64"], None),
])
def test_context_parallel_checks(flags, expected, monkeypatch):
    monkeypatch.delenv("PARALLELISM_CONFIG_CP_SIZE", raising=False)
    _, training_args, model_args = fcsft_recipe.parse_recipe(
        [str(REPO / "recipes" / "xlam_16k_cp.yaml"), "--bf16", "false", *flags])
    problem = fcsft_recipe.context_parallel_problem(training_args, model_args, "R", cp_size=4)
    assert problem == expected if expected is None else expected in problem
    assert fcsft_recipe.context_parallel_problem(training_args, model_args, "R", cp_size=1) is None
