"""Supervised fine-tuning for function calling with TRL's SFTTrainer, on FSDP through Accelerate.

    accelerate launch --config_file accelerate_configs/fsdp_full.yaml train_sft.py recipes/xlam.yaml
    python train_sft.py recipes/demo_cpu.yaml --show_examples 2        # what the model sees, no training
    accelerate launch ... train_sft.py RECIPE.yaml --learning_rate 1e-5 # flags override the recipe

The recipe is a YAML file of SFTConfig / ModelConfig / ScriptArguments keys; an unknown key is an error.
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
import function_calling
import step_profile

logger = logging.getLogger("train_sft")

DATA_FORMATS = ("xlam", "messages", "prompt_completion", "dolly")


@dataclass
class ScriptArguments:
    dataset_name: str = field(default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet file."})
    dataset_format: str = field(default="xlam", metadata={"help": f"One of {DATA_FORMATS}."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from the dataset."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep only the first N rows (after shuffling)."})
    eval_split_size: float = field(default=0.0, metadata={"help": "Held-out eval rows: a fraction (<1) or a count."})
    max_malformed_fraction: float = field(default=0.01, metadata={"help": "Fail when more rows than this are malformed."})
    show_examples: int = field(default=0, metadata={"help": "Print N rendered examples with the trained span marked, then exit."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (WANDB_PROJECT)."})
    epoch_checkpoints: bool = field(default=False, metadata={"help": "Save a HF checkpoint per epoch in output_dir/checkpoints/epN."})
    hub_push_epochs: str | None = field(default=None, metadata={"help": "Push each epoch: 'branch', 'repo' or 'both'."})
    save_final_model: bool = field(default=True, metadata={"help": "Gather and save the final model (benchmarks turn it off)."})
    profile_steps: str | None = field(default=None, metadata={"help": "Record a torch.profiler trace of optimizer steps A-B "
                                                                      "into output_dir/profile and print where their time went."})


# ----------------------------------------------------------------------------------------------------------------
# Recipe parsing: a positional YAML path, flags override it, unknown keys are errors that name key and file.
# ----------------------------------------------------------------------------------------------------------------


def parse_recipe(argv):
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe, argv = argv[0], ["--config", argv[0], *argv[1:]]
        if not Path(recipe).is_file():
            sys.exit(f"train_sft.py: recipe file not found: {recipe}")
    script_args, training_args, model_args, unknown_in_recipe, unknown_flags = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    problems = [f"unknown key '{k.lstrip('-')}' in {recipe}" for k in unknown_in_recipe if k.startswith("--")]
    problems += [f"unknown command-line flag '{k}'" for k in unknown_flags if k.startswith("-")]
    if problems:
        given = [item.lstrip("-").split("=")[0] for item in unknown_in_recipe + unknown_flags if item.startswith("-")]
        sys.exit("train_sft.py: " + "; ".join(problems) + did_you_mean(given))
    if not script_args.dataset_name:
        sys.exit(f"train_sft.py: the recipe {recipe} must set dataset_name")
    if script_args.dataset_format not in DATA_FORMATS:
        sys.exit(f"train_sft.py: dataset_format '{script_args.dataset_format}' in {recipe} is not one of {DATA_FORMATS}")
    if not model_args.model_name_or_path:
        sys.exit(f"train_sft.py: the recipe {recipe} must set model_name_or_path")
    if script_args.profile_steps is not None:
        try:
            step_profile.parse_steps(script_args.profile_steps)
        except ValueError as err:
            sys.exit(f"train_sft.py: {recipe}: {err}")
    return script_args, training_args, model_args


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
# Data: load, convert to the trainer's formats, count what is skipped and why.
# ----------------------------------------------------------------------------------------------------------------


def load_raw_dataset(args):
    from datasets import load_dataset

    path = Path(args.dataset_name)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if path.suffix in builders:
        if not path.is_file():
            sys.exit(f"train_sft.py: dataset_name file not found: {path}")
        return load_dataset(builders[path.suffix], data_files=str(path), split="train")
    return load_dataset(args.dataset_name, name=args.dataset_config, split=args.dataset_split)


def convert_rows(raw, args):
    """Convert every row with the format's converter; malformed rows are skipped and counted by reason."""
    from datasets import Dataset, Features, Json, List, Value

    convert = {
        "xlam": function_calling.xlam_to_messages,
        "messages": function_calling.check_messages_row,
        "prompt_completion": function_calling.check_prompt_completion_row,
        "dolly": function_calling.dolly_to_prompt_completion,
    }[args.dataset_format]
    rows, skipped, first_bad = [], Counter(), {}
    for index, row in enumerate(raw):
        try:
            rows.append(convert(row))
        except function_calling.MalformedRow as err:
            skipped[err.reason] += 1
            first_bad.setdefault(err.reason, f"row {index}: {err}")
    total = len(raw)
    if skipped:
        logger.warning("skipped %d of %d rows of %s:", sum(skipped.values()), total, args.dataset_name)
        for reason, count in skipped.most_common():
            logger.warning("  %-22s %6d  (first: %s)", reason, count, first_bad[reason][:120])
    if total == 0 or sum(skipped.values()) > args.max_malformed_fraction * total:
        raise SystemExit(
            f"train_sft.py: {sum(skipped.values())} of {total} rows of {args.dataset_name} are malformed, more than "
            f"max_malformed_fraction={args.max_malformed_fraction}: {dict(skipped)}"
        )
    if args.dataset_format in ("xlam", "messages"):
        # Json() keeps each message and its tool-call arguments as written; Arrow structs would merge every row's
        # argument names into one schema and render nulls into the prompt.
        features = Features({"messages": List(Json()), "tools": Value("string")})
        rows = [{"messages": r["messages"], "tools": json.dumps(r["tools"]) if r["tools"] else None} for r in rows]
        return Dataset.from_list(rows, features=features), skipped
    return Dataset.from_list(rows), skipped


def split_eval(dataset, args, seed):
    if not args.eval_split_size:
        return dataset, None
    size = args.eval_split_size if args.eval_split_size < 1 else int(args.eval_split_size)
    parts = dataset.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


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


def make_report_callback(accelerator, output_dir, run_info):
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
                    "device": torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.device.type,
                    "mixed_precision": accelerator.mixed_precision,
                    # the accelerate config as the launcher passed it (FSDP strategy, activation checkpointing, ...)
                    "launch": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("FSDP_", "ACCELERATE_MIXED_PRECISION"))},
                    "model_config": self.model_config,
                    **run_info,
                    "sharding": self.sharding,
                    "peak_memory_per_rank": [dict(zip(memory, row)) for row in per_rank],
                    "train_seconds": round(time.perf_counter() - self.started, 2),
                    "global_step": state.global_step,
                    "log_history": state.log_history,
                }
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1))

    return RunReportCallback()


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
    """Print what the model sees; ⟦...⟧ marks the tokens that carry loss."""
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
        print(f"=== example {i}: {len(ids)} tokens, {sum(trained)} trained ===")
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
    raw = load_raw_dataset(script_args)
    if script_args.max_samples:
        raw = raw.shuffle(seed=training_args.seed).select(range(min(script_args.max_samples, len(raw))))
    dataset, skipped = convert_rows(raw, script_args)
    train_dataset, eval_dataset = split_eval(dataset, script_args, training_args.seed)
    logger.warning("data: %d train rows, %d eval rows (%s format)", len(train_dataset), len(eval_dataset or []), script_args.dataset_format)

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

    trainer = SFTTrainer(
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
    run_info = {"settings": run_settings(script_args, training_args, model_args),
                "attention_span": attention_span(trainer.train_dataset, training_args.max_length)}
    trainer.callback_handler.callbacks.insert(0, make_report_callback(trainer.accelerator, training_args.output_dir, run_info))
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
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=script_args.dataset_name)
        logger.warning("saved %s (skipped rows: %s)", training_args.output_dir, dict(skipped) or "none")
    trainer.end()


if __name__ == "__main__":
    cpu_fsdp.enable_fsdp_on_cpu()  # before SFTConfig exists: it creates the accelerator state
    main(*parse_recipe(sys.argv[1:]))
