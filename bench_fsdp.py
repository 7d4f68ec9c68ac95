"""Throughput, MFU and peak memory per training setting, measured through train_sft.py itself.

    python bench_fsdp.py --repeats 3                       # CPU: tiny model, every setting x 3 -> benchmarks/cpu-tiny
    python bench_fsdp.py --settings smoke                  # two settings in about a minute (tests/test_bench.py)
    python bench_fsdp.py --model qwen2.5-3b --results benchmarks/h100x8-qwen2.5-3b   # GPU preset on all GPUs of the node
    MALLOC_MMAP_THRESHOLD_=65536 python bench_fsdp.py ...  # CPU: RSS follows live tensors (for the memory column)

Each setting is one `accelerate launch ... train_sft.py RECIPE` with a generated recipe and accelerate config; the run's
run_summary.json (written by train_sft.py's RunReportCallback) gives real-token throughput per step and peak memory.
The first --warmup-steps steps are excluded. Writes to --results: bench.csv, bench.md, throughput.png, mfu.png,
memory.png and data.json (the length distribution of the benchmark data).

Model: `tiny` (demo_assets/tiny-qwen2) or a real architecture from estimate_memory.ARCHITECTURES, written to disk as
config.json + random weights (throughput and memory do not depend on the weight values), with the tiny demo tokenizer.
Data: xLAM-schema rows built from the repo's tool library with 1-8 tools listed per row (make_demo_assets.py's sample
lists 1-4), rendered through Qwen2.5's chat template with tools; --dataset takes a real xlam-function-calling-60k file.
MFU: 6N + 12*L*d*s FLOPs per real token (s: the token-weighted mean row length) against --peak-tflops per device.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import estimate_memory

REPO = Path(__file__).resolve().parent
GiB = 2**30


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
    Setting("checkpointing_batch_16", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 16, "activation_checkpointing": True},
            needs="flex", note="activation checkpointing buys 2x the tokens per micro-batch"),
    Setting("checkpointing_batch_32", {**PADDING_FREE, **FLEX, "per_device_train_batch_size": 32, "activation_checkpointing": True},
            needs="flex"),
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
               "mfu_percent", "peak_memory_gb", "peak_reserved_gb", "memory_measure", "estimated_peak_gb",
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
    config = AutoConfig.for_model(**estimate_memory.ARCHITECTURES[name], pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    print(f"bench: writing a random-init {name} to {out} (once)", flush=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 3B init takes seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # ids < len(tokenizer) <= vocab_size; the embedding keeps the real vocab size
    return out


def write_xlam_rows(path, n_rows, seed):
    """xLAM-schema rows from the repo's tool library, with more tools listed per row than the demo sample (1-8)."""
    import make_demo_assets as demo

    rng = random.Random(seed)
    tools_listed = [1, 2, 3, 4, 5, 6, 7, 8]
    weights = [20, 20, 20, 15, 10, 7, 5, 3]  # assumed shape: most rows list 1-3 tools, a tail lists many
    with open(path, "w") as f:
        for i in range(n_rows):
            listed, calls, query = demo.draw_row(rng, demo.CALL_CATEGORIES[i % 4])
            want = rng.choices(tools_listed, weights)[0]
            extra = [t for t in demo.TOOLS if t not in listed]
            listed = listed + rng.sample(extra, max(0, min(want - len(listed), len(extra))))
            rng.shuffle(listed)
            f.write(json.dumps({"id": i, "query": query, "tools": json.dumps([t.xlam_spec() for t in listed]),
                                "answers": json.dumps(calls)}) + "\n")
    return path


def token_lengths(dataset_path, tokenizer_dir):
    """Token length of every row rendered through the chat template with tools, and of its assistant part."""
    import function_calling
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths, completions = [], []
    with open(dataset_path) as f:
        rows = [json.loads(line) for line in f] if str(dataset_path).endswith(".jsonl") else json.load(f)
    for row in rows:
        example = function_calling.xlam_to_messages(row)
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
# Device: name, peak FLOP/s, what can run
# ----------------------------------------------------------------------------------------------------------------

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}  # dense bf16/fp16 tensor cores


def measured_cpu_peak_tflops(threads):
    """Best fp32 matmul rate of `threads` threads (the per-process share of a multi-process CPU launch)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(8):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - start))
    return best / 1e12


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runtime_rss_gb():
    """Peak RSS of a process that imports what train_sft.py imports: the part of CPU RSS that is not tensors."""
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report this (larger) process's RSS
    code = ("import re, torch, transformers, trl, accelerate, datasets, peft, train_sft; "
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
        config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = estimate_memory.DECODER_LAYER[family]
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


def measure(summary, warmup_steps):
    """Real-token throughput over the steps after warm-up, from the logs of RunReportCallback (each log's rate covers
    the steps since the previous log, so any logging_steps works)."""
    logged = [log for log in summary["log_history"] if "num_tokens" in log]
    tokens, seconds, steps = 0.0, 0.0, 0
    for previous, log in zip(logged, logged[1:]):
        if "tokens_per_second_per_device" not in log or log["step"] <= warmup_steps:
            continue
        delta = log["num_tokens"] - previous["num_tokens"]
        tokens += delta
        seconds += delta / (log["tokens_per_second_per_device"] * summary["num_processes"])
        steps += log["step"] - previous["step"]
    losses = [log["loss"] for log in summary["log_history"] if "loss" in log]
    per_device = tokens / summary["num_processes"]
    return {"steps_measured": steps, "step_seconds": seconds / max(steps, 1),
            "real_tokens_per_step_per_device": per_device / max(steps, 1),
            "real_tokens_per_second_per_device": per_device / seconds if seconds else 0.0,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def peak_memory(summary):
    """(peak GB, reserved GB or None, what was measured): the largest over ranks, in GB (1e9 bytes)."""
    ranks = summary["peak_memory_per_rank"]
    if "peak_allocated_gb" in ranks[0]:
        return (max(r["peak_allocated_gb"] for r in ranks) * GiB / 1e9, max(r["peak_reserved_gb"] for r in ranks) * GiB / 1e9,
                "max_memory_allocated")
    return max(r["peak_rss_gb"] for r in ranks) * GiB / 1e9, None, "peak RSS"


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
    row.update(status="ok", load_average=round(os.getloadavg()[0], 1), **measure(summary, args.warmup_steps))

    # MFU on real tokens
    flops = estimate_memory.flops_per_token(ctx["config"], ctx["data"]["token_weighted_mean"])
    row["mfu_percent"] = 100 * row["real_tokens_per_second_per_device"] * flops / (ctx["peak_tflops"] * 1e12)

    # Measured peak memory (max over ranks) and the estimator's prediction for the largest micro-batch of the run
    row["peak_memory_gb"], reserved, row["memory_measure"] = peak_memory(summary)
    if reserved is not None:
        row["peak_reserved_gb"] = reserved
        runtime = 0.0
    else:
        row["memory_measure"] += f" (estimate + {ctx['runtime_rss_gb']:.2f} GB runtime)"
        runtime = ctx["runtime_rss_gb"] * GiB
    estimate = estimate_run(ctx["config"], knobs, setting.strategy, ctx["lengths"], ctx["data"]["assistant_token_fraction"],
                            args.warmup_steps + args.steps, args.num_processes, ctx["on_gpu"])
    row["estimated_peak_gb"] = (estimate["peak"] + runtime) / 1e9
    row["estimate_error_percent"] = 100 * (row["estimated_peak_gb"] - row["peak_memory_gb"]) / row["peak_memory_gb"]
    print(f"bench: {setting.name}: {row['real_tokens_per_second_per_device']:.0f} real tokens/s/device, "
          f"MFU {row['mfu_percent']:.2f}%, peak {row['peak_memory_gb']:.2f} GB (estimate {row['estimated_peak_gb']:.2f}), "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return row


def estimate_run(config, knobs, strategy, lengths, loss_fraction, steps, ranks, on_gpu):
    """estimate_memory.py's prediction for a train_sft.py run with these recipe knobs, for the largest micro-batch
    the run is expected to see on this data."""
    tokens, row_length = worst_micro_batch(lengths, knobs, steps, ranks)
    setup = estimate_memory.Setup(
        world_size=ranks, strategy="full_shard" if strategy == "fsdp_ac" else strategy,
        dtype="bfloat16" if on_gpu else "float32", mixed_precision="bf16" if on_gpu else "no",
        lora_r=knobs.get("lora_r", 0) if knobs["use_peft"] else 0, qlora=bool(knobs.get("load_in_4bit")),
        activation_checkpointing=knobs["activation_checkpointing"] or strategy == "fsdp_ac",
        batch_size=knobs["per_device_train_batch_size"], seq_len=round(row_length),
        padding_free=knobs["padding_free"] or knobs["packing"], attention=knobs["attn_implementation"],
        loss_fraction=loss_fraction, device="cuda" if on_gpu else "cpu")
    return estimate_memory.estimate(config, setup)


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


def fmt(value, digits=1):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def write_markdown(rows, header, path):
    lines = [header, "",
             "| setting | strategy | batch x max_length | real tokens/s/device (min-max) | vs padded | step s | MFU % | peak GB | "
             "estimate GB (err %) | loss first -> last | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    reference = next((r for r in rows if r["setting"] == "padded" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['setting']} | {r['strategy']} | {r['batch_size']} x {r['max_length']} | {r['status']} | | | | | | | {r['note']} |")
            continue
        spread = f"{fmt(r['real_tokens_per_second_min'], 0)}-{fmt(r['real_tokens_per_second_max'], 0)}" if r["repeats"] > 1 else "1 run"
        speedup = r["real_tokens_per_second_per_device"] / reference["real_tokens_per_second_per_device"] if reference else None
        notes = "; ".join(x for x in [r["note"], f"{r['rows_truncated_percent']}% rows truncated" if r["rows_truncated_percent"] else ""] if x)
        lines.append(
            f"| {r['setting']} | {r['strategy']} | {r['batch_size']} x {r['max_length']} | "
            f"{fmt(r['real_tokens_per_second_per_device'], 0)} ({spread}) | {fmt(speedup, 2) + 'x' if speedup else ''} | {fmt(r['step_seconds'], 2)} | "
            f"{fmt(r['mfu_percent'], 2)} | {fmt(r['peak_memory_gb'], 2)} | {fmt(r['estimated_peak_gb'], 2)} "
            f"({fmt(r['estimate_error_percent'], 0)}) | {fmt(r['loss_first'], 3)} -> {fmt(r['loss_last'], 3)} | {notes} |")
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
    ax.barh([p - 0.2 for p in positions], [r["peak_memory_gb"] for r in ok], height=0.4, label="measured peak")
    ax.barh([p + 0.2 for p in positions], [r["estimated_peak_gb"] for r in ok], height=0.4, label="estimate_memory.py")
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"GB per device ({title})", fontsize=8)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(results / "memory.png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"tiny or one of {list(estimate_memory.ARCHITECTURES)}")
    parser.add_argument("--settings", default=None, help=f"a preset {list(PRESETS)} (default: gpu1 on one GPU, gpu on several, else cpu) "
                        "or comma-separated setting names")
    parser.add_argument("--num-processes", type=int, default=None, help="default: all GPUs, or 2 on CPU")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps excluded from the timing (default 3 CPU, 5 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 8 CPU, 20 GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak; default: H100/H200 989 (bf16 dense), CPU: measured fp32 matmul")
    parser.add_argument("--dataset", type=Path, default=None, help="an xlam-function-calling-60k .json/.jsonl instead of the built rows")
    parser.add_argument("--rows", type=int, default=2000, help="rows of built benchmark data")
    parser.add_argument("--assets", type=Path, default=REPO / "demo_assets", help="make_demo_assets.py output (built if missing)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer for a real-architecture model (default: the tiny one)")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/<cpu|gpu name>-<model>")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench", help="recipes, configs, logs of each run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting, round-robin; the median run is reported")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --results/runs.json and add only "
                        "the missing ones (an interrupted benchmark, or more settings into the same table)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    args.num_processes = args.num_processes or (torch.cuda.device_count() if on_gpu else 2)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if on_gpu else 3)
    args.steps = args.steps or (20 if on_gpu else 8)
    own = (GPU1_SETTINGS if args.num_processes == 1 else GPU_SETTINGS) if on_gpu else CPU_SETTINGS + CPU_MEMORY_SETTINGS
    preset = args.settings or ("cpu" if not on_gpu else "gpu1" if args.num_processes == 1 else "gpu")
    catalogue = {s.name: s for s in CPU_SETTINGS + CPU_MEMORY_SETTINGS + GPU_SETTINGS + GPU1_SETTINGS + own}  # a name in
    # several lists means this device's version
    unknown = [name for name in preset.split(",") if preset not in PRESETS and name not in catalogue]
    if unknown:
        sys.exit(f"bench_fsdp.py: unknown setting(s) {unknown}; presets {list(PRESETS)}, settings {sorted(catalogue)}")
    settings = PRESETS[preset] if preset in PRESETS else [catalogue[name] for name in preset.split(",")]
    device = torch.cuda.get_device_name(0) if on_gpu else (platform.processor() or platform.machine())
    if not on_gpu:
        device = f"CPU {device}, {os.cpu_count()} cores, {args.num_processes} processes x 1 thread"
    args.results = args.results or REPO / "benchmarks" / f"{'gpu' if on_gpu else 'cpu'}-{args.model}"
    args.results.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / args.results.name
    work.mkdir(parents=True, exist_ok=True)

    # Model, data, lengths
    assets = ensure_demo_assets(args.assets)
    tokenizer_dir = args.tokenizer or assets / "tiny-qwen2"
    model_dir = assets / "tiny-qwen2" if args.model == "tiny" else random_init_model_dir(args.model, tokenizer_dir, args.work_dir / "models")
    config = estimate_memory.load_config(model_dir)
    data_path = args.dataset or write_xlam_rows(work / "xlam_bench.jsonl", args.rows, seed=0)
    lengths, completions = token_lengths(data_path, tokenizer_dir)
    data = describe_lengths(lengths, completions)
    data["source"] = str(args.dataset) if args.dataset else f"{args.rows} xLAM-schema rows built by bench_fsdp.py (1-8 tools listed per row)"
    data["padding_efficiency_batch_8"] = round(padding_efficiency(lengths, 8, 1024), 3)
    data["padding_efficiency_batch_16"] = round(padding_efficiency(lengths, 16, 4096), 3)
    (args.results / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"bench: data {json.dumps(data)}", flush=True)

    if args.peak_tflops:
        peak, peak_note = args.peak_tflops, f"{args.peak_tflops:g} TFLOP/s per device (--peak-tflops)"
    elif on_gpu:
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in device), None)
        if peak is None:
            sys.exit(f"bench_fsdp.py: no peak known for {device}; pass --peak-tflops")
        peak_note = f"{peak:g} TFLOP/s per device (datasheet dense bf16 for {device})"
    else:
        peak = measured_cpu_peak_tflops(threads=1)
        peak_note = f"{peak * 1e3:.1f} GFLOP/s per process (measured here: best fp32 1024^3 matmul on 1 thread)"

    ctx = {"args": args, "on_gpu": on_gpu, "model_dir": model_dir, "config": config, "family": config["model_type"],
           "data_path": data_path, "lengths": lengths, "data": data, "peak_tflops": peak, "work": work,
           "base_recipe": REPO / "recipes" / ("xlam.yaml" if on_gpu else "demo_cpu.yaml"),
           "runtime_rss_gb": 0.0 if on_gpu else runtime_rss_gb()}
    # Every run is kept in runs.json as it finishes: an interrupted benchmark resumes with --resume, and a second
    # invocation with other settings adds its rows to the same table.
    runs_path = args.results / "runs.json"
    runs = json.loads(runs_path.read_text()) if args.resume and runs_path.is_file() else {}
    runs = {name: [r for r in kept if r["status"] == "ok"] for name, kept in runs.items()}
    for setting in settings:
        runs.setdefault(setting.name, [])
    # Round-robin repeats: on a shared machine the load changes minute to minute, so every setting sees every period.
    for repeat in range(args.repeats):
        for setting in settings:
            if len(runs[setting.name]) > repeat or (repeat and setting.once):
                continue
            runs[setting.name].append(run_setting(setting, ctx))
            runs_path.write_text(json.dumps(runs, indent=1) + "\n")
            rows = [median_run(r) for r in runs.values() if r]
            with open(args.results / "bench.csv", "w", newline="") as f:  # rewritten after every run: partial results survive
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                writer.writerows([{k: r.get(k, "") for k in CSV_COLUMNS} for r in rows])
    rows = [median_run(r) for r in runs.values() if r]

    import accelerate
    import transformers
    import trl

    allocator = [f"{k}={os.environ[k]} " for k in ("MALLOC_MMAP_THRESHOLD_",) if k in os.environ]  # changes CPU RSS
    command = "".join(allocator) + "python bench_fsdp.py " + " ".join(sys.argv[1:])
    n_params = estimate_memory.parameter_counts(estimate_memory.shape_of(config))["total"]
    header = "\n".join([
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, accelerate {accelerate.__version__}  ",
        f"Model: {args.model} ({n_params / 1e6:.2f}M parameters, random init); peak: {peak_note}  ",
        f"Data: {data['source']}; tokens per row mean {data['mean']}, p50 {data['p50']}, p90 {data['p90']}, "
        f"p99 {data['p99']}, max {data['max']}; assistant tokens {100 * data['assistant_token_fraction']:.0f}%  ",
        f"Timing: {args.warmup_steps} warm-up steps excluded, {args.steps} measured; {args.num_processes} processes; "
        f"{args.repeats} round-robin run(s) per setting, the median run shown",
    ])
    write_markdown(rows, header, args.results / "bench.md")
    write_plots(rows, args.results, f"{args.model} on {device}")
    print(f"bench: wrote {args.results}/bench.csv, bench.md and plots", flush=True)


if __name__ == "__main__":
    main()
