"""Supervised fine-tuning for function calling with TRL's SFTTrainer, on FSDP through Accelerate.

    accelerate launch --config_file accelerate_configs/fsdp_full.yaml train_sft.py recipes/xlam.yaml
    python train_sft.py recipes/demo_cpu.yaml --show_examples 2        # what the model sees, no training
    accelerate launch ... train_sft.py RECIPE.yaml --learning_rate 1e-5 # flags override the recipe

The recipe is a YAML file of SFTConfig / ModelConfig / ScriptArguments keys; an unknown key is an error.
"""

import difflib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cpu_fsdp
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


# ----------------------------------------------------------------------------------------------------------------
# Recipe parsing: a positional YAML path, flags override it, unknown keys are errors that name key and file.
# ----------------------------------------------------------------------------------------------------------------


def unknown_keys(parser, recipe, config, argv):
    """Recipe keys and flags the parser does not know, with a 'did you mean' hint each. Checked before any dataclass
    is built: building SFTConfig validates bf16 against the hardware, and that error must not hide a typo."""
    dests = {a.dest for a in parser._actions}
    flags = {opt for a in parser._actions for opt in a.option_strings}
    problems, hints = [], []
    for key in config:
        if key not in dests and key != "env":  # `env` is TRL's: environment variables set from the recipe
            problems.append(f"unknown key '{key}' in {recipe}")
            hints += [f"'{key}' -> did you mean '{c}'?" for c in difflib.get_close_matches(key, dests, n=1)]
    for item in argv:
        flag = item.split("=")[0]
        if flag.startswith("--") and flag not in flags:  # exact names only: the parser takes no abbreviations
            problems.append(f"unknown command-line flag '{flag}'")
            hints += [f"'{flag[2:]}' -> did you mean '{c}'?" for c in difflib.get_close_matches(flag[2:], dests, n=1)]
    return problems, hints


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
    problems, hints = unknown_keys(parser, recipe, config, argv)
    if problems:
        sys.exit("train_sft.py: " + "; ".join(problems) + ("\n  " + "\n  ".join(hints) if hints else ""))
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(
            ["--config", recipe, *argv] if recipe else argv)
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
    if not model_args.model_name_or_path:
        sys.exit(f"train_sft.py: the recipe {recipe} must set model_name_or_path")
    script_args.recipe = recipe
    return script_args, training_args, model_args


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


def make_report_callback(accelerator, output_dir, data_report=None):
    from transformers import TrainerCallback

    class RunReportCallback(TrainerCallback):
        """Adds real-token throughput and peak memory to every log, and writes run_summary.json at the end."""

        def __init__(self):
            self.last = None  # (time, num_tokens)
            self.sharding = None
            self.started = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.sharding = sharding_report(model)
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
                    "sharding": self.sharding,
                    "peak_memory_per_rank": [dict(zip(memory, row)) for row in per_rank],
                    "train_seconds": round(time.perf_counter() - self.started, 2),
                    "global_step": state.global_step,
                    "data": data_report,
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
    trainer.callback_handler.callbacks.insert(0, make_report_callback(trainer.accelerator, training_args.output_dir,
                                                                         training_data.report_for_summary(data_report)))
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
        skipped = sum(sum(source["skipped"].values()) for source in data_report["sources"])
        logger.warning("saved %s (%d malformed rows skipped, counts in run_summary.json)", training_args.output_dir, skipped)
    trainer.end()


if __name__ == "__main__":
    cpu_fsdp.enable_fsdp_on_cpu()  # before SFTConfig exists: it creates the accelerator state
    main(*parse_recipe(sys.argv[1:]))
