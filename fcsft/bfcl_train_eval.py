"""Function-calling accuracy during training: train_sft.py's `bfcl_eval_*` recipe keys.

At every evaluation of the Trainer (`eval_strategy`, `eval_steps`) the model answers a BFCL-format split and
eval_bfcl.py scores the answers; `eval_bfcl/overall`, `eval_bfcl/<category>` and the error-analysis rates join the
evaluation metrics next to `eval_loss`. So they reach every tracker, and `metric_for_best_model: eval_bfcl/overall`
works with `load_best_model_at_end` and `EarlyStoppingCallback`. Each evaluation's answers, scores and summary go to
`output_dir/bfcl_eval/step-N/`, in eval_bfcl.py's layout (`python eval_bfcl.py compare` reads those folders).

Prompts, generation settings and scoring are eval_bfcl.py's own functions (fcsft.bfcl_*), so the numbers equal what
`eval_bfcl.py --max-new-tokens M --batch-size B` gives on the checkpoint saved at that step (tested under FSDP).
"""

import json
import logging
import math
import time
from pathlib import Path

from fcsft import bfcl_data, bfcl_generation, bfcl_report
from fcsft.errors import UserError

logger = logging.getLogger(__name__)


class BFCLEvaluator:
    """Prompts built once; generate + score on demand, with every rank taking part (FSDP needs all of them)."""

    def __init__(self, script_args, model_name, model_type, tokenizer):
        # Whole categories for scoring (their size is reported, as eval_bfcl.py does), the first N entries answered.
        self.data_dir, self.categories, self.datasets = bfcl_data.load_datasets(
            script_args.bfcl_eval_dir, script_args.bfcl_eval_categories.split(","))
        limit = script_args.bfcl_eval_limit
        self.requested_format = script_args.bfcl_eval_prompt_format
        self.prompt_format = bfcl_generation.resolve_prompt_format(model_name, model_type, self.requested_format, "fc")
        self.max_new_tokens, self.batch_size = script_args.bfcl_eval_max_new_tokens, script_args.bfcl_eval_batch_size
        self.model_name, self.tokenizer = model_name, tokenizer
        self.work = [(c, e) for c, (entries, _) in self.datasets.items() for e in entries[:limit]]
        if not self.work:
            raise UserError(f"bfcl_eval_dir {script_args.bfcl_eval_dir}: no entries to evaluate")
        self.token_ids = bfcl_generation.prompt_token_ids(
            tokenizer, bfcl_generation.render_prompts(tokenizer, self.work, "fc", self.prompt_format))
        # Longest first, as eval_bfcl.py orders them; rank r takes every world_size-th prompt of that order.
        self.order = sorted(range(len(self.work)), key=lambda i: -len(self.token_ids[i]))

    def generate(self, model, accelerator, fsdp):
        """{work index: raw answer} over all ranks. Under FSDP every forward pass all-gathers parameters from every
        rank, so all ranks run the same number of generate() calls (a rank out of prompts repeats one and drops the
        answer) and synced_gpus keeps each call's forward passes in step until the last rank's answers end."""
        import torch
        from accelerate.utils import gather_object
        from trl.models.utils import unwrap_model_for_generation

        rank, world = accelerator.process_index, accelerator.num_processes
        mine = self.order[rank::world]
        batches = math.ceil(math.ceil(len(self.order) / world) / self.batch_size)  # the same number on every rank
        answers = []
        # Generation pads on the left (each answer starts where its prompt ends); training keeps its own side.
        padding_side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        was_training = model.training
        model.eval()
        try:
            with unwrap_model_for_generation(model, accelerator) as unwrapped, torch.no_grad():
                config, eos_ids = bfcl_generation.greedy_generation_config(unwrapped, self.tokenizer, self.max_new_tokens)
                for b in range(batches):
                    batch = mine[b * self.batch_size:(b + 1) * self.batch_size]
                    inputs = self.tokenizer.pad({"input_ids": [self.token_ids[i] for i in batch or self.order[:1]]},
                                                return_tensors="pt").to(accelerator.device)
                    output = unwrapped.generate(**inputs, generation_config=config,
                                                synced_gpus=fsdp and world > 1 or None)
                    texts, _ = bfcl_generation.decode_generated(
                        self.tokenizer, output[:, inputs["input_ids"].shape[1]:].tolist(), eos_ids)
                    answers += list(zip(batch, texts))
        finally:
            model.train(was_training)
            self.tokenizer.padding_side = padding_side
        return dict(gather_object(answers))

    def __call__(self, trainer, metric_key_prefix="eval"):
        """Generate, score and write this step's folder; returns the metrics (identical on every rank)."""
        started = time.time()
        generated = self.generate(trainer.model_wrapped, trainer.accelerator, trainer.is_fsdp_enabled)
        results = {c: {} for c in self.categories}
        for index, text in generated.items():
            category, entry = self.work[index]
            results[category][entry["id"]] = text
        scores, rows = {}, {}
        for category, (entries, possible_answers) in self.datasets.items():
            rows[category], scores[category] = bfcl_report.score_category(
                category, results[category], entries, possible_answers, "qwen")
        seconds = time.time() - started
        metrics = bfcl_metrics(scores, metric_key_prefix)
        metrics[f"{metric_key_prefix}_bfcl/seconds"] = round(seconds, 2)
        if trainer.accelerator.is_main_process:
            self.write(Path(trainer.args.output_dir) / "bfcl_eval" / f"step-{trainer.state.global_step}",
                       results, rows, scores, trainer, seconds)
        return metrics

    def write(self, folder, results, rows, scores, trainer, seconds):
        """The step's answers, scores, generation.json and summary, in eval_bfcl.py's layout."""
        folder.mkdir(parents=True, exist_ok=True)
        for category, (entries, _) in self.datasets.items():
            answered = [{"id": e["id"], "result": results[category][e["id"]]}
                        for e in entries if e["id"] in results[category]]
            bfcl_data.write_jsonl_atomic(bfcl_data.result_path(folder, category), answered)
            bfcl_data.write_jsonl_atomic(folder / f"BFCL_v4_{category}_score.json", rows[category])
        fmt = self.prompt_format
        model = f"{self.model_name} (training step {trainer.state.global_step})"
        generation = {
            "settings": {"model": model, "weights": None, "mode": "fc", "prompt_format": fmt["prompt_format"],
                         "max_new_tokens": self.max_new_tokens,
                         "bfcl_family": fmt["bfcl_family"] if fmt["prompt_format"] == "bfcl" else None},
            "model": model, "backend": "transformers", "mode": "fc", "decoder": "qwen",
            "prompt_format": fmt["prompt_format"], "prompt_format_requested": self.requested_format,
            "bfcl_family": fmt["bfcl_family"], "prompt_format_fallback": fmt["fallback"],
            "data_dir": str(Path(self.data_dir).resolve()), "categories": self.categories,
            "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
            "global_step": trainer.state.global_step, "num_processes": trainer.accelerator.num_processes,
            "wall_time_s": round(seconds, 2),
        }
        (folder / "generation.json").write_text(json.dumps(generation, indent=2) + "\n")
        summary = bfcl_report.build_summary(scores, "qwen", self.data_dir, generation, bfcl_report.prompt_format_of(generation))
        bfcl_report.write_summary(folder, summary, quiet=True)


def bfcl_metrics(scores, prefix="eval"):
    """Trainer metrics from per-category scores: accuracy per category, `overall` (their unweighted mean, over the
    categories evaluated: not the leaderboard's Overall), and the mean error-analysis rates."""
    metrics = {f"{prefix}_bfcl/{c}": s["accuracy"] for c, s in scores.items()}
    metrics[f"{prefix}_bfcl/overall"] = sum(s["accuracy"] for s in scores.values()) / len(scores)
    for step in ("decodes_as_calls", "right_functions"):
        rates = [s["rates"][step] for s in scores.values() if s["rates"][step] is not None]
        if rates:
            metrics[f"{prefix}_bfcl/{step}"] = sum(rates) / len(rates)
    return metrics


def with_bfcl_eval(trainer_class):
    """`trainer_class` whose evaluations also generate on the BFCL split (when `bfcl_evaluator` is set). The metrics
    join those of the evaluation loop, before the Trainer logs them, hands them to callbacks (EarlyStoppingCallback)
    and picks the best checkpoint."""

    class TrainerWithBFCLEval(trainer_class):
        bfcl_evaluator = None

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            if self.bfcl_evaluator is not None and description == "Evaluation":  # evaluate(), not predict()
                output.metrics.update(self.bfcl_evaluator(self, metric_key_prefix))
            return output

    TrainerWithBFCLEval.__name__ = f"{trainer_class.__name__}WithBFCLEval"
    return TrainerWithBFCLEval


def attach_bfcl_evaluator(trainer, script_args, model_name):
    """Prompts for the recipe's bfcl_eval_dir, answered at every evaluation of `trainer` (a with_bfcl_eval class)."""
    trainer.bfcl_evaluator = BFCLEvaluator(script_args, model_name, trainer.model.config.model_type,
                                           trainer.processing_class)
    evaluator = trainer.bfcl_evaluator
    logger.warning("bfcl eval: %d prompts of %s (%s prompt format) at every evaluation", len(evaluator.work),
                   script_args.bfcl_eval_dir, evaluator.prompt_format["prompt_format"])
    if evaluator.prompt_format["fallback"]:
        logger.warning("bfcl eval: %s", evaluator.prompt_format["fallback"])
