"""Supervised fine-tuning for function calling with TRL's SFTTrainer, on FSDP through Accelerate.

    accelerate launch --config_file accelerate_configs/fsdp_full.yaml train_sft.py recipes/xlam.yaml
    python train_sft.py recipes/demo_cpu.yaml --show_examples 2        # what the model sees, no training
    accelerate launch ... train_sft.py RECIPE.yaml --learning_rate 1e-5 # flags override the recipe

The recipe is a YAML file of SFTConfig / ModelConfig / ScriptArguments keys; an unknown key is an error.
With `bfcl_eval_dir`, every evaluation also generates on a BFCL-format split and logs eval_bfcl/* (bfcl_train_eval.py).
"""

import dataclasses
import difflib
import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cpu_fsdp
import step_profile
import training_data
from training_data import FORMATS, SourceConfig

logger = logging.getLogger("train_sft")

@dataclass
class ScriptArguments:
    dataset_name: str = field(default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet file."})
    dataset_format: str = field(default="xlam", metadata={"help": f"One of {FORMATS}."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from the dataset."})
    datasets: list[SourceConfig] = field(default_factory=list, metadata={
        "help": "A mixture instead of dataset_name: TRL DatasetConfig keys (path, name, split, data_files, fraction) + format."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep only N random rows of each dataset."})
    eval_split_size: float = field(default=0.0, metadata={"help": "Held-out eval rows: a fraction (<1) or a count."})
    max_malformed_fraction: float = field(default=0.01, metadata={"help": "Fail when more rows than this are malformed."})
    irrelevance_fraction: float = field(default=0.0, metadata={
        "help": "Share of xlam rows made 'no listed tool fits' (called tools removed, plain reply)."})
    irrelevance_reply: str = field(default=training_data.fc.NO_TOOL_FITS_REPLY, metadata={
        "help": "The assistant's reply when no listed tool fits."})
    function_masking_fraction: float = field(default=0.0, metadata={
        "help": "Share of xlam rows whose function and parameter names become random identifiers."})
    extra_tools: int = field(default=0, metadata={"help": "Tools from other rows added to each xlam row's tool list."})
    curriculum: bool = field(default=False, metadata={"help": "Simple rows first, complex last (sequential sampler)."})
    decontaminate: bool = field(default=True, metadata={"help": "Drop rows whose request matches a BFCL v4 test question."})
    decontamination_data_dir: str | None = field(default=None, metadata={
        "help": "BFCL_v4_*.json to decontaminate against (default: the installed bfcl-eval's)."})
    show_examples: int = field(default=0, metadata={"help": "Print N rendered examples with the trained span marked, then exit."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (WANDB_PROJECT)."})
    epoch_checkpoints: bool = field(default=False, metadata={"help": "Save a HF checkpoint per epoch in output_dir/checkpoints/epN."})
    hub_push_epochs: str | None = field(default=None, metadata={"help": "Push each epoch: 'branch', 'repo' or 'both'."})
    save_final_model: bool = field(default=True, metadata={"help": "Gather and save the final model (benchmarks turn it off)."})
    bfcl_eval_dir: str | None = field(default=None, metadata={"help": "BFCL-format split (BFCL_v4_<category>.json + possible_answer/) answered and scored at every evaluation: eval_bfcl/* metrics."})
    bfcl_eval_categories: str = field(default="all", metadata={"help": "Comma-separated categories or groups of bfcl_eval_dir (eval_bfcl.py --categories)."})
    bfcl_eval_limit: int | None = field(default=None, metadata={"help": "Only the first N entries of each category."})
    bfcl_eval_prompt_format: str = field(default="bfcl", metadata={"help": "bfcl (the official harness's prompts) or chat_template (eval_bfcl.py --prompt-format)."})
    bfcl_eval_max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per answer at most."})
    bfcl_eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call on each rank."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Stop after N evaluations without improving metric_for_best_model (EarlyStoppingCallback)."})
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "How much metric_for_best_model must improve to count."})
    profile_steps: str | None = field(default=None, metadata={"help": "Record a torch.profiler trace of optimizer steps A-B "
                                                                      "into output_dir/profile and print where their time went."})


# ----------------------------------------------------------------------------------------------------------------
# Recipe parsing: a positional YAML path, flags override it, unknown keys are errors that name key and file.
# ----------------------------------------------------------------------------------------------------------------


def unknown_keys(parser, recipe, config, argv):
    """Problems for the recipe keys and flags the parser does not know, and the unknown names. Checked before any
    dataclass is built: building SFTConfig validates bf16 against the hardware, and that error must not hide a typo."""
    dests = {a.dest for a in parser._actions}
    flags = {opt for a in parser._actions for opt in a.option_strings}
    keys = [key for key in config if key not in dests and key != "env"]  # `env` is TRL's: variables set from the recipe
    given = [item.split("=")[0] for item in argv if item.startswith("--")]
    bad_flags = [flag for flag in given if flag not in flags]  # exact names only: the parser takes no abbreviations
    problems = [f"unknown key '{key}' in {recipe}" for key in keys] + [f"unknown command-line flag '{f}'" for f in bad_flags]
    return problems, keys + [flag[2:] for flag in bad_flags]


def parse_recipe(argv):
    import yaml
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig), allow_abbrev=False)
    recipe, config = None, {}
    if argv and not argv[0].startswith("-"):
        recipe, argv = argv[0], argv[1:]
        if not Path(recipe).is_file():
            sys.exit(f"train_sft.py: recipe file not found: {recipe}")
        config = yaml.safe_load(Path(recipe).read_text()) or {}
        if not isinstance(config, dict):
            sys.exit(f"train_sft.py: {recipe} must be a YAML mapping of keys to values")
    problems, unknown = unknown_keys(parser, recipe, config, argv)
    if problems:
        sys.exit("train_sft.py: " + "; ".join(problems) + did_you_mean(unknown, {a.dest for a in parser._actions}))
    argv = ["--config", recipe, *argv] if recipe else argv
    # QLoRA's check needs ModelConfig alone; it goes before SFTConfig is built, which validates bf16 against the
    # hardware and would stop a QLoRA recipe on a machine without a GPU for the wrong reason.
    model_only = TrlParser((ModelConfig,)).parse_args_and_config(list(argv), return_remaining_strings=True)[0]
    problem = quantization_problem(model_only, recipe, **launch_environment())
    if problem:
        sys.exit(f"train_sft.py: {problem}")
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as err:
        if "bf16" not in str(err):
            raise
        where = f"`bf16: true` in {recipe}" if "bf16" in config else f"bf16 is on (TRL's default; {recipe} does not set it)"
        sys.exit(f"train_sft.py: {where}, but this machine has no bf16 support: set `bf16: false` "
                 "(and `fp16: true` on a GPU without bf16)")
    if script_args.datasets and any(a.split("=")[0] == "--dataset_name" for a in argv):
        logger.warning("--dataset_name %s replaces the datasets mixture of %s", script_args.dataset_name, recipe)
        script_args.datasets = []  # flags override the recipe, the data source included
    training_data.source_configs(script_args, recipe)  # dataset keys are checked before any data or model is loaded
    reorders = [key for key in ("packing", "shuffle_dataset") if getattr(training_args, key)]
    if script_args.curriculum and reorders:  # TRL shuffles, or packs by length, after our ordering
        sys.exit(f"train_sft.py: {recipe}: curriculum orders the rows simple to complex, but {' and '.join(reorders)} "
                 "reorders them: set it to false, or drop curriculum")
    if not model_args.model_name_or_path:
        sys.exit(f"train_sft.py: the recipe {recipe} must set model_name_or_path")
    check_evaluation_keys(script_args, training_args, recipe)
    problem = context_parallel_problem(training_args, model_args, recipe,
                                       int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")))
    if problem:
        sys.exit(f"train_sft.py: {problem}")
    if script_args.profile_steps is not None:
        try:
            step_profile.parse_steps(script_args.profile_steps)
        except ValueError as err:
            sys.exit(f"train_sft.py: {recipe}: {err}")
    script_args.recipe = recipe
    return script_args, training_args, model_args


def check_evaluation_keys(script_args, training_args, recipe):
    """The BFCL eval and early stopping ride on the Trainer's evaluations: say what is missing before any loading."""
    problems = []
    bfcl_metric = (training_args.metric_for_best_model or "").removeprefix("eval_").startswith("bfcl/")
    if script_args.bfcl_eval_dir:
        if not Path(script_args.bfcl_eval_dir).is_dir():
            problems.append(f"bfcl_eval_dir {script_args.bfcl_eval_dir} is not a folder")
        else:
            from eval_bfcl import resolve_categories

            try:
                resolve_categories(script_args.bfcl_eval_categories.split(","), script_args.bfcl_eval_dir)
            except SystemExit as err:  # its message names the category and what the folder has
                problems.append(f"bfcl_eval_categories: {err}")
        if script_args.bfcl_eval_prompt_format not in ("bfcl", "chat_template"):
            problems.append(f"bfcl_eval_prompt_format '{script_args.bfcl_eval_prompt_format}' is not bfcl or chat_template")
        if training_args.eval_strategy == "no":
            problems.append("bfcl_eval_dir is answered at every evaluation: set eval_strategy (steps or epoch) and eval_steps")
        if not script_args.eval_split_size:
            problems.append("bfcl_eval_dir needs the Trainer to evaluate, and the Trainer evaluates only with an eval "
                            "dataset: set eval_split_size (e.g. 200)")
    elif bfcl_metric:
        problems.append(f"metric_for_best_model {training_args.metric_for_best_model} needs bfcl_eval_dir")
    if script_args.early_stopping_patience is not None and not training_args.metric_for_best_model:
        problems.append("early_stopping_patience needs metric_for_best_model (e.g. eval_bfcl/overall)")
    if problems:
        sys.exit(f"train_sft.py: {recipe}: " + "; ".join(problems))


def recipe_keys():
    """Every key a recipe (or a command-line flag) may set."""
    from trl import ModelConfig, SFTConfig

    return {f.name for args in (ScriptArguments, SFTConfig, ModelConfig) for f in dataclasses.fields(args)}


def did_you_mean(unknown, known=None):
    """Hint lines for unknown keys: the closest valid name of each, where there is one."""
    known = recipe_keys() if known is None else known
    hints = [f"'{key}' -> did you mean '{close[0]}'?" for key in unknown
             if (close := difflib.get_close_matches(key, known, n=1))]
    return "\n  " + "\n  ".join(hints) if hints else ""


# ----------------------------------------------------------------------------------------------------------------
# Launch checks that need neither data nor model: QLoRA and context parallelism fail here in seconds, with the key.
# ----------------------------------------------------------------------------------------------------------------

MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's mixed_precision -> compute dtype


def launch_environment():
    """What the QLoRA check depends on: accelerate launch's environment, bitsandbytes and a CUDA device."""
    import importlib.util

    import torch

    return {"fsdp": os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
            "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
            "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
            "cuda_available": torch.cuda.is_available()}


def quantization_problem(model_args, recipe, fsdp, mixed_precision, bitsandbytes_installed, cuda_available):
    """Why the recipe's quantized base (QLoRA) cannot train in this launch, or None.

    Under FSDP2 the 4-bit weights must be stored (`bnb_4bit_quant_storage`) in the compute dtype. With the default
    uint8, accelerate 1.15 leaves them out of sharding (a whole copy on every GPU). With another float dtype, FSDP2's
    mixed-precision policy casts the packed 4-bit bytes to the compute dtype as if they were numbers, i.e. garbage
    weights: transformers 5.23 aligns that policy with the storage dtype (update_fsdp_plugin_peft) only for FSDP1,
    where the optimizer is created late; for FSDP2 the accelerate config's mixed_precision is used as is."""
    key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if key is None:
        return None
    if not bitsandbytes_installed:
        return f"{key}: true in {recipe} needs bitsandbytes, which is not installed (pip install -r requirements-gpu.txt)"
    if not cuda_available:
        return f"{key}: true in {recipe} needs a CUDA GPU for bitsandbytes' quantized weights, and none is visible"
    if not model_args.use_peft:
        return f"{key}: true in {recipe} freezes a quantized base, so only adapters can train: set use_peft: true"
    if not fsdp:
        return None
    if model_args.load_in_8bit:
        return (f"load_in_8bit: true in {recipe}: FSDP cannot shard 8-bit weights; use load_in_4bit with "
                "bnb_4bit_quant_storage, or a DDP accelerate config")
    storage = model_args.bnb_4bit_quant_storage or "uint8"
    compute = MIXED_PRECISION_DTYPES.get(mixed_precision, model_args.dtype)
    if storage == compute:
        return None
    why = ("FSDP2 cannot shard 4-bit weights packed in an integer dtype (accelerate keeps a whole copy on every GPU)"
           if storage in ("uint8", "int8") else
           f"FSDP2 would cast the packed 4-bit bytes from {storage} to the compute dtype {compute} as numbers (garbage "
           "weights)")
    return (f"bnb_4bit_quant_storage: {storage} in {recipe} under FSDP: {why}; set bnb_4bit_quant_storage: {compute} "
            f"(the compute dtype: mixed_precision {mixed_precision}, dtype {model_args.dtype})")


def context_parallel_problem(training_args, model_args, recipe, cp_size):
    """Why the recipe cannot run with context parallelism (parallelism_config_cp_size > 1 in the accelerate config).

    transformers 5.23 / accelerate 1.15 / torch 2.13 shard each sequence over the cp ranks with torch's context_parallel:
    SDPA only (its ring attention replaces the CUDA SDPA kernels; no FlashAttention, no CPU), the attention mask is
    dropped for plain causal attention (so no packing: TRL refuses it, rows would attend across each other), and the
    head-tail load balancer cuts every sequence into 2 x cp_size equal chunks."""
    if cp_size <= 1:
        return None
    if training_args.packing or training_args.padding_free:
        key = "packing" if training_args.packing else "padding_free"
        return (f"{key}: true in {recipe} cannot run with context parallelism (cp_size {cp_size}): it drops the "
                "attention mask, so packed rows would attend to each other; set packing: false, padding_free: false")
    if model_args.attn_implementation != "sdpa":
        return (f"attn_implementation: {model_args.attn_implementation} in {recipe}: context parallelism (cp_size "
                f"{cp_size}) supports only sdpa")
    if not training_args.pad_to_multiple_of or training_args.pad_to_multiple_of % (2 * cp_size):
        return (f"pad_to_multiple_of: {training_args.pad_to_multiple_of} in {recipe}: context parallelism splits each "
                f"sequence into 2 x cp_size = {2 * cp_size} equal chunks; set it to a multiple of {2 * cp_size}")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Reporting: real tokens per second, peak memory, and proof of how FSDP sharded the model.
# ----------------------------------------------------------------------------------------------------------------


def peak_memory_gb():
    import torch

    if torch.cuda.is_available():
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30, "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is KiB on Linux


def sharding_report(model):
    """How the parameters are laid out: DTensor placements and device mesh (FSDP2), or plain tensors."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    dtensors = [p for p in params if isinstance(p, DTensor)]
    report = {"parameters": len(params), "dtensor_parameters": len(dtensors),
              "parameter_dtypes": sorted({str(p.dtype) for p in params if p.requires_grad}),  # the master copies
              "frozen_parameter_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad})}
    if dtensors:
        report["placements"] = sorted({str(tuple(p.placements)) for p in dtensors})
        report["mesh_shape"] = list(dtensors[0].device_mesh.shape)
        report["local_numel"] = sum(p.to_local().numel() for p in dtensors)
        report["global_numel"] = sum(p.numel() for p in dtensors)
    return report


def device_name():
    import platform

    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def attention_span(dataset, max_length):
    """Token-weighted mean length of the training rows (each packed row counted as its parts), capped at max_length:
    the tokens an average trained token attends over, the s of MFU's 6N + 12*L*d*s FLOPs per token."""
    import numpy as np
    import pyarrow.compute as pc

    column = "seq_lengths" if "seq_lengths" in dataset.column_names else "input_ids"
    values = dataset.with_format("arrow")[column]
    lengths = pc.list_flatten(values) if column == "seq_lengths" else pc.list_value_length(values)
    lengths = np.asarray(lengths, dtype=np.float64)
    if max_length:
        lengths = np.minimum(lengths, max_length)
    return round(float((lengths**2).sum() / lengths.sum()), 1) if lengths.sum() else None


def run_settings(script_args, training_args, model_args):
    """Every argument of the run, JSON-safe: what `sweep.py report` compares between runs."""
    values = {**dataclasses.asdict(script_args), **dataclasses.asdict(model_args), **training_args.to_dict()}
    return json.loads(json.dumps(values, default=str))


def make_report_callback(accelerator, output_dir, run_info=None):
    from transformers import TrainerCallback

    class RunReportCallback(TrainerCallback):
        """Adds real-token throughput and peak memory to every log, and writes run_summary.json at the end."""

        def __init__(self):
            self.last = None  # (time, num_tokens)
            self.sharding = None
            self.started = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.sharding = sharding_report(model)
            self.model_config = json.loads(model.config.to_json_string()) if hasattr(model, "config") else None
            self.started = time.perf_counter()
            # The dtype the first decoder layer computes in (bf16 under mixed precision while the masters stay fp32)
            layer = next((m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")), None)
            if layer is not None:
                def record(module, inputs, output):
                    hidden = output[0] if isinstance(output, tuple) else output
                    self.sharding["compute_dtype"] = str(hidden.dtype)
                    hook.remove()
                hook = layer.register_forward_hook(record)
            if self.sharding["dtensor_parameters"]:
                logger.warning("fsdp: %d/%d parameters are DTensors %s on mesh %s", self.sharding["dtensor_parameters"],
                               self.sharding["parameters"], self.sharding["placements"], self.sharding["mesh_shape"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "num_tokens" not in logs:
                return
            now, extra = time.perf_counter(), {k: round(v, 3) for k, v in peak_memory_gb().items()}
            if self.last is not None and now > self.last[0]:
                real_tokens = logs["num_tokens"] - self.last[1]  # TRL counts non-padding tokens over all ranks
                extra["tokens_per_second_per_device"] = round(real_tokens / (now - self.last[0]) / accelerator.num_processes, 1)
            self.last = (now, logs["num_tokens"])
            if getattr(accelerator, "scaler", None) is not None:  # fp16: the dynamic loss scale should move
                extra["loss_scale"] = accelerator.scaler.get_scale()
            logs.update(extra)  # seen by the trackers (W&B, TensorBoard) that run after this callback
            state.log_history[-1].update(extra)  # the Trainer stored a copy before calling us

        def on_train_end(self, args, state, control, **kwargs):
            import torch

            memory = peak_memory_gb()
            per_rank = accelerator.gather(torch.tensor([list(memory.values())], device=accelerator.device)).tolist()
            if accelerator.is_main_process:
                summary = {
                    "distributed_type": str(accelerator.distributed_type),
                    "fsdp_version": getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
                    "num_processes": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision,
                    # the accelerate config as the launcher passed it (FSDP strategy, activation checkpointing, ...)
                    "launch": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("FSDP_", "ACCELERATE_MIXED_PRECISION"))},
                    "model_config": self.model_config,
                    **(run_info or {}),
                    "sharding": self.sharding,
                    "peak_memory_per_rank": [dict(zip(memory, row)) for row in per_rank],
                    "train_seconds": round(time.perf_counter() - self.started, 2),
                    "global_step": state.global_step,
                    "log_history": state.log_history,
                }
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1))

    return RunReportCallback()


def check_saved_adapter(trainer, folder):
    """Stop every rank when the adapter saved in `folder` lacks any trained tensor or holds one at a shard's shape:
    the known FSDP2 + PEFT failure keeps only rank 0's shard of a sharded adapter, and a resumed run then silently
    retrains the rest from scratch. Shapes are compared as a multiset: save-time key names vary with wrappers."""
    from safetensors import safe_open

    from epoch_checkpoints import fail_on_all_ranks

    problem = None
    if trainer.accelerator.is_main_process:
        expected = Counter(tuple(p.shape) for p in trainer.model.parameters() if p.requires_grad)  # DTensor: global
        path = Path(folder) / "adapter_model.safetensors"
        saved = Counter()
        if path.is_file():
            with safe_open(path, framework="pt") as f:
                saved = Counter(tuple(f.get_slice(k).get_shape()) for k in f.keys())
        missing = expected - saved
        if missing:
            problem = (f"train_sft.py: the adapter saved in {folder} lacks {sum(missing.values())} of the "
                       f"{sum(expected.values())} trained tensors at their full shape (missing shapes: "
                       f"{dict(missing)}): only part of the FSDP-sharded adapter was gathered; do not use this folder")
    fail_on_all_ranks(trainer.accelerator, problem, RuntimeError)


def make_adapter_checkpoint_callback(trainer):
    from transformers import TrainerCallback

    from epoch_checkpoints import full_state_dict

    class AdapterCheckpointCallback(TrainerCallback):
        """LoRA under FSDP: the trainer's checkpoint-N holds sharded (DCP) state to resume from; this adds the whole
        adapter gathered from every rank (adapter_model.safetensors, adapter_config.json, tokenizer), so any
        checkpoint can be evaluated or merged like a final adapter, and checks that no rank's shard is missing."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with full_state_dict(trainer):  # a collective: every rank takes part, rank 0 writes
                trainer.save_model(str(folder))
            check_saved_adapter(trainer, folder)

    return AdapterCheckpointCallback()


def last_complete_checkpoint(output_dir):
    """The newest checkpoint-N with trainer_state.json (written last), so a run killed mid-save still resumes."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
    for broken in set(checkpoints) - set(complete):
        logger.warning("resume: ignoring incomplete checkpoint %s", broken)
    if not complete:
        raise SystemExit(f"train_sft.py: --resume_from_checkpoint true but no complete checkpoint in {output_dir}")
    return str(complete[-1])


def show_examples(trainer, n):
    """Print what the model sees; ⟦...⟧ marks the tokens that carry loss, and the header names the transforms that
    made the example (irrelevance, masked, extra_tools; no_call: a source row that calls nothing)."""
    tokenizer = trainer.processing_class
    for i in range(min(n, len(trainer.train_dataset))):
        example = trainer.train_dataset[i]
        ids = example["input_ids"]
        trained = [label != -100 for label in example.get("labels") or []] or [bool(m) for m in example["assistant_masks"]]
        pieces, start = [], 0
        for j in range(1, len(ids) + 1):  # decode each run of equally-masked tokens together
            if j == len(ids) or trained[j] != trained[start]:
                text = tokenizer.decode(ids[start:j])
                pieces.append(f"⟦{text}⟧" if trained[start] else text)
                start = j
        made_by = f"; transforms: {example['transforms']}" if example.get("transforms") else ""
        print(f"=== example {i}: {len(ids)} tokens, {sum(trained)} trained{made_by} ===")
        print("".join(pieces))


# ----------------------------------------------------------------------------------------------------------------


def main(script_args, training_args, model_args):
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    if "wandb" in (training_args.report_to or []):
        if script_args.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", script_args.wandb_project)
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"  # no account needed; `wandb sync` uploads later
            logger.warning("wandb: no WANDB_API_KEY, logging offline to %s/wandb", os.environ.get("WANDB_DIR", "."))
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true" and training_args.activation_checkpointing:
        # The accelerate config asked FSDP to checkpoint; doing it twice is an error in transformers.
        logger.warning("activation checkpointing comes from the FSDP config; turning off the recipe's gradient_checkpointing")
        training_args.activation_checkpointing = training_args.gradient_checkpointing = False

    # Data
    train_dataset, eval_dataset, data_report = training_data.build_datasets(script_args, training_args.seed, script_args.recipe)
    logger.warning("data: %d train rows, %d eval rows", len(train_dataset), len(eval_dataset or []))
    if script_args.curriculum and training_args.train_sampling_strategy != "sequential":
        logger.warning("curriculum: train_sampling_strategy %s -> sequential, so the simple-to-complex order is kept",
                       training_args.train_sampling_strategy)
        training_args.train_sampling_strategy = "sequential"

    # Model: loaded by the trainer from the recipe's ModelConfig, as in TRL's sft.py
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        training_args.model_init_kwargs["quantization_config"] = quantization_config

    trainer_class = SFTTrainer
    if script_args.bfcl_eval_dir:
        from bfcl_train_eval import with_bfcl_eval

        trainer_class = with_bfcl_eval(SFTTrainer)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    cpu_fsdp.verify_fsdp_applied(trainer.accelerator)
    if script_args.show_examples:
        if trainer.accelerator.is_main_process:
            show_examples(trainer, script_args.show_examples)
        return
    run_info = {  # for the model card (model_card.py): what was trained, on what, on which machine
        "command": ["train_sft.py", *sys.argv[1:]], "recipe": script_args.recipe,
        "model_name_or_path": model_args.model_name_or_path, "use_peft": bool(model_args.use_peft),
        "data": training_data.report_for_summary(data_report),  # rows per source: read, malformed, decontaminated, taken
        "device": device_name(),
        "settings": run_settings(script_args, training_args, model_args),  # what `sweep.py report` compares
        "attention_span": attention_span(trainer.train_dataset, training_args.max_length),
    }
    if run_info["recipe"]:
        run_info["recipe_text"] = Path(run_info["recipe"]).read_text()
    trainer.callback_handler.callbacks.insert(0, make_report_callback(trainer.accelerator, training_args.output_dir, run_info))
    adapter_under_fsdp = trainer.is_fsdp_enabled and model_args.use_peft
    if adapter_under_fsdp:
        trainer.add_callback(make_adapter_checkpoint_callback(trainer))
    if script_args.bfcl_eval_dir:
        from bfcl_train_eval import BFCLEvaluator

        trainer.bfcl_evaluator = BFCLEvaluator(script_args, model_args.model_name_or_path,
                                               trainer.model.config.model_type, trainer.processing_class)
        logger.warning("bfcl eval: %d prompts of %s (%s prompt format) at every evaluation",
                       len(trainer.bfcl_evaluator.work), script_args.bfcl_eval_dir,
                       trainer.bfcl_evaluator.prompt_format["prompt_format"])
        if trainer.bfcl_evaluator.prompt_format["fallback"]:
            logger.warning("bfcl eval: %s", trainer.bfcl_evaluator.prompt_format["fallback"])
    if script_args.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(script_args.early_stopping_patience, script_args.early_stopping_threshold))
    if script_args.profile_steps:
        trainer.add_callback(step_profile.make_profile_callback(trainer.accelerator, training_args.output_dir,
                                                                script_args.profile_steps))
    if script_args.epoch_checkpoints or script_args.hub_push_epochs:
        from epoch_checkpoints import EpochCheckpointCallback

        trainer.add_callback(EpochCheckpointCallback(trainer, script_args))

    resume = training_args.resume_from_checkpoint
    if str(resume).lower() == "true":
        resume = last_complete_checkpoint(training_args.output_dir)
        logger.warning("resume: continuing from %s", resume)
    trainer.train(resume_from_checkpoint=resume)

    # Intermediate checkpoints stay sharded (fast, resumable); the final model is gathered into one HF checkpoint.
    if not script_args.save_final_model:
        trainer.end()
        return
    from epoch_checkpoints import full_state_dict

    with full_state_dict(trainer):  # gathered from the FSDP shards (a no-op without FSDP)
        trainer.save_model(training_args.output_dir)
    if adapter_under_fsdp:
        check_saved_adapter(trainer, training_args.output_dir)
    if trainer.accelerator.is_main_process:
        datasets = ", ".join(source.path for source in training_data.source_configs(script_args))
        trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=datasets)
        skipped = sum(sum(source["skipped"].values()) for source in data_report["sources"])
        logger.warning("saved %s (%d malformed rows skipped, counts in run_summary.json)", training_args.output_dir, skipped)
    trainer.end()


if __name__ == "__main__":
    cpu_fsdp.enable_fsdp_on_cpu()  # before SFTConfig exists: it creates the accelerator state
    main(*parse_recipe(sys.argv[1:]))
