"""Model cards: one front-matter builder for every card this project writes (a train_sft.py run, an epoch checkpoint,
a merge), the card of a finished run from its run_summary.json, its BFCL results as hub metadata, and its push.

For a folder train_sft.py wrote (it holds run_summary.json), README.md is written from the run: base model, data
with row counts, recipe and overrides, hardware, train time, device-hours and cost, losses, and the BFCL results.
The BFCL summary goes into the card's `model-index` metadata too, so the hub shows the scores: every aggregate and
category that was run in full (a `--limit` run stays in the table only).
"""

import os
from pathlib import Path

import yaml

from fcsft.bfcl_report import summary_markdown
from fcsft.hub import (
    hub_access_problem,
    looks_local,
    make_hub_client,
    push_folder,
    scrub_token,
)
from fcsft.metrics import format_duration, is_cpu, peak_memory_gib

BFCL_DATASET = "gorilla-llm/Berkeley-Function-Calling-Leaderboard"
BFCL_START, BFCL_END = "<!-- BFCL results (eval_bfcl.py) -->", "<!-- end of BFCL results -->"


def front_matter(base_model, datasets, adapter, tags):
    """The card's YAML header: `library_name` peft for an adapter (else transformers), tags, and the base model and
    datasets where they are hub ids (the hub's metadata takes nothing else)."""
    metadata = {"library_name": "peft" if adapter else "transformers", "tags": list(tags)}
    if not looks_local(base_model):
        metadata["base_model"] = base_model
    hub_datasets = [d for d in datasets if not looks_local(d)]
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False).strip() + "\n---\n"


def bfcl_eval_results(summary):
    """huggingface_hub EvalResults for the model-index, accuracy in %: every category run in full, and the aggregates
    when no category was cut short (--limit), so the hub never shows a partial run's number as a score."""
    from huggingface_hub import EvalResult

    def result(name, accuracy, config=None):
        return EvalResult(task_type="text-generation", task_name="Function calling", dataset_type=BFCL_DATASET,
                          dataset_name="BFCL v4", dataset_config=config, metric_type="accuracy",
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


def run_card(folder, run, price_per_gpu_hour):
    """README.md text for a folder train_sft.py saved, from its run_summary.json."""
    data, base = run.get("data", {}), run.get("model_name_or_path")
    adapter = run.get("use_peft") or (Path(folder) / "adapter_config.json").is_file()
    sources = data.get("sources", [])
    history = run.get("log_history", [])
    losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    epochs = [h["epoch"] for h in history if "epoch" in h]
    processes, device = run.get("num_processes", 1), run.get("device", "unknown")
    device_hours = run["train_seconds"] * processes / 3600
    cost = (f"${device_hours * price_per_gpu_hour:,.2f} at ${price_per_gpu_hour:g} per GPU-hour" if not is_cpu(device) else
            "not applicable (a CPU run)")
    sharding = run.get("sharding") or {}
    strategy = (f"FSDP{run['fsdp_version']}" if run.get("fsdp_version") else
                str(run.get("distributed_type", "")).replace("DistributedType.", ""))
    peak, measured = peak_memory_gib(run)
    name = Path(folder).name
    lines = [
        front_matter(base, [source["path"] for source in sources], adapter,
                     ["trl", "sft", "fsdp", "function-calling"] + (["lora"] if adapter else [])),
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
        f"| train time | {format_duration(run['train_seconds'])} ({run['train_seconds']:,.0f} s) |",
        f"| device-hours | {device_hours:.2f} |",
        f"| cost | {cost} |",
        f"| optimizer steps | {run.get('global_step')} ({epochs[-1]:.2f} epochs) |" if epochs else
        f"| optimizer steps | {run.get('global_step')} |",
        f"| final train loss | {losses[-1]:.4f} |" if losses else "| final train loss | n/a |",
        f"| final eval loss | {eval_losses[-1]:.4f} |" if eval_losses else "| final eval loss | not evaluated |",
        f"| peak memory per device | {peak:.2f} GiB ({measured}, the largest rank) |" if peak is not None else "| peak memory per device | n/a |",
        "",
    ]
    if run.get("recipe_text"):
        lines += [f"Recipe `{run.get('recipe')}`:", "", "```yaml", run["recipe_text"].rstrip(), "```", ""]
    lines += ["Command: `" + " ".join(run.get("command", [])) + "`", ""]
    return scrub_token("\n".join(lines))


# --- the push ------------------------------------------------------------------------------------------------------


def push(folder, repo_id, revision=None, private=True, client=None):
    """Upload the folder. Returns an error message (the folder is kept), or None."""
    get_client = (lambda: client) if client is not None else (
        lambda: make_hub_client(os.environ["HF_TOKEN"]))
    problem = hub_access_problem(get_client, repo_id, private, f"--push {repo_id}")
    if problem:
        return f"{problem}\n  The model and its card are saved at {folder}."
    problem = push_folder(get_client(), folder, repo_id, revision, private, str(folder),
                                            f"{Path(folder).name}: model and card (model_card.py)")
    return problem
