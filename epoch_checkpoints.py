"""A Hugging Face checkpoint per epoch, and optionally a push of each one to the hub (LLM Foundry's hf_checkpointer).

train_sft.py adds EpochCheckpointCallback when the recipe sets `epoch_checkpoints: true` or `hub_push_epochs`:

    output_dir/checkpoints/ep1, ep2, ...   model + tokenizer + README.md (model card: recipe, epoch, eval loss),
                                           loadable with AutoModelForCausalLM.from_pretrained
    hub_push_epochs: branch                each epoch to branch `epoch-N` of `hub_model_id`
    hub_push_epochs: repo                  each epoch to its own repository `<hub_model_id>-epoch-N`
    hub_push_epochs: both                  both of the above

At the end of each epoch the held-out split is evaluated (unless that step was just evaluated), the model is gathered
from its FSDP shards into one full state dict on every rank and saved by rank 0, then rank 0 pushes. The trainer's
own resumable checkpoints stay sharded: the state-dict type is switched back right after the save.

The token is read from the HF_TOKEN environment variable only, never printed, logged or written to the card. The hub is
checked before the first step (whoami + create_repo), so a missing token or an unreachable hub fails in seconds, not
after an epoch. A push that fails later stops the run with a message naming the local checkpoint, which is kept.
"""

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from transformers import TrainerCallback

import training_data

logger = logging.getLogger("epoch_checkpoints")

PUSH_MODES = ("branch", "repo", "both")


class HubPushError(RuntimeError):
    """A hub call failed; the local checkpoint named in the message is complete."""


def make_hub_client(token):
    """The real client. Tests replace this (or pass `hub_client=`) with a stand-in that records calls."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def hub_targets(repo_id, epoch, mode):
    """[(repository, branch or None)] that one epoch goes to."""
    targets = []
    if mode in ("branch", "both"):
        targets.append((repo_id, f"epoch-{epoch}"))
    if mode in ("repo", "both"):
        targets.append((f"{repo_id}-epoch-{epoch}", None))
    return targets


@contextlib.contextmanager
def full_state_dict(trainer):
    """Under FSDP, make trainer.save_model gather a FULL state dict (a collective: every rank must enter), then put
    back the sharded type the trainer's resumable checkpoints use. The configs are reset too: accelerate only fills
    them when they are None, and FSDP1 refuses a FULL type with a sharded config."""
    if not trainer.is_fsdp_enabled:
        yield
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    saved = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = saved


def looks_local(name):
    return name is None or Path(name).exists() or Path(name).suffix in (".json", ".jsonl", ".parquet")


# --- hub calls, shared with model_card.py: the token comes from HF_TOKEN only and never reaches a message --------------


def scrub_token(text):
    token = os.environ.get("HF_TOKEN")
    return str(text).replace(token, "***") if token else str(text)


def hub_access_problem(get_client, repo_id, private, what, create_repo=True):
    """Before any work: a token in HF_TOKEN, the hub reachable, the repository writable. The problem, or None.
    `what` names the setting that asked for the push (e.g. "hub_push_epochs=branch")."""
    if not os.environ.get("HF_TOKEN"):
        return (f"{what} needs a write token in the HF_TOKEN environment variable (export HF_TOKEN=hf_...); it is read "
                "from there only")
    try:
        client = get_client()
        who = client.whoami()
        if create_repo:
            client.create_repo(repo_id, private=private, exist_ok=True)
        logger.warning("%s: pushing to %s as %s", what, repo_id, who.get("name", "?") if isinstance(who, dict) else "?")
    except Exception as err:  # noqa: BLE001 - any failure here means we cannot push later either
        return (f"cannot reach or write to the Hugging Face Hub for {what} (hub_model_id {repo_id}): "
                f"{type(err).__name__}: {scrub_token(err)[:500]}")
    return None


def push_folder(client, folder, repo_id, branch, private, what, commit_message):
    """Upload a local folder to a repository (and branch), creating them if needed. Returns None, or an error message
    that names the local folder, which is kept, and the command that pushes it later."""
    where = f"{repo_id}@{branch}" if branch else repo_id
    try:
        client.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            client.create_branch(repo_id, branch=branch, exist_ok=True)
        client.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch, commit_message=commit_message)
    except Exception as err:  # noqa: BLE001
        retry = f"hf upload {repo_id} {folder}" + (f" --revision {branch}" if branch else "")
        return (f"pushing {what} to {where} failed: {type(err).__name__}: {scrub_token(err)[:500]}\n"
                f"  The checkpoint is saved at {folder}; push it later with: {retry}")
    logger.warning("pushed %s to https://huggingface.co/%s%s", what, repo_id, f"/tree/{branch}" if branch else "")
    return None


def fail_on_all_ranks(accelerator, message, error=SystemExit):
    """Rank 0 decided (talked to the hub, checked a file); every rank learns the outcome so all stop together instead
    of waiting in a collective for a rank that has gone."""
    from accelerate.utils import broadcast_object_list

    message = broadcast_object_list([message])[0] if accelerator.num_processes > 1 else message
    if message:
        raise error(message) if accelerator.is_main_process else SystemExit(1)  # say it once


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
            raise SystemExit(f"epoch_checkpoints: hub_push_epochs '{self.push_mode}' is not one of {PUSH_MODES}")
        if self.push_mode:
            if not self.args.hub_model_id:
                raise SystemExit(f"epoch_checkpoints: hub_push_epochs={self.push_mode} needs hub_model_id "
                                 "(e.g. your-name/opt-1.3b-dolly) in the recipe or on the command line")
            if self.args.hub_token:
                raise SystemExit("epoch_checkpoints: do not pass the token as hub_token (it would end up in the recipe, the "
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
                problem = (f"epoch_checkpoints: {problem}\n  Fix the network/token, or drop hub_push_epochs to train "
                           "with local epoch checkpoints only.")
        fail_on_all_ranks(self.trainer.accelerator, problem)

    def push(self, folder, epoch, eval_loss):
        """Rank 0 only. Returns an error message, or None when every target got the epoch."""
        loss = f"{eval_loss:.4f}" if eval_loss is not None else "n/a"
        for repo_id, branch in hub_targets(self.args.hub_model_id, epoch, self.push_mode):
            problem = push_folder(self._client(), folder, repo_id, branch, self.args.hub_private_repo,
                                  f"epoch {epoch}", f"epoch {epoch}: eval_loss {loss}")
            if problem:
                return f"epoch_checkpoints: {problem}"
        return None

    # --- the checkpoint ----------------------------------------------------------------------------------------------

    def model_card(self, epoch, eval_loss, state):
        args, script_args = self.args, self.script_args
        base_model = getattr(self.trainer.model.config, "_name_or_path", None)
        metadata = {"library_name": "transformers", "tags": ["trl", "sft", "fsdp"]}
        if not looks_local(base_model):
            metadata["base_model"] = base_model
        sources = training_data.source_configs(script_args)  # `dataset_name`, or every dataset of a mixture
        if any(not looks_local(source.path) for source in sources):
            metadata["datasets"] = [source.path for source in sources if not looks_local(source.path)]
        train_losses = [h["loss"] for h in state.log_history if "loss" in h]
        eval_rows = len(self.trainer.eval_dataset) if self.trainer.eval_dataset is not None else 0
        accelerator = self.trainer.accelerator
        lines = [
            "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
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
