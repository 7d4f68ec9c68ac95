"""Supervised fine-tuning for function calling with TRL's SFTTrainer, on FSDP through Accelerate.

    accelerate launch --config_file accelerate_configs/fsdp_full.yaml train_sft.py recipes/xlam.yaml
    python train_sft.py recipes/demo_cpu.yaml --show_examples 2        # what the model sees, no training
    python train_sft.py recipes/xlam_blend.yaml --export_data rows.jsonl # the training rows, no model loaded
    accelerate launch ... train_sft.py RECIPE.yaml --learning_rate 1e-5 # flags override the recipe

The recipe is a YAML file of SFTConfig / ModelConfig / ScriptArguments keys (fcsft/recipe.py); an unknown key is an
error. With `bfcl_eval_dir`, every evaluation also generates on a BFCL-format split and logs eval_bfcl/*.
"""

import logging
import sys
from pathlib import Path

from fcsft.bfcl_train_eval import attach_bfcl_evaluator, with_bfcl_eval
from fcsft.callbacks import (
    EpochCheckpointCallback,
    last_complete_checkpoint,
    length_report,
    make_adapter_checkpoint_callback,
    make_report_callback,
    run_info,
    save_final_model,
)
from fcsft.distributed import enable_fsdp_on_cpu, verify_fsdp_applied
from fcsft.errors import exit_on_user_error
from fcsft.hub import check_model_source
from fcsft.recipe import model_init_kwargs, parse_recipe, settle_launch_settings
from fcsft.step_profile import make_profile_callback
from fcsft.training_data import (
    build_datasets,
    export_data,
    restore_chat_template,
    show_examples,
    source_configs,
    weight_zero_tokenizer,
)

logger = logging.getLogger("train_sft")


def main(script_args, training_args, model_args):
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer, get_peft_config

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    if script_args.export_data:  # the data-side twin of --show_examples: the rows, no model
        export_data(script_args, training_args.seed, script_args.recipe, script_args.export_data)
        return
    settle_launch_settings(script_args, training_args)
    # before any data loads or folder is made (parse_recipe leaves it out: it also reads recipes on machines without
    # the model, e.g. to print a sweep's commands)
    check_model_source(model_args.model_name_or_path, f"model_name_or_path in {script_args.recipe}")

    # Data: the recipe's sources, converted, checked, transformed and mixed (every dropped row counted)
    train_dataset, eval_dataset, data_report = build_datasets(script_args, training_args.seed, script_args.recipe)
    logger.warning("data: %d train rows, %d eval rows", len(train_dataset), len(eval_dataset or []))

    # Model: loaded by the trainer from the recipe's ModelConfig, as in TRL's sft.py
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    trainer_class = with_bfcl_eval(SFTTrainer) if script_args.bfcl_eval_dir else SFTTrainer
    trainer = trainer_class(model=model_args.model_name_or_path, args=training_args, train_dataset=train_dataset,
                            eval_dataset=eval_dataset, peft_config=get_peft_config(model_args),
                            processing_class=weight_zero_tokenizer(model_args, training_args, data_report))
    verify_fsdp_applied(trainer.accelerator)
    data_report["length"] = length_report(train_dataset, trainer, training_args.max_length)  # in run_summary.json
    if script_args.show_examples:
        if trainer.accelerator.is_main_process:
            show_examples(trainer, script_args.show_examples)
        return

    # Callbacks: run report (run_summary.json), adapter checkpoints, BFCL eval, early stopping, profiling, epochs
    facts = run_info(script_args, training_args, model_args, trainer, data_report)
    trainer.callback_handler.callbacks.insert(0, make_report_callback(trainer.accelerator, training_args.output_dir, facts))
    adapter_under_fsdp = trainer.is_fsdp_enabled and model_args.use_peft
    if adapter_under_fsdp:
        trainer.add_callback(make_adapter_checkpoint_callback(trainer))
    if script_args.bfcl_eval_dir:
        attach_bfcl_evaluator(trainer, script_args, model_args.model_name_or_path)
    if script_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(script_args.early_stopping_patience, script_args.early_stopping_threshold))
    if script_args.profile_steps:
        trainer.add_callback(make_profile_callback(trainer.accelerator, training_args.output_dir, script_args.profile_steps))
    if script_args.epoch_checkpoints or script_args.hub_push_epochs:
        trainer.add_callback(EpochCheckpointCallback(trainer, script_args))

    # Train, resuming from the last complete checkpoint when asked
    resume = training_args.resume_from_checkpoint
    if str(resume).lower() == "true":
        resume = last_complete_checkpoint(training_args.output_dir)
        logger.warning("resume: continuing from %s", resume)
    facts["resumed_from"] = str(resume) if resume and str(resume).lower() not in ("false", "none") else None  # run_summary.json: the table says the run was resumed
    trainer.train(resume_from_checkpoint=resume)

    # The final model: one Hugging Face checkpoint gathered from the FSDP shards, and TRL's model card
    if script_args.save_final_model:
        restore_chat_template(trainer.processing_class)  # weight 0's training template is not the model's
        save_final_model(trainer, training_args.output_dir, check_adapter=adapter_under_fsdp)
        if trainer.accelerator.is_main_process:
            datasets = ", ".join(source.path for source in source_configs(script_args))
            trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=datasets)
            skipped = sum(sum(source["skipped"].values()) for source in data_report["sources"])
            logger.warning("saved %s (%d malformed rows skipped, counts in run_summary.json)", training_args.output_dir,
                           skipped)
    trainer.end()


if __name__ == "__main__":
    enable_fsdp_on_cpu()  # before SFTConfig exists: it creates the accelerator state
    with exit_on_user_error("train_sft.py"):
        main(*parse_recipe(sys.argv[1:]))
