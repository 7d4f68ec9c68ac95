"""Training benchmark: settings (recipe knobs + FSDP strategy), their runs through train_sft.py itself, and the
tables and plots of real-token throughput, MFU and peak memory against memory_estimate. bench_fsdp.py is its command
line.
"""


import csv
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fcsft import memory_estimate
from fcsft.demo_assets import CALL_CATEGORIES, TOOLS, draw_row
from fcsft.distributed import free_port
from fcsft.errors import UserError
from fcsft.metrics import (
    GiB,
    device_name,
    format_number,
    measured_cpu_peak_tflops,
    mfu_percent,
    peak_memory_gib,
    peak_tflops_of,
    real_token_throughput,
)

REPO = Path(__file__).resolve().parent.parent  # where the scripts, recipes and accelerate configs are


@dataclass
class Setting:
    name: str
    recipe: dict = field(default_factory=dict)  # SFTConfig / ModelConfig keys over the reference knobs below
    strategy: str = "full_shard"                # full_shard | shard_grad_op | ddp | fsdp_ac (FSDP's own checkpointing)
    needs: str = ""                             # cuda | liger | bitsandbytes | flash_attn
    note: str = ""
    once: bool = False                          # not repeated (too slow to repeat, and not a candidate default)


# Every setting starts from these, so a row differs from "padded" only in what it names (not in recipe defaults).
REFERENCE_KNOBS = {"padding_free": False, "packing": False, "train_sampling_strategy": "random", "activation_checkpointing": False,
                   "per_device_train_batch_size": 8, "max_length": 2048, "torch_compile": False, "use_peft": False,
                   "use_liger_kernel": False, "gradient_accumulation_steps": 1, "attn_implementation": "sdpa"}
TRL_DEFAULTS = {"activation_checkpointing": True, "max_length": 1024}  # SFTConfig defaults (and batch 8)
# The rows that vary something else (strategy, batch, LoRA, ...) start from the fastest data setting measured on CPU.
GROUPED = {"train_sampling_strategy": "group_by_length"}
LORA = {"use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_modules": "all-linear"}
QLORA = {**LORA, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True, "bnb_4bit_quant_storage": "bfloat16"}

CPU_SETTINGS = [
    Setting("trl_defaults", TRL_DEFAULTS, note="TRL's defaults: padded, activation checkpointing on, max_length 1024"),
    Setting("padded", note="padded batches, activation checkpointing off"),
    Setting("group_by_length", GROUPED, note="padded, batches of similar lengths"),
    Setting("batch_rebalance", {"train_sampling_strategy": "batch_rebalance"}, note="padded, transformers' padding-balancing sampler"),
    Setting("padding_free", {"padding_free": True, "max_length": None}, note="one row per batch, SDPA block-diagonal mask"),
    Setting("packing_bfd", {"packing": True, "packing_strategy": "bfd", "per_device_train_batch_size": 2},
            note="rows packed into 2 x 2048 tokens per device (about the real tokens of a padded batch of 8)"),
    Setting("shard_grad_op", GROUPED, strategy="shard_grad_op", note="params stay gathered from forward to backward"),
    Setting("ddp", GROUPED, strategy="ddp", note="no sharding"),
    Setting("fsdp_ac", GROUPED, strategy="fsdp_ac", note="FSDP's activation checkpointing (accelerate config)"),
    Setting("batch_4", {**GROUPED, "per_device_train_batch_size": 4}),
    Setting("batch_16", {**GROUPED, "per_device_train_batch_size": 16}),
    Setting("batch_32", {**GROUPED, "per_device_train_batch_size": 32}),
    Setting("max_length_1024", {**GROUPED, "max_length": 1024}, note="truncates the longest rows: not a correct setting here"),
    Setting("torch_compile", {**GROUPED, "torch_compile": True}, once=True,
            note="every new batch shape recompiles (variable-length rows)"),
    Setting("lora", {**GROUPED, **LORA}, note="LoRA r=16 on every linear layer"),
    Setting("liger", {**GROUPED, "use_liger_kernel": True}, needs="liger"),
    Setting("qlora", {**GROUPED, **QLORA}, needs="bitsandbytes"),
    Setting("flash_attention_padding_free", {"padding_free": True, "max_length": None, "attn_implementation": "flash_attention_2"},
            needs="flash_attn"),
]
# Real architectures on CPU: one small batch, to check the memory estimate where tensors, not the runtime, fill RSS.
CPU_MEMORY_SETTINGS = [Setting("padded_batch_1", {"per_device_train_batch_size": 1}),
                       Setting("lora_batch_1", {"per_device_train_batch_size": 1, **LORA})]
# 8 rows of ~1200 tokens without checkpointing is ~53 GiB on a 3B model (estimate_memory.py); 16 rows need checkpointing.
GPU_SETTINGS = [
    Setting("trl_defaults", TRL_DEFAULTS, note="TRL's defaults: padded, activation checkpointing on, max_length 1024"),
    Setting("xlam_recipe", {"activation_checkpointing": True, "per_device_train_batch_size": 16, "max_length": 4096},
            note="recipes/xlam.yaml's data settings"),
    Setting("padded", note="padded batches, activation checkpointing off"),
    Setting("group_by_length", GROUPED, note="padded, batches of similar lengths"),
    Setting("batch_rebalance", {"train_sampling_strategy": "batch_rebalance"}),
    Setting("padding_free", {"padding_free": True, "max_length": None}, note="SDPA: block-diagonal mask over the batch"),
    Setting("packing_bfd", {"packing": True, "packing_strategy": "bfd", "max_length": 4096, "per_device_train_batch_size": 2}),
    Setting("flash_attention_padding_free", {"padding_free": True, "max_length": None, "attn_implementation": "flash_attention_2"},
            needs="flash_attn", note="the varlen kernel: no padding and no masked attention"),
    Setting("liger", {**GROUPED, "use_liger_kernel": True}, needs="liger"),
    Setting("activation_checkpointing", {**GROUPED, "per_device_train_batch_size": 16, "activation_checkpointing": True}),
    Setting("fsdp_ac", {**GROUPED, "per_device_train_batch_size": 16}, strategy="fsdp_ac"),
    Setting("shard_grad_op", GROUPED, strategy="shard_grad_op"),
    Setting("ddp", GROUPED, strategy="ddp"),
    Setting("batch_4", {**GROUPED, "per_device_train_batch_size": 4}),
    Setting("batch_32_checkpointed", {**GROUPED, "per_device_train_batch_size": 32, "activation_checkpointing": True}),
    Setting("max_length_4096", {**GROUPED, "max_length": 4096}),
    Setting("torch_compile", {**GROUPED, "torch_compile": True}, once=True),
    Setting("lora", {**GROUPED, **LORA}),
    Setting("qlora", {**GROUPED, **QLORA}, needs="bitsandbytes"),
]
# One GPU, Qwen2.5-3B full fine-tune: fp32 masters + grads + AdamW take 46 GiB of 79, so without checkpointing a
# micro-batch holds ~5-6k tokens (estimate_memory.py): padded rows run 4 per batch, padding-free/packed ones ~8 rows.
FLEX = {"attn_implementation": "flex_attention"}
PADDING_FREE = {"padding_free": True, "max_length": None}
GPU1_SETTINGS = [
    Setting("trl_defaults", TRL_DEFAULTS, note="TRL's defaults: padded, activation checkpointing on, max_length 1024"),
    Setting("xlam_recipe", {**GROUPED, "activation_checkpointing": True, "per_device_train_batch_size": 16, "max_length": 4096},
            note="recipes/xlam.yaml's data settings until this benchmark"),
    Setting("padded", {"per_device_train_batch_size": 4}, note="random padded batches of 4, no checkpointing: the reference"),
    Setting("group_by_length", {**GROUPED, "per_device_train_batch_size": 4}, note="padded, batches of similar lengths"),
    Setting("padding_free_sdpa", PADDING_FREE, note="8 rows as one sequence, SDPA with a block-diagonal mask"),
    Setting("padding_free_flex", {**PADDING_FREE, **FLEX}, needs="flex", note="8 rows as one sequence, flex attention skips the masked blocks"),
    Setting("packing_flex", {"packing": True, "packing_strategy": "bfd", "max_length": 4096, "per_device_train_batch_size": 1, **FLEX},
            needs="flex", note="rows packed into 4096-token sequences (BFD), flex attention"),
    Setting("liger", {**PADDING_FREE, **FLEX, "use_liger_kernel": True}, needs="liger+flex", note="padding_free_flex + Liger RMSNorm/RoPE/SwiGLU"),
    Setting("padding_free_flex_batch_4", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 4}, needs="flex"),
    Setting("padding_free_flex_batch_32", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 32}, needs="flex",
            note="the largest padding-free batch without checkpointing that fits an H200 (the GPU lease's row)"),
    Setting("checkpointing_batch_16", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 16, "activation_checkpointing": True},
            needs="flex", note="activation checkpointing buys 2x the tokens per micro-batch"),
    Setting("checkpointing_batch_32", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 32, "activation_checkpointing": True},
            needs="flex"),
    Setting("checkpointing_batch_64", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 64, "activation_checkpointing": True},
            needs="flex", note="checkpointed, 64 rows (~28k tokens) per micro-batch: the GPU lease's largest tried"),
    Setting("torch_compile", {"packing": True, "packing_strategy": "bfd", "max_length": 4096, "per_device_train_batch_size": 1,
                              **FLEX, "torch_compile": True}, needs="flex", once=True, note="packing_flex + torch.compile"),
    Setting("lora", {**PADDING_FREE, **FLEX, **LORA}, needs="flex", note="LoRA r=16 on every linear layer"),
    Setting("qlora", {**PADDING_FREE, **FLEX, **QLORA}, needs="bitsandbytes+flex", note="QLoRA: NF4 base, LoRA r=16"),
]
SMOKE_SETTINGS = [Setting("padded", {"per_device_train_batch_size": 4}),
                  Setting("group_by_length", {**GROUPED, "per_device_train_batch_size": 4})]
PRESETS = {"cpu": CPU_SETTINGS, "cpu-memory": CPU_MEMORY_SETTINGS, "gpu": GPU_SETTINGS, "gpu1": GPU1_SETTINGS,
           "smoke": SMOKE_SETTINGS}
NEEDS = {  # what a setting needs -> why it cannot run here
    "cuda": "needs a CUDA GPU",
    "liger": "Liger kernels are Triton (GPU only); install liger-kernel",
    "bitsandbytes": "QLoRA needs bitsandbytes' CUDA 4-bit kernels",
    "flash_attn": "FlashAttention-2 needs a CUDA GPU and the flash-attn package",
    "flex": "flex attention is benchmarked on CUDA only (Triton kernels)",
}
CSV_COLUMNS = ["setting", "status", "strategy", "num_processes", "batch_size", "max_length", "padding_free", "packing",
               "sampler", "activation_checkpointing", "peft", "torch_compile", "liger", "attn_implementation",
               "repeats", "steps_measured", "step_seconds", "real_tokens_per_step_per_device", "real_tokens_per_second_per_device",
               "real_tokens_per_second_min", "real_tokens_per_second_max",
               "mfu_percent", "peak_memory_gib", "peak_reserved_gib", "memory_measure", "estimated_peak_gib",
               "estimate_error_percent", "loss_first", "loss_last", "rows_truncated_percent", "load_average", "note"]


# ----------------------------------------------------------------------------------------------------------------
# Assets: model directory and benchmark data
# ----------------------------------------------------------------------------------------------------------------


def ensure_demo_assets(assets):
    if not (assets / "tiny-qwen2" / "config.json").is_file():
        subprocess.run([sys.executable, "make_demo_assets.py", "--out", str(assets)], cwd=REPO, check=True)
    return assets


def random_init_model_dir(name, tokenizer_dir, out):
    """config.json of a real architecture + random bf16 weights + the tiny tokenizer: no download, the real shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = out / name
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(**memory_estimate.ARCHITECTURES[name], pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    print(f"bench: writing a random-init {name} to {out} (once)", flush=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 3B init takes seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # ids < len(tokenizer) <= vocab_size; the embedding keeps the real vocab size
    return out


def write_xlam_rows(path, n_rows, seed):
    """xLAM-schema rows from the repo's tool library, with more tools listed per row than the demo sample (1-8)."""
    rng = random.Random(seed)
    tools_listed = [1, 2, 3, 4, 5, 6, 7, 8]
    weights = [20, 20, 20, 15, 10, 7, 5, 3]  # assumed shape: most rows list 1-3 tools, a tail lists many
    with open(path, "w") as f:
        for i in range(n_rows):
            listed, calls, query = draw_row(rng, CALL_CATEGORIES[i % 4])
            want = rng.choices(tools_listed, weights)[0]
            extra = [t for t in TOOLS if t not in listed]
            listed = listed + rng.sample(extra, max(0, min(want - len(listed), len(extra))))
            rng.shuffle(listed)
            f.write(json.dumps({"id": i, "query": query, "tools": json.dumps([t.xlam_spec() for t in listed]),
                                "answers": json.dumps(calls)}) + "\n")
    return path


def token_lengths(dataset_path, tokenizer_dir):
    """Token length of every row rendered through the chat template with tools, and of its assistant part."""
    from transformers import AutoTokenizer

    from fcsft.chat_formats import xlam_to_messages

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths, completions = [], []
    with open(dataset_path) as f:
        rows = [json.loads(line) for line in f] if str(dataset_path).endswith(".jsonl") else json.load(f)
    for row in rows:
        example = xlam_to_messages(row)
        full = tokenizer.apply_chat_template(example["messages"], tools=example["tools"], tokenize=True, return_dict=True)
        prompt = tokenizer.apply_chat_template(example["messages"][:-1], tools=example["tools"], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)
        lengths.append(len(full["input_ids"]))
        completions.append(len(full["input_ids"]) - len(prompt["input_ids"]))
    return lengths, completions


def describe_lengths(lengths, completions):
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"rows": len(lengths), "mean": round(statistics.mean(lengths), 1), "p50": pick(0.5), "p90": pick(0.9),
            "p99": pick(0.99), "max": ordered[-1], "min": ordered[0],
            "token_weighted_mean": round(sum(x * x for x in lengths) / sum(lengths), 1),
            "assistant_token_fraction": round(sum(completions) / sum(lengths), 3)}


def padding_efficiency(lengths, batch_size, max_length, trials=2000, seed=0):
    """Real / processed tokens for random padded batches (TRL pads to the longest row of each batch)."""
    rng = random.Random(seed)
    cap = max_length or max(lengths)
    real = padded = 0
    for _ in range(trials):
        batch = [min(x, cap) for x in rng.sample(lengths, batch_size)]
        real, padded = real + sum(batch), padded + batch_size * max(batch)
    return real / padded


def worst_micro_batch(lengths, knobs, steps, ranks, trials=200, seed=0):
    """(tokens, row length) of the largest micro-batch one rank is expected to see in `steps` steps (for the estimate)."""
    rng = random.Random(seed)
    rows, cap = knobs["per_device_train_batch_size"], knobs["max_length"] or max(lengths)
    if knobs["packing"]:
        return rows * cap, cap
    if knobs["train_sampling_strategy"] != "random":  # length-sorted batches: the longest rows end up together
        return rows * min(max(lengths), cap), min(max(lengths), cap)
    worst_tokens = 0.0
    for _ in range(trials):
        run_worst = 0
        for _ in range(steps * ranks):
            batch = [min(x, cap) for x in rng.sample(lengths, rows)]
            run_worst = max(run_worst, sum(batch) if knobs["padding_free"] else rows * max(batch))
        worst_tokens += run_worst / trials
    return worst_tokens, worst_tokens / rows


# ----------------------------------------------------------------------------------------------------------------
# Device: what can run
# ----------------------------------------------------------------------------------------------------------------

def available(need):
    import importlib.util

    import torch

    if not need:
        return True
    if not torch.cuda.is_available():
        return False
    modules = {"cuda": "torch", "flex": "torch", "liger": "liger_kernel", "bitsandbytes": "bitsandbytes", "flash_attn": "flash_attn"}
    return all(importlib.util.find_spec(modules[part]) is not None for part in need.split("+"))


def missing(need):
    """Why a setting cannot run here (the first of its needs that is not met)."""
    return next(NEEDS[part] for part in need.split("+") if not available(part))


def runtime_rss_gib():
    """Peak RSS of a process that imports what train_sft.py imports: the part of CPU RSS that is not tensors."""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report this (larger) process's RSS
    code = ("import re, torch, transformers, trl, accelerate, datasets, peft, fcsft.callbacks, fcsft.recipe; "
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# One setting: recipe + accelerate config -> accelerate launch train_sft.py -> one CSV row
# ----------------------------------------------------------------------------------------------------------------


def write_accelerate_config(setting, args, family, on_gpu, path):
    base = {"full_shard": "fsdp_full.yaml", "shard_grad_op": "fsdp_shard_grad_op.yaml", "ddp": "ddp.yaml",
            "fsdp_ac": "fsdp_full_ac.yaml"}[setting.strategy]
    if not on_gpu and setting.strategy != "ddp":
        base = "cpu_fsdp_shard_grad_op.yaml" if setting.strategy == "shard_grad_op" else "cpu_fsdp_full.yaml"
    config = yaml.safe_load((REPO / "accelerate_configs" / base).read_text())
    config["num_processes"] = args.num_processes
    config["mixed_precision"] = "bf16" if on_gpu else "no"
    if "fsdp_config" in config:
        config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = memory_estimate.DECODER_LAYER[family]
        config["fsdp_config"]["fsdp_activation_checkpointing"] = setting.strategy == "fsdp_ac"
    path.write_text(yaml.safe_dump(config))
    return path


def write_recipe(setting, args, model_dir, data_path, base_recipe, output_dir, path):
    recipe = yaml.safe_load(base_recipe.read_text())
    for key in ("epoch_checkpoints", "hub_push_epochs", "wandb_project", "run_name", "save_steps", "save_total_limit",
                "max_samples", "eval_split_size", "packing_strategy", "datasets"):
        recipe.pop(key, None)
    recipe.update(REFERENCE_KNOBS)
    recipe.update(setting.recipe)
    recipe.update(model_name_or_path=str(model_dir), dataset_name=str(data_path), dataset_format="xlam",
                  output_dir=str(output_dir), max_steps=args.warmup_steps + args.steps, logging_steps=1,
                  save_strategy="no", save_final_model=False, report_to="none", dataloader_num_workers=0,
                  dataset_num_proc=1, seed=42)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe


def launch(config_path, recipe_path, log_path, timeout):
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config_path),
           "--main_process_port", str(free_port()), "train_sft.py", str(recipe_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            return proc.returncode
        except subprocess.TimeoutExpired:
            return "timeout"


def run_setting(setting, ctx):
    args, knobs = ctx["args"], {**REFERENCE_KNOBS, **setting.recipe}
    row = {"setting": setting.name, "strategy": setting.strategy, "num_processes": args.num_processes,
           "batch_size": knobs["per_device_train_batch_size"], "max_length": knobs["max_length"],
           "padding_free": knobs["padding_free"] or knobs["packing"], "packing": knobs["packing"],
           "sampler": knobs["train_sampling_strategy"],
           "activation_checkpointing": knobs["activation_checkpointing"] or setting.strategy == "fsdp_ac",
           "peft": "qlora" if knobs.get("load_in_4bit") else ("lora" if knobs["use_peft"] else "full"),
           "torch_compile": knobs["torch_compile"], "liger": knobs["use_liger_kernel"],
           "attn_implementation": knobs["attn_implementation"], "note": setting.note}
    cap = knobs["max_length"] or max(ctx["lengths"])
    row["rows_truncated_percent"] = round(100 * sum(x > cap for x in ctx["lengths"]) / len(ctx["lengths"]), 2)
    if not available(setting.needs):
        return {**row, "status": "skipped: " + missing(setting.needs)}

    work = ctx["work"] / setting.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config_path = write_accelerate_config(setting, args, ctx["family"], ctx["on_gpu"], work / "accelerate.yaml")
    write_recipe(setting, args, ctx["model_dir"], ctx["data_path"], ctx["base_recipe"], work / "out", work / "recipe.yaml")
    print(f"bench: {setting.name} ...", flush=True)
    started = time.perf_counter()
    rc = launch(config_path, work / "recipe.yaml", work / "launch.log", args.timeout)
    summary_path = work / "out" / "run_summary.json"
    if rc != 0 or not summary_path.is_file():
        tail = (work / "launch.log").read_text(errors="replace").strip().splitlines()[-3:]
        print(f"bench: {setting.name} failed ({rc}); see {work / 'launch.log'}", flush=True)
        return {**row, "status": f"failed ({rc}): " + " | ".join(tail)[-300:]}
    summary = json.loads(summary_path.read_text())
    shutil.copy(summary_path, work / "run_summary.json")
    for weights in (work / "out").glob("*.safetensors"):  # the gathered final model: not needed, and 6 GB for a 3B
        weights.unlink()
    row.update(status="ok", load_average=round(os.getloadavg()[0], 1), **real_token_throughput(summary, args.warmup_steps))

    # MFU on real tokens
    row["mfu_percent"] = mfu_percent(row["real_tokens_per_second_per_device"], ctx["config"],
                                     ctx["data"]["token_weighted_mean"], ctx["peak_tflops"])

    # Measured peak memory (max over ranks) and the estimator's prediction for the largest micro-batch of the run
    row["peak_memory_gib"], row["memory_measure"] = peak_memory_gib(summary)
    reserved = [r.get("peak_reserved_gib") for r in summary["peak_memory_per_rank"]]
    if None not in reserved:
        row["peak_reserved_gib"] = max(reserved)
        runtime = 0.0
    else:  # CPU: RSS holds the Python runtime and libraries too, measured once without tensors
        row["memory_measure"] += f" (estimate + {ctx['runtime_rss_gib']:.2f} GiB runtime)"
        runtime = ctx["runtime_rss_gib"] * GiB
    estimate = estimate_run(ctx["config"], knobs, setting.strategy, ctx["lengths"], ctx["data"]["assistant_token_fraction"],
                            args.warmup_steps + args.steps, args.num_processes, ctx["on_gpu"])
    row["estimated_peak_gib"] = (estimate["peak"] + runtime) / GiB
    row["estimate_error_percent"] = 100 * (row["estimated_peak_gib"] - row["peak_memory_gib"]) / row["peak_memory_gib"]
    print(f"bench: {setting.name}: {row['real_tokens_per_second_per_device']:.0f} real tokens/s/device, "
          f"MFU {row['mfu_percent']:.2f}%, peak {row['peak_memory_gib']:.2f} GiB (estimate {row['estimated_peak_gib']:.2f}), "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return row


def estimate_run(config, knobs, strategy, lengths, loss_fraction, steps, ranks, on_gpu):
    """estimate_memory.py's prediction for a train_sft.py run with these recipe knobs, for the largest micro-batch
    the run is expected to see on this data."""
    tokens, row_length = worst_micro_batch(lengths, knobs, steps, ranks)
    setup = memory_estimate.Setup(
        world_size=ranks, strategy="full_shard" if strategy == "fsdp_ac" else strategy,
        dtype="bfloat16" if on_gpu else "float32", mixed_precision="bf16" if on_gpu else "no",
        lora_r=knobs.get("lora_r", 0) if knobs["use_peft"] else 0, qlora=bool(knobs.get("load_in_4bit")),
        activation_checkpointing=knobs["activation_checkpointing"] or strategy == "fsdp_ac",
        batch_size=knobs["per_device_train_batch_size"], seq_len=round(row_length),
        padding_free=knobs["padding_free"] or knobs["packing"], attention=knobs["attn_implementation"],
        loss_fraction=loss_fraction, device="cuda" if on_gpu else "cpu")
    return memory_estimate.estimate(config, setup)


def median_run(runs):
    """The run with the median throughput (the lower middle for an even count), with the spread of all runs."""
    ok = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["real_tokens_per_second_per_device"])
    if not ok:
        return runs[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row.update(repeats=len(ok), real_tokens_per_second_min=ok[0]["real_tokens_per_second_per_device"],
               real_tokens_per_second_max=ok[-1]["real_tokens_per_second_per_device"])
    return row


# ----------------------------------------------------------------------------------------------------------------
# Output: CSV, markdown table, plots
# ----------------------------------------------------------------------------------------------------------------


def write_markdown(rows, header, path):
    lines = [header, "",
             "| setting | strategy | batch x max_length | real tokens/s/device (min-max) | vs padded | step s | MFU % | peak GiB | "
             "estimate GiB (err %) | loss first -> last | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    reference = next((r for r in rows if r["setting"] == "padded" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['strategy']} | {r['batch_size']} x {r['max_length']} | {r['status']} | | | | | | | {r['note']} |")
            continue
        spread = f"{format_number(r['real_tokens_per_second_min'], 0)}-{format_number(r['real_tokens_per_second_max'], 0)}" if r["repeats"] > 1 else "1 run"
        speedup = r["real_tokens_per_second_per_device"] / reference["real_tokens_per_second_per_device"] if reference else None
        notes = "; ".join(x for x in [r["note"], f"{r['rows_truncated_percent']}% rows truncated" if r["rows_truncated_percent"] else ""] if x)
        lines.append(
            f"| {r['setting']} | {r['strategy']} | {r['batch_size']} x {r['max_length']} | "
            f"{format_number(r['real_tokens_per_second_per_device'], 0)} ({spread}) | {format_number(speedup, 2) + 'x' if speedup else ''} | {format_number(r['step_seconds'], 2)} | "
            f"{format_number(r['mfu_percent'], 2)} | {format_number(r['peak_memory_gib'], 2)} | {format_number(r['estimated_peak_gib'], 2)} "
            f"({format_number(r['estimate_error_percent'], 0)}) | {format_number(r['loss_first'], 3)} -> {format_number(r['loss_last'], 3)} | {notes} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(rows, results, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    names = [r["setting"] for r in ok]
    for file, key, label in (("throughput.png", "real_tokens_per_second_per_device", "real (non-padding) tokens/s per device"),
                             ("mfu.png", "mfu_percent", "MFU % (6N + 12Lds per real token)")):
        fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(ok) + 1.2), dpi=80)
        ax.barh(names, [r[key] for r in ok], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(results / file)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(ok) + 1.6), dpi=80)
    positions = range(len(ok))
    ax.barh([p - 0.2 for p in positions], [r["peak_memory_gib"] for r in ok], height=0.4, label="measured peak")
    ax.barh([p + 0.2 for p in positions], [r["estimated_peak_gib"] for r in ok], height=0.4, label="estimate_memory.py")
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"GiB per device ({title})", fontsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(results / "memory.png")
    plt.close(fig)




# ----------------------------------------------------------------------------------------------------------------
# A whole benchmark: which settings, on what data, against which peak; runs kept in runs.json as they finish
# ----------------------------------------------------------------------------------------------------------------


def choose_settings(requested, on_gpu, num_processes):
    """A preset name or comma-separated setting names -> [Setting]; the default preset suits the device."""
    own = (GPU1_SETTINGS if num_processes == 1 else GPU_SETTINGS) if on_gpu else CPU_SETTINGS + CPU_MEMORY_SETTINGS
    preset = requested or ("cpu" if not on_gpu else "gpu1" if num_processes == 1 else "gpu")
    # a name in several lists means this device's version
    catalogue = {s.name: s for s in CPU_SETTINGS + CPU_MEMORY_SETTINGS + GPU_SETTINGS + GPU1_SETTINGS + own}
    if preset in PRESETS:
        return PRESETS[preset]
    unknown = [name for name in preset.split(",") if name not in catalogue]
    if unknown:
        raise UserError(f"unknown setting(s) {unknown}; presets {list(PRESETS)}, settings {sorted(catalogue)}")
    return [catalogue[name] for name in preset.split(",")]


def describe_device(on_gpu, num_processes):
    if on_gpu:
        return device_name()
    return f"{device_name()}, {os.cpu_count()} cores, {num_processes} processes x 1 thread"


def benchmark_data(args, work, tokenizer_dir):
    """(data file, token length of every row, length statistics), the statistics also in results/data.json."""
    data_path = args.dataset or write_xlam_rows(work / "xlam_bench.jsonl", args.rows, seed=0)
    lengths, completions = token_lengths(data_path, tokenizer_dir)
    data = describe_lengths(lengths, completions)
    data["source"] = str(args.dataset) if args.dataset else f"{args.rows} xLAM-schema rows built by bench_fsdp.py (1-8 tools listed per row)"
    data["padding_efficiency_batch_8"] = round(padding_efficiency(lengths, 8, 1024), 3)
    data["padding_efficiency_batch_16"] = round(padding_efficiency(lengths, 16, 4096), 3)
    (args.results / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    return data_path, lengths, data


def peak_flops(override, on_gpu, device):
    """(peak TFLOP/s per device for MFU, how it was obtained)."""
    if override:
        return override, f"{override:g} TFLOP/s per device (--peak-tflops)"
    if on_gpu:
        peak = peak_tflops_of(device)
        if peak is None:
            raise UserError(f"no peak known for {device}; pass --peak-tflops")
        return peak, f"{peak:g} TFLOP/s per device (datasheet dense bf16 for {device})"
    peak = measured_cpu_peak_tflops(threads=1)
    return peak, f"{peak * 1e3:.1f} GFLOP/s per process (measured here: best fp32 1024^3 matmul on 1 thread)"


def load_runs(runs_path, resume, identity):
    """The runs kept from an earlier invocation (--resume), refused when it measured something else: other steps,
    rows, model, data or processes make other numbers, which must not share a table."""
    if not (resume and runs_path.is_file()):
        return {}
    kept = json.loads(runs_path.read_text())
    before = kept.pop("_identity", None)
    if before is not None and before != identity:
        changed = ", ".join(f"{k}: {before.get(k)} -> {v}" for k, v in identity.items() if before.get(k) != v)
        raise UserError(f"--resume: {runs_path} holds runs made with other settings ({changed}); use another "
                        "--results folder, or the same settings")
    return {name: [r for r in runs if r["status"] == "ok"] for name, runs in kept.items()}


def run_round_robin(settings, ctx, runs, runs_path, identity, repeats):
    """Every setting `repeats` times, round-robin (on a shared machine the load changes minute to minute, so every
    setting sees every period); runs.json and bench.csv are rewritten after every run, so partial results survive."""
    for setting in settings:
        runs.setdefault(setting.name, [])
    for repeat in range(repeats):
        for setting in settings:
            if len(runs[setting.name]) > repeat or (repeat and setting.once):
                continue
            runs[setting.name].append(run_setting(setting, ctx))
            runs_path.write_text(json.dumps({"_identity": identity, **runs}, indent=1) + "\n")
            write_csv([median_run(r) for r in runs.values() if r], runs_path.parent / "bench.csv")
    return [median_run(r) for r in runs.values() if r]


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows])


def results_header(args, device, config, data, peak_note):
    import accelerate
    import torch
    import transformers
    import trl

    allocator = [f"{k}={os.environ[k]} " for k in ("MALLOC_MMAP_THRESHOLD_",) if k in os.environ]  # changes CPU RSS
    command = "".join(allocator) + "python bench_fsdp.py " + " ".join(sys.argv[1:])
    n_params = memory_estimate.parameter_counts(memory_estimate.shape_of(config))["total"]
    return "\n".join([
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, accelerate {accelerate.__version__}  ",
        f"Model: {args.model} ({n_params / 1e6:.2f}M parameters, random init); peak: {peak_note}  ",
        f"Data: {data['source']}; tokens per row mean {data['mean']}, p50 {data['p50']}, p90 {data['p90']}, "
        f"p99 {data['p99']}, max {data['max']}; assistant tokens {100 * data['assistant_token_fraction']:.0f}%  ",
        f"Timing: {args.warmup_steps} warm-up steps excluded, {args.steps} measured; {args.num_processes} processes; "
        f"{args.repeats} round-robin run(s) per setting, the median run shown; peak memory in GiB (the largest "
        "rank's max_memory_allocated on GPU, RSS on CPU)",
    ])
