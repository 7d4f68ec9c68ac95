"""Trainer callbacks of train_sft.py, and the checkpoints they write.

    RunReportCallback          real-token throughput and peak memory in every log; run_summary.json at the end
    AdapterCheckpointCallback  LoRA under FSDP: every checkpoint-N also holds the whole adapter, checked complete
    EpochCheckpointCallback    a Hugging Face checkpoint per epoch (`epoch_checkpoints: true`), optionally pushed to the
                               hub (`hub_push_epochs`: branch / repo / both), as LLM Foundry's hf_checkpointer does

Epoch checkpoints: output_dir/checkpoints/ep1, ep2, ... hold model + tokenizer + README.md (model card: recipe,
epoch, eval loss), loadable with AutoModelForCausalLM.from_pretrained. At the end of each epoch the held-out split is
evaluated (unless that step was just evaluated), the model is gathered from its FSDP shards into one full state dict
on every rank and saved by rank 0, then rank 0 pushes (branch `epoch-N` of `hub_model_id`, or a repository
`<hub_model_id>-epoch-N`, or both). The trainer's own resumable checkpoints stay sharded.

The token is read from the HF_TOKEN environment variable only (fcsft/hub.py). The hub is checked before the first
step, so a missing token or an unreachable hub fails in seconds, not after an epoch. A push that fails later stops
the run with a message naming the local checkpoint, which is kept.
"""

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

from transformers import TrainerCallback

from fcsft.distributed import fail_on_all_ranks, full_state_dict
from fcsft.errors import UserError
from fcsft.hub import (
    HubPushError,
    hub_access_problem,
    make_hub_client,
    push_folder,
    scrub_token,
    scrub_value,
)
from fcsft.metrics import attention_span, device_name, peak_memory_now
from fcsft.model_card import front_matter
from fcsft.recipe import run_settings
from fcsft.training_data import report_for_summary, source_configs

logger = logging.getLogger(__name__)

PUSH_MODES = ("branch", "repo", "both")


# ----------------------------------------------------------------------------------------------------------------
# The run report: run_summary.json
# ----------------------------------------------------------------------------------------------------------------


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


def make_report_callback(accelerator, output_dir, run_info=None):
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
            now, extra = time.perf_counter(), {k: round(v, 3) for k, v in peak_memory_now().items()}
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

            memory = peak_memory_now()
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
                if summary.get("resumed_from"):  # the trainer's average counts only this process's steps
                    summary["train_loss_note"] = (f"resumed from {summary['resumed_from']}: the trainer's train_loss in "
                                                  "log_history averages only the steps run after resuming; the "
                                                  "per-step losses in log_history cover the whole run")
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "run_summary.json").write_text(json.dumps(summary, indent=1))

    return RunReportCallback()


def length_report(given, trainer, max_length):
    """What the trainer's own truncation did to the rows it was given (`given`: the dataset handed to it): TRL cuts
    every tokenized row to max_length and then drops the rows left without a trained token (with assistant-only loss:
    the reply was cut off), silently. {"max_length", "rows_given", "rows_kept", "dropped_for_length", "truncated",
    "per_source": {source: {"dropped_for_length", "truncated"}}} (truncated: rows now exactly max_length tokens long,
    i.e. cut, or exactly that long to begin with), also logged per source."""
    dataset = trainer.train_dataset
    if max_length is None or dataset is None or "input_ids" not in dataset.column_names:
        return None
    sources_given = Counter(given["source"]) if "source" in given.column_names else Counter({"": len(given)})
    kept = dataset["source"] if "source" in dataset.column_names else [""] * len(dataset)
    truncated = Counter(source for source, ids in zip(kept, dataset["input_ids"]) if len(ids) >= max_length)
    dropped = sources_given - Counter(kept)
    report = {"max_length": max_length, "rows_given": len(given), "rows_kept": len(dataset),
              "dropped_for_length": sum(dropped.values()), "truncated": sum(truncated.values()),
              "per_source": {source: {"dropped_for_length": dropped[source], "truncated": truncated[source]}
                             for source in sources_given if dropped[source] or truncated[source]}}
    for source, counts in report["per_source"].items():
        logger.warning("data: %s: max_length %d: %d of %d train rows dropped (no trained token left after truncation), "
                       "%d truncated; raise max_length to keep them", source or "train rows", max_length,
                       counts["dropped_for_length"], sources_given[source], counts["truncated"])
    return report


def run_info(script_args, training_args, model_args, trainer, data_report):
    """What run_summary.json records besides the measurements: what was trained, on what, on which machine (the
    model card and `sweep.py report` read it)."""
    info = {
        "command": ["train_sft.py", *sys.argv[1:]], "recipe": script_args.recipe,
        "model_name_or_path": model_args.model_name_or_path, "use_peft": bool(model_args.use_peft),
        "data": report_for_summary(data_report),  # rows per source: read, malformed, decontaminated, taken
        "device": device_name(),
        "settings": run_settings(script_args, training_args, model_args),  # what `sweep.py report` compares
        "attention_span": attention_span(trainer.train_dataset, training_args.max_length),
    }
    if info["recipe"]:
        info["recipe_text"] = Path(info["recipe"]).read_text()
    return scrub_value(info)  # no token is written, whichever way it was given (a refused hub_token included)


# ----------------------------------------------------------------------------------------------------------------
# LoRA under FSDP: the whole adapter in every checkpoint
# ----------------------------------------------------------------------------------------------------------------


def check_saved_adapter(trainer, folder):
    """Stop every rank when the adapter saved in `folder` lacks any trained tensor or holds one at a shard's shape:
    the known FSDP2 + PEFT failure keeps only rank 0's shard of a sharded adapter, and a resumed run then silently
    retrains the rest from scratch. Shapes are compared as a multiset: save-time key names vary with wrappers."""
    from safetensors import safe_open

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
        raise UserError(f"--resume_from_checkpoint true but no complete checkpoint in {output_dir}")
    for newest in reversed(complete):  # a damaged file (a full disk, a copy cut short) falls back to the one before
        problem = damaged_checkpoint_file(newest)
        if problem is None:
            return str(newest)
        logger.warning("resume: %s is damaged (%s): falling back to the previous complete checkpoint", newest, problem)
    raise UserError(f"--resume_from_checkpoint true but every checkpoint in {output_dir} is damaged; the last: {problem}")


def damaged_checkpoint_file(folder):
    """The first file of a checkpoint that is cut short or corrupt, with why, or None. Reads only headers and zip
    directories (CRCs of the small torch files), so it costs little even for a large model."""
    import zipfile

    for path in sorted(Path(folder).rglob("*")):
        if path.suffix in (".pth", ".pt", ".bin") and path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip() if path.stat().st_size < (64 << 20) else None  # CRCs of small files only
            except (zipfile.BadZipFile, OSError) as err:
                return f"{path.name}: {err}"
            if bad:
                return f"{path.name}: corrupt member {bad}"
        elif path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return problem
        elif path.name == ".metadata" and (problem := distcp_problem(path.parent)):
            return problem
    return None


def safetensors_problem(path):
    """The file shorter than its header says (a save cut short), or an unreadable header."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path.name}: unreadable header ({err})"
    if path.stat().st_size < 8 + header_size + end:
        return f"{path.name}: {path.stat().st_size} bytes, its header needs {8 + header_size + end}"
    return None


def distcp_problem(folder):
    """A torch.distributed.checkpoint folder (FSDP's per-rank shards) with a shard shorter than its metadata says."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 - any failure to read the metadata means the folder cannot be loaded
        return f"{folder.name}/.metadata: unreadable ({type(err).__name__})"
    for info in storage.values():
        shard = folder / info.relative_path
        if not shard.is_file() or shard.stat().st_size < info.offset + info.length:
            return f"{folder.name}/{info.relative_path}: missing or cut short"
    return None


def save_final_model(trainer, output_dir, check_adapter):
    """Gather the FSDP shards into one Hugging Face checkpoint in output_dir (intermediate checkpoints stay sharded:
    fast and resumable) and check that a LoRA adapter saved whole."""
    with full_state_dict(trainer):  # a no-op without FSDP
        trainer.save_model(output_dir)
    if check_adapter:
        check_saved_adapter(trainer, output_dir)


# ----------------------------------------------------------------------------------------------------------------
# Epoch checkpoints and their hub pushes
# ----------------------------------------------------------------------------------------------------------------


def hub_targets(repo_id, epoch, mode):
    """[(repository, branch or None)] that one epoch goes to."""
    targets = []
    if mode in ("branch", "both"):
        targets.append((repo_id, f"epoch-{epoch}"))
    if mode in ("repo", "both"):
        targets.append((f"{repo_id}-epoch-{epoch}", None))
    return targets


class EpochCheckpointCallback(TrainerCallback):
    def __init__(self, trainer, script_args, hub_client=None, recipe_path=None):
        self.trainer = trainer
        self.script_args = script_args
        self.args = trainer.args
        self.push_mode = script_args.hub_push_epochs
        self.hub_client = hub_client
        self.pending_epoch = None  # epoch whose checkpoint waits for the end-of-epoch evaluation
        # For the model card: train_sft.py is run as `train_sft.py RECIPE.yaml [--flag value ...]`.
        argv_recipe = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1].endswith((".yaml", ".yml")) else None
        self.recipe_path = recipe_path or argv_recipe
        self.overrides = sys.argv[2:] if argv_recipe and self.recipe_path == argv_recipe else []

        if self.push_mode is not None and self.push_mode not in PUSH_MODES:
            raise UserError(f"hub_push_epochs '{self.push_mode}' is not one of {PUSH_MODES}")
        if self.push_mode:
            if not self.args.hub_model_id:
                raise UserError(f"hub_push_epochs={self.push_mode} needs hub_model_id "
                                 "(e.g. your-name/opt-1.3b-dolly) in the recipe or on the command line")
            if self.args.hub_token:
                raise UserError("do not pass the token as hub_token (it would end up in the recipe, the "
                                 "shell history and the model card); export HF_TOKEN instead")

    # --- hub ------------------------------------------------------------------------------------------------------

    def _client(self):
        if self.hub_client is None:
            self.hub_client = make_hub_client(os.environ["HF_TOKEN"])
        return self.hub_client

    def check_hub(self):
        """Before the first step: token present, hub reachable, main repository writable."""
        problem = None
        if self.trainer.accelerator.is_main_process:
            problem = hub_access_problem(self._client, self.args.hub_model_id, self.args.hub_private_repo,
                                         f"hub_push_epochs={self.push_mode}",
                                         create_repo=self.push_mode in ("branch", "both"))
            if problem:
                problem = (f"{problem}\n  Fix the network/token, or drop hub_push_epochs to train "
                           "with local epoch checkpoints only.")
        fail_on_all_ranks(self.trainer.accelerator, problem)

    def push(self, folder, epoch, eval_loss):
        """Rank 0 only. Returns an error message, or None when every target got the epoch."""
        loss = f"{eval_loss:.4f}" if eval_loss is not None else "n/a"
        for repo_id, branch in hub_targets(self.args.hub_model_id, epoch, self.push_mode):
            problem = push_folder(self._client(), folder, repo_id, branch, self.args.hub_private_repo,
                                  f"epoch {epoch}", f"epoch {epoch}: eval_loss {loss}")
            if problem:
                return problem
        return None

    # --- the checkpoint ----------------------------------------------------------------------------------------------

    def model_card(self, epoch, eval_loss, state):
        args, sources = self.args, source_configs(self.script_args)  # `dataset_name`, or a mixture's datasets
        base_model = getattr(self.trainer.model.config, "_name_or_path", None)
        adapter = hasattr(self.trainer.model, "peft_config")  # a LoRA run saves an adapter, not a full model
        train_losses = [h["loss"] for h in state.log_history if "loss" in h]
        eval_rows = len(self.trainer.eval_dataset) if self.trainer.eval_dataset is not None else 0
        accelerator = self.trainer.accelerator
        lines = [
            front_matter(base_model, [source.path for source in sources], adapter, ["trl", "sft", "fsdp"]),
            f"# {args.run_name or Path(args.output_dir).name}: epoch {epoch} of {state.num_train_epochs}", "",
            f"`{base_model}` fine-tuned on {', '.join(f'`{source.path}` ({source.format} format)' for source in sources)} with TRL's "
            f"SFTTrainer through `train_sft.py`. This is the checkpoint at the end of epoch {epoch}.", "",
            "| | |", "|---|---|",
            f"| epoch | {epoch} of {state.num_train_epochs} |",
            f"| optimizer steps | {state.global_step} of {state.max_steps} |",
            f"| eval loss | {f'{eval_loss:.4f}' if eval_loss is not None else 'not evaluated (no held-out split)'} "
            f"({eval_rows} held-out rows) |",
            f"| last logged train loss | {f'{train_losses[-1]:.4f}' if train_losses else 'n/a'} |",
            f"| processes | {accelerator.num_processes} ({accelerator.distributed_type.value}, mixed precision "
            f"{accelerator.mixed_precision}) |",
            f"| global batch | {args.per_device_train_batch_size} x {accelerator.num_processes} x "
            f"{args.gradient_accumulation_steps} sequences |",
            "",
        ]
        if self.recipe_path and Path(self.recipe_path).is_file():
            lines += [f"## Recipe `{self.recipe_path}`", "", "```yaml", Path(self.recipe_path).read_text().rstrip(), "```", ""]
            if self.overrides:
                lines += ["Command-line overrides: `" + " ".join(self.overrides) + "`", ""]
        return scrub_token("\n".join(lines))

    def save_epoch(self, epoch, eval_loss, state):
        folder = Path(self.args.output_dir) / "checkpoints" / f"ep{epoch}"
        with full_state_dict(self.trainer):
            self.trainer.save_model(str(folder))  # every rank gathers; rank 0 writes
        problem = None
        if self.trainer.accelerator.is_main_process:
            (folder / "README.md").write_text(self.model_card(epoch, eval_loss, state))
            (folder / "epoch_info.json").write_text(json.dumps(
                {"epoch": epoch, "global_step": state.global_step, "eval_loss": eval_loss}, indent=1))
            logger.warning("epoch %d saved to %s (eval_loss %s)", epoch, folder, eval_loss)
            if self.push_mode:
                problem = self.push(folder, epoch, eval_loss)
        if self.push_mode:
            fail_on_all_ranks(self.trainer.accelerator, problem, HubPushError)

    # --- Trainer events ----------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.push_mode:
            self.check_hub()

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch or 0)
        if epoch < 1 or abs(state.epoch - epoch) > 1e-6:
            logger.warning("training stopped at epoch %.2f, before the end of an epoch: no epoch "
                           "checkpoint (the final model is still saved)", state.epoch or 0)
            return
        evaluated_now = [h["eval_loss"] for h in state.log_history if "eval_loss" in h and h.get("step") == state.global_step]
        if evaluated_now or self.trainer.eval_dataset is None:
            self.save_epoch(epoch, evaluated_now[-1] if evaluated_now else None, state)
        else:
            self.pending_epoch = epoch  # the trainer evaluates right after on_epoch_end; save in on_evaluate
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.pending_epoch is not None:
            epoch, self.pending_epoch = self.pending_epoch, None
            self.save_epoch(epoch, (metrics or {}).get("eval_loss"), state)
