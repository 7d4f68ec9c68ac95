"""The model card of a finished model, its BFCL scores as hub metadata, and its push to the Hugging Face Hub.

    python model_card.py runs/qwen2.5-3b-xlam --bfcl runs/bfcl/qwen2.5-3b-xlam
    python model_card.py runs/qwen2.5-3b-xlam --bfcl runs/bfcl/qwen2.5-3b-xlam --push your-name/qwen2.5-3b-xlam-fc
    python eval_bfcl.py --model runs/qwen2.5-3b-xlam --categories all --output-dir runs/bfcl/qwen2.5-3b-xlam \\
        --model-card runs/qwen2.5-3b-xlam/README.md              # the scores go straight into the card

For a folder train_sft.py wrote (it holds run_summary.json), README.md is written from the run: base model, data
with row counts, recipe and overrides, hardware, train time, device-hours and cost, losses, and the BFCL results.
For any other folder (a merged checkpoint from merge_adapters.py) the card already there is kept and the BFCL results
are added. The BFCL summary goes into the card's `model-index` metadata too, so the hub shows the scores: every
aggregate and category that was run in full (a `--limit` run stays in the table only).

--push uses the Dolly recipe's hub code (epoch_checkpoints.py): the token comes from HF_TOKEN only and is never
printed; the token and the hub are checked before anything is uploaded; the card and model are written locally
first, and a failed upload names the folder (kept) and the command that uploads it later.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

import epoch_checkpoints
from eval_bfcl import summary_markdown
from sweep import DEFAULT_PRICE_PER_GPU_HOUR

BFCL_DATASET = "gorilla-llm/Berkeley-Function-Calling-Leaderboard"
BFCL_START, BFCL_END = "<!-- BFCL results (eval_bfcl.py) -->", "<!-- end of BFCL results -->"


def bfcl_eval_results(summary):
    """huggingface_hub EvalResults for the model-index, accuracy in %: every category run in full, and the aggregates
    when no category was cut short (--limit), so the hub never shows a partial run's number as a score."""
    from huggingface_hub import EvalResult

    def result(name, accuracy, config=None):
        return EvalResult(task_type="text-generation", task_name="Function calling", dataset_type=BFCL_DATASET,
                          dataset_name="BFCL v4 (single-turn)", dataset_config=config, metric_type="accuracy",
                          metric_name=name, metric_value=round(100 * accuracy, 2))

    complete = {c: s for c, s in summary["categories"].items() if s["accuracy"] is not None and s["total"] == s["expected"]}
    results = []
    if len(complete) == len(summary["categories"]):
        results += [result(name, agg["accuracy"]) for name, agg in summary["aggregates"].items() if agg["status"] == "ok"]
    return results + [result(category, score["accuracy"], category) for category, score in complete.items()]


def bfcl_section(summary):
    """The BFCL part of the card body, between markers so that a new evaluation replaces it."""
    table = summary_markdown(summary).split("\n", 1)[1]  # eval_bfcl.py's tables, without its top-level title
    return f"{BFCL_START}\n## BFCL v4 results ({summary['decoder']} decoder)\n{table.rstrip()}\n{BFCL_END}\n"


def write_bfcl_results(card_path, summary, model_name=None):
    """Put a BFCL summary (eval_bfcl.py's summary.json) into the card at card_path: the model-index metadata and the
    results section, replacing an earlier one. A missing card is started."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    card = ModelCard(card_path.read_text() if card_path.is_file() else f"---\n---\n# {card_path.parent.name}\n")
    card.data.model_name = card.data.model_name or model_name or card_path.parent.name
    card.data.eval_results = bfcl_eval_results(summary) or None
    text = card.text
    if BFCL_START in text and BFCL_END in text:
        before, rest = text.split(BFCL_START, 1)
        text = before + bfcl_section(summary) + rest.split(BFCL_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + bfcl_section(summary)
    card.text = text
    card.save(card_path)
    return card


# --- the card of a train_sft.py run --------------------------------------------------------------------------------


def duration(seconds):
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m ({seconds:,.0f} s)"


def run_card(folder, run, price_per_gpu_hour):
    """README.md text for a folder train_sft.py saved, from its run_summary.json."""
    data, base = run.get("data", {}), run.get("model_name_or_path")
    adapter = run.get("use_peft") or (Path(folder) / "adapter_config.json").is_file()
    metadata = {"library_name": "peft" if adapter else "transformers",
                "tags": ["trl", "sft", "fsdp", "function-calling"] + (["lora"] if adapter else [])}
    if not epoch_checkpoints.looks_local(base):
        metadata["base_model"] = base
    sources = data.get("sources", [])
    hub_datasets = [source["path"] for source in sources if not epoch_checkpoints.looks_local(source["path"])]
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    history = run.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    epochs = [h["epoch"] for h in history if "epoch" in h]
    processes, device = run.get("num_processes", 1), run.get("device", "unknown")
    device_hours = run["train_seconds"] * processes / 3600
    on_gpu = not device.startswith("cpu")
    cost = (f"${device_hours * price_per_gpu_hour:,.2f} at ${price_per_gpu_hour:g} per GPU-hour" if on_gpu else
            "not applicable (a CPU run)")
    sharding = run.get("sharding") or {}
    strategy = (f"FSDP{run['fsdp_version']}" if run.get("fsdp_version") else
                str(run.get("distributed_type", "")).replace("DistributedType.", ""))
    peak = max((max(r.values()) for r in run.get("peak_memory_per_rank", []) if r), default=None)
    name = Path(folder).name
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"`{base}` fine-tuned for function calling with TRL's SFTTrainer (`train_sft.py` of this repository): "
        + ("a LoRA adapter (load it with peft installed)." if adapter else "a full fine-tune."), "",
        "## Data", "",
        "| dataset | format | rows read | malformed (skipped) | BFCL duplicates (dropped) | taken | transforms |",
        "|---|---|---:|---:|---:|---:|---|",
        *[f"| `{source['path']}` | {source['format']} | {source['rows']} | "
          f"{sum(source['skipped'].values())}{' (' + ', '.join(f'{k}: {v}' for k, v in source['skipped'].items()) + ')' if source['skipped'] else ''} | "
          f"{source['decontaminated'] if data.get('decontaminate') else 'not checked'} | {source.get('taken', 'n/a')} | "
          f"{', '.join(f'{k} {v}' for k, v in source['transforms'].items() if v) or 'none'} |" for source in sources],
        "", f"Trained on {data.get('train_rows', 'n/a')} rows; {data.get('eval_rows', 0)} held out for evaluation.",
        "", f"Real (non-padding) tokens trained on: {tokens[-1]:,.0f} (TRL's `num_tokens`)." if tokens else "", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| hardware | {processes} x {device}, {strategy}"
        f"{' over mesh ' + str(sharding['mesh_shape']) if sharding.get('mesh_shape') else ''} |",
        f"| train time | {duration(run['train_seconds'])} |",
        f"| device-hours | {device_hours:.2f} |",
        f"| cost | {cost} |",
        f"| optimizer steps | {run.get('global_step')} ({epochs[-1]:.2f} epochs) |" if epochs else
        f"| optimizer steps | {run.get('global_step')} |",
        f"| final train loss | {losses[-1]:.4f} |" if losses else "| final train loss | n/a |",
        f"| final eval loss | {eval_losses[-1]:.4f} |" if eval_losses else "| final eval loss | not evaluated |",
        f"| peak memory per device | {peak:.2f} GiB |" if peak is not None else "| peak memory per device | n/a |",
        "",
    ]
    if run.get("recipe_text"):
        lines += [f"Recipe `{run.get('recipe')}`:", "", "```yaml", run["recipe_text"].rstrip(), "```", ""]
    lines += ["Command: `" + " ".join(run.get("command", [])) + "`", ""]
    return epoch_checkpoints.scrub_token("\n".join(lines))


# --- the push ------------------------------------------------------------------------------------------------------


def push(folder, repo_id, revision=None, private=True, client=None):
    """Upload the folder. Returns an error message (the folder is kept), or None."""
    get_client = (lambda: client) if client is not None else (
        lambda: epoch_checkpoints.make_hub_client(os.environ["HF_TOKEN"]))
    problem = epoch_checkpoints.hub_access_problem(get_client, repo_id, private, f"--push {repo_id}")
    if problem:
        return f"model_card.py: {problem}\n  The model and its card are saved at {folder}."
    problem = epoch_checkpoints.push_folder(get_client(), folder, repo_id, revision, private, str(folder),
                                            f"{Path(folder).name}: model and card (model_card.py)")
    return f"model_card.py: {problem}" if problem else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the model folder: train_sft.py's output_dir, or merge_adapters.py's --output")
    parser.add_argument("--bfcl", help="eval_bfcl.py's --output-dir for this model (its summary.json); a card rewritten "
                        "from run_summary.json without it has no BFCL results")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR,
                        help="for the cost line (default: the plan's $23/hour for 8 GPUs)")
    parser.add_argument("--push", metavar="REPO_ID", help="push the folder to this hub repository (token: HF_TOKEN)")
    parser.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    card_path = folder / "README.md"
    summary_path = folder / "run_summary.json"
    if summary_path.is_file():
        card_path.write_text(run_card(folder, json.loads(summary_path.read_text()), args.price_per_gpu_hour))
    elif not card_path.is_file():
        sys.exit(f"model_card.py: {folder} has neither run_summary.json (train_sft.py writes it) nor a README.md card")
    if args.bfcl:
        bfcl_summary = Path(args.bfcl) / "summary.json"
        if not bfcl_summary.is_file():
            sys.exit(f"model_card.py: {bfcl_summary} not found: score the model with eval_bfcl.py first")
        write_bfcl_results(card_path, json.loads(bfcl_summary.read_text()), model_name=args.push or folder.name)
    print(f"model_card.py: wrote {card_path}")
    if args.push:
        problem = push(folder, args.push, args.revision, private=not args.public)
        if problem:
            sys.exit(problem)


if __name__ == "__main__":
    main()
