"""make test-gpu: real runs through the project's commands on the GPUs present (skipped where CUDA is absent).

Every run is `accelerate launch --config_file accelerate_configs/<config> --num_processes <GPUs> train_sft.py RECIPE`
on a real architecture built from its config with random weights (no download): Qwen2.5-0.5B on the demo's xLAM
sample for the bf16 FSDP2 runs, OPT-1.3B on the Dolly sample for the fp16 T4 config. One launch per variant, shared
by the tests that read it (module-scoped); the whole module takes a few minutes on one H100.
"""

import json

import pytest
import torch
import yaml
from conftest import ACCELERATE, PYTHON, REPO, run

from fcsft import bench, distributed, memory_estimate

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count()
STEPS = 16
# recipes/xlam.yaml scaled to a 16-step check: the same keys, with a learning rate that moves a random model quickly
# and the length-grouped sampler (deterministic batches, the longest first: the memory estimate's worst case).
CHECK = dict(report_to="none", max_steps=STEPS, logging_steps=1, save_strategy="no", learning_rate=1e-4, warmup_steps=2,
             lr_scheduler_type="constant_with_warmup", per_device_train_batch_size=4, gradient_accumulation_steps=1,
             max_length=1024, activation_checkpointing=False, train_sampling_strategy="group_by_length",
             dataloader_num_workers=0, dataset_num_proc=1, seed=42, save_final_model=False)
LORA = dict(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules="all-linear", learning_rate=1e-3,
            save_final_model=True)
VARIANTS = {
    "bf16": dict(save_final_model=True),
    "liger": dict(use_liger_kernel=True),
    "padding_free_flex": dict(padding_free=True, max_length=None, attn_implementation="flex_attention"),
    "lora": LORA,
    "qlora": dict(LORA, load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                  bnb_4bit_quant_storage="bfloat16"),
}
LOSS_RTOL = 0.02  # bf16: the same batch through other kernels gives the same first loss within 2%


def launch(config, recipe_path, timeout=900):
    return run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / config, "--num_processes", GPUS,
                "--main_process_port", distributed.free_port(), "train_sft.py", recipe_path], timeout=timeout)


def losses(summary):
    return [log["loss"] for log in summary["log_history"] if "loss" in log]


def peak_allocated_bytes(summary):
    return max(r["peak_allocated_gib"] for r in summary["peak_memory_per_rank"]) * 2**30


@pytest.fixture(scope="module")
def qwen_dir(assets, tmp_path_factory):
    return bench.random_init_model_dir("qwen2.5-0.5b", assets / "tiny-qwen2", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def qwen_run(assets, qwen_dir, tmp_path_factory):
    """name -> (output dir, run_summary.json, recipe) of recipes/xlam.yaml with CHECK and VARIANTS[name]; launched once."""
    done = {}

    def get(name):
        if name not in done:
            work = tmp_path_factory.mktemp(name)
            recipe = yaml.safe_load((REPO / "recipes" / "xlam.yaml").read_text())
            for key in ("wandb_project", "run_name", "save_steps", "save_total_limit", "datasets"):
                recipe.pop(key)
            recipe.update(CHECK, **VARIANTS[name], model_name_or_path=str(qwen_dir), output_dir=str(work / "out"),
                          dataset_name=str(assets / "xlam_sample" / "train.jsonl"))
            (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            launch("fsdp_full.yaml", work / "recipe.yaml")
            done[name] = (work / "out", json.loads((work / "out" / "run_summary.json").read_text()), recipe)
        return done[name]

    return get


def test_bf16_fsdp2_trains_in_bf16_on_fp32_masters_and_saves_a_loadable_model(qwen_run, qwen_dir):
    out, summary, _ = qwen_run("bf16")
    assert summary["distributed_type"] == "DistributedType.FSDP" and summary["fsdp_version"] == 2
    assert summary["num_processes"] == GPUS and summary["global_step"] == STEPS
    sharding = summary["sharding"]
    assert sharding["dtensor_parameters"] == sharding["parameters"] > 0
    assert sharding["parameter_dtypes"] == ["torch.float32"]  # master weights (accelerate upcasts bf16 loads for FSDP2)
    assert sharding["compute_dtype"] == "torch.bfloat16"      # what a decoder layer computes in
    loss = losses(summary)
    assert len(loss) == STEPS and loss[-1] < loss[0] - 1.0, loss

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map={"": "cuda"})
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == memory_estimate.parameter_counts(
        memory_estimate.shape_of(memory_estimate.ARCHITECTURES["qwen2.5-0.5b"]))["total"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "weather in Oslo?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to("cuda")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] <= prompt["input_ids"].shape[1] + 5


@pytest.mark.parametrize("name", ["bf16", "padding_free_flex"])
def test_peak_memory_is_within_10_percent_of_estimate_memory(qwen_run, assets, name):
    _, summary, recipe = qwen_run(name)
    data = assets / "xlam_sample" / "train.jsonl"
    lengths, completions = bench.token_lengths(data, assets / "tiny-qwen2")
    knobs = {**bench.REFERENCE_KNOBS, **{k: recipe[k] for k in bench.REFERENCE_KNOBS if k in recipe}}
    estimate = bench.estimate_run(memory_estimate.load_config(recipe["model_name_or_path"]), knobs, "full_shard",
                                       lengths, bench.describe_lengths(lengths, completions)["assistant_token_fraction"],
                                       STEPS, GPUS, on_gpu=True)
    measured = peak_allocated_bytes(summary)
    assert abs(estimate["peak"] - measured) / measured < 0.10, (estimate["peak"] / 2**30, measured / 2**30)


def test_liger_kernels_give_the_same_loss_with_less_memory(qwen_run):
    _, reference, _ = qwen_run("bf16")
    _, liger, _ = qwen_run("liger")
    assert losses(liger)[0] == pytest.approx(losses(reference)[0], rel=LOSS_RTOL)
    assert peak_allocated_bytes(liger) < peak_allocated_bytes(reference)


def test_padding_free_flex_attention_gives_the_padded_loss(qwen_run):
    """One sequence per micro-batch, flex attention with a document mask: same rows, same loss as padded batches."""
    _, reference, _ = qwen_run("bf16")
    _, packed, _ = qwen_run("padding_free_flex")
    first = [log for log in packed["log_history"] if "loss" in log][0]
    assert first["num_tokens"] == [log for log in reference["log_history"] if "loss" in log][0]["num_tokens"]  # same rows
    assert losses(packed)[0] == pytest.approx(losses(reference)[0], rel=LOSS_RTOL)
    assert losses(packed)[-1] < losses(packed)[0] - 1.0


def test_qlora_under_fsdp2_trains_a_complete_adapter_in_less_memory_than_lora(qwen_run):
    from safetensors.torch import load_file

    lora_out, lora, _ = qwen_run("lora")
    qlora_out, qlora, _ = qwen_run("qlora")
    for out, summary in ((lora_out, lora), (qlora_out, qlora)):
        loss = losses(summary)
        assert all(x == x for x in loss) and loss[-1] < loss[0], loss  # no NaN, and it learns
        adapter = load_file(out / "adapter_model.safetensors")
        lora_b = [t for k, t in adapter.items() if "lora_B" in k]
        assert len(lora_b) == 24 * 7 and all(t.abs().sum() > 0 for t in lora_b)  # every layer's 7 linears, trained
    assert peak_allocated_bytes(qlora) < peak_allocated_bytes(lora)


def test_fp16_t4_config_scales_the_loss(assets, tmp_path):
    """recipes/dolly_opt.yaml with accelerate_configs/fsdp_t4x2_fp16.yaml on OPT-1.3B: fp16 compute, dynamic loss scale.
    A large learning rate forces fp16 overflows, so the scale must drop (GradScaler halves it on each skipped step)."""
    model = bench.random_init_model_dir("opt-1.3b", assets / "tiny-opt", tmp_path / "models")
    recipe = yaml.safe_load((REPO / "recipes" / "dolly_opt.yaml").read_text())
    recipe.update(model_name_or_path=str(model), dataset_name=str(assets / "dolly_sample" / "train.jsonl"),
                  output_dir=str(tmp_path / "out"), report_to="none", max_steps=12, logging_steps=1, learning_rate=5e-3,
                  warmup_steps=0, eval_strategy="no", eval_split_size=0, epoch_checkpoints=False, save_strategy="no",
                  save_final_model=False, gradient_accumulation_steps=1, max_length=256, dataloader_num_workers=0,
                  dataset_num_proc=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    launch("fsdp_t4x2_fp16.yaml", tmp_path / "recipe.yaml")
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    scales = [log["loss_scale"] for log in summary["log_history"] if "loss_scale" in log]
    assert summary["sharding"]["compute_dtype"] == "torch.float16" and summary["sharding"]["parameter_dtypes"] == ["torch.float32"]
    assert len(scales) >= 10 and min(scales) < scales[0] == 65536.0, scales


def test_eval_bfcl_generates_in_bf16_on_the_gpu(qwen_run, tmp_path):
    model, _, _ = qwen_run("bf16")
    out = tmp_path / "eval"
    run([PYTHON, "eval_bfcl.py", "--model", model, "--categories", "simple_python", "multiple", "--limit", "8",
         "--batch-size", "8", "--max-new-tokens", "32", "--output-dir", out], timeout=600)
    stats = json.loads((out / "generation.json").read_text())
    assert stats["dtype"] == "bfloat16" and torch.cuda.get_device_name(0) in stats["device"]
    assert stats["prompts_generated"] == 16 and stats["generated_tokens"] > 0
    for category in ("simple_python", "multiple"):
        rows = (out / f"BFCL_v4_{category}_result.json").read_text().splitlines()
        assert len(rows) == 8
    assert (out / "summary.json").is_file()
