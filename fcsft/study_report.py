"""One results table for any set of run folders (sweep folders, sweep points, train_sft.py output dirs, eval_bfcl.py
output dirs): settings that differ, train time, GPU-hours, real tokens/s, MFU, peak memory, losses, BFCL scores, points
over the untrained baseline, cost and cost per BFCL point; results.md, results.csv and plots.
"""

import csv
import json
import logging
from pathlib import Path

from fcsft.bfcl_report import aggregate_scores, check_prompt_formats, single_turn_overall
from fcsft.errors import UserError
from fcsft.metrics import (
    format_duration,
    format_number,
    mfu_percent,
    peak_memory_gib,
    peak_tflops_of,
    real_token_throughput,
)

logger = logging.getLogger(__name__)

COLUMNS = ["run", "status", "settings", "devices", "train_seconds", "train_time_measured", "gpu_hours", "real_tokens_per_s_per_gpu", "mfu_percent",
           "peak_memory_gib_per_gpu", "train_loss", "eval_loss", "bfcl_non_live", "bfcl_live", "bfcl_irrelevance",
           "bfcl_overall", "bfcl_multi_turn", "bfcl_overall_leaderboard", "bfcl_overall_leaderboard_parts",
           "points_over_baseline", "cost_usd", "usd_per_point", "compute_percent",
           "exposed_comm_percent", "idle_percent", "device", "peak_tflops", "run_dir"]


# differ by construction (a resumed point is the same run; the table says it was resumed)
SETTINGS_NOT_COMPARED = {"output_dir", "logging_dir", "run_name", "resume_from_checkpoint"}


def value_label(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def sweep_runs(sweep_dir):
    """The folders of a sweep's points that have run (in sweep order), after the baseline it refers to if that exists."""
    record = read_json(Path(sweep_dir) / "sweep.json")
    reference = [Path(record["baseline_dir"])] if record.get("baseline_dir") and Path(record["baseline_dir"]).is_dir() else []
    if record.get("baseline_dir") and not reference:
        logger.warning("baseline folder %s not found (yet): no points over baseline", record["baseline_dir"])
    return reference + [Path(sweep_dir) / p["name"] for p in record["points"] if (Path(sweep_dir) / p["name"] / "point.json").is_file()]


def expand_run_dirs(dirs):
    """Sweep folders become their points' folders (in sweep order); other folders stand for one run each."""
    out = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"not a folder: {d}")
        out += sweep_runs(d) if (d / "sweep.json").is_file() else [d]
    return list({d.resolve(): d for d in out}.values())  # a baseline two sweeps share appears once


def load_run(run_dir):
    """What a run folder holds: point.json (sweep.py), run_summary.json (train_sft.py's output_dir) and BFCL
    summary.json (eval_bfcl.py's output dir), directly or in train/ and bfcl/."""
    run_dir = Path(run_dir)
    run = {"dir": run_dir, "point": read_json(run_dir / "point.json"),
           "train": next((s for s in (read_json(run_dir / "run_summary.json"), read_json(run_dir / "train" / "run_summary.json")) if s), None),
           "bfcl": next((s for s in (read_json(run_dir / "bfcl" / "summary.json"), read_json(run_dir / "summary.json"))
                         if s and "categories" in s), None)}
    if run["bfcl"] and not run["train"]:  # eval_bfcl.py's folder of a trained model: that model's training is the run's
        scored = (run["bfcl"].get("generation") or {}).get("model")
        run["train"] = read_json(Path(scored) / "run_summary.json") if scored else None
    train_dir = run_dir / "train" if (run_dir / "train" / "run_summary.json").is_file() else run_dir
    run["profile"] = read_json(train_dir / "profile" / "breakdown.json")
    if not (run["point"] or run["train"] or run["bfcl"]):
        raise UserError(f"{run_dir} holds no point.json (sweep.py), run_summary.json (train_sft.py) or BFCL "
                 "summary.json (eval_bfcl.py), neither directly nor in train/ or bfcl/")
    return run


def bfcl_scores(summary):
    """(non-live, live, irrelevance, overall) in percent. Overall (single-turn) is the leaderboard's v4 Overall
    restricted to its single-turn parts: those weigh 10/10/10 (Non-Live AST, Live AST, Irrelevance), so their
    unweighted mean. A custom data set (no official categories) has only its own `overall (custom)`."""
    if not summary:
        return None, None, None, None
    aggregates = summary.get("aggregates") or aggregate_scores(summary.get("categories") or {})
    pick = lambda name: (aggregates.get(name) or {}).get("accuracy")  # noqa: E731
    parts = [pick("Non-Live AST"), pick("Live AST"), pick("Irrelevance")]
    # summaries written before the single-turn overall was an aggregate get it from the same function
    overall = single_turn_overall(aggregates)["accuracy"] if any(p is not None for p in parts) else pick("overall (custom)")
    to_percent = lambda x: None if x is None else 100 * x  # noqa: E731
    return (*map(to_percent, parts), to_percent(overall))


def bfcl_leaderboard_scores(summary):
    """(Multi-Turn, the leaderboard's Overall) in percent, and which parts of the Overall were run ("Non-Live+Live+
    ..."; the others count 0, as in the official table). None for runs without official categories."""
    aggregates = (summary or {}).get("aggregates") or {}
    multi_turn, overall = aggregates.get("Multi-Turn") or {}, aggregates.get("Overall (leaderboard)") or {}
    to_percent = lambda x: None if x is None else 100 * x  # noqa: E731
    parts = "+".join(name for name, part in (overall.get("parts") or {}).items() if part["status"] != "not run")
    return to_percent(multi_turn.get("accuracy")), to_percent(overall.get("accuracy")), parts or None


def trained_settings(summary):
    settings = dict(summary.get("settings") or {})
    settings.update(summary.get("launch") or {})
    return {k: v for k, v in settings.items() if k not in SETTINGS_NOT_COMPARED}


def differing(runs):
    """Per run, the settings whose values are not the same on every trained run ("key=value; ...")."""
    settings = [trained_settings(r["train"]) if r["train"] else None for r in runs]
    trained = [s for s in settings if s is not None]
    keys = sorted({k for s in trained for k in s})
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in trained}) > 1]
    out = []
    for run, s in zip(runs, settings):
        if s is None:
            model = ((run["bfcl"] or {}).get("generation") or {}).get("model") or (run["point"] or {}).get("baseline_model")
            out.append(f"model={model} (no training)" if model else "")
        else:
            out.append("; ".join(f"{k}={value_label(s.get(k))}" for k in differ))
    return out


def attempts_note(point, train):
    """" (2 attempts: time and cost over all of them; resumed from a checkpoint)" for a point trained more than once."""
    attempts = len((point.get("attempt_seconds") or {}).get("train") or [])
    notes = [f"{attempts} attempts: time and cost over all of them"
             + (", a killed one timed by its log" if "train" in point.get("estimated_attempts", []) else "")] \
        if attempts > 1 else []
    notes += ["resumed from a checkpoint"] if train and train.get("resumed_from") else []
    return f" ({'; '.join(notes)})" if notes else ""


def cost_columns(gpu_hours, points_over_baseline, price_per_gpu_hour):
    """Cost of the training and the cost of each BFCL point it gained (None when it gained nothing)."""
    cost = gpu_hours * price_per_gpu_hour
    per_point = cost / points_over_baseline if points_over_baseline and points_over_baseline > 0 else None
    return cost, per_point


def report_rows(run_dirs, price_per_gpu_hour, peak_tflops=None, baseline=None, mixed_formats=False):
    runs = [load_run(d) for d in run_dirs]
    scored = [run for run in runs if run["bfcl"]]
    check_prompt_formats([str(run["dir"]) for run in scored], [run["bfcl"] for run in scored], mixed_formats)
    settings = differing(runs)
    rows = []
    for run, setting in zip(runs, settings):
        point, train = run["point"] or {}, run["train"]
        status = point.get("status") or "done"
        if status == "failed":
            status = f"failed: {point.get('error')}"
        status += attempts_note(point, train)
        row = {"run": point.get("name") or run["dir"].name, "status": status, "settings": setting, "run_dir": str(run["dir"]),
               "baseline": not train and (bool(point.get("baseline_model")) or bool(run["bfcl"]))}
        if train:
            # The node time of the training command (launch, loading, saving included) where the sweep timed it
            wall = (point.get("seconds") or {}).get("train")
            seconds = wall or train["train_seconds"]
            hours = seconds / 3600
            speed = real_token_throughput(train, warmup_steps=0)
            tokens_per_s = speed["real_tokens_per_second_per_device"]
            if not tokens_per_s:  # fewer than two logs: the whole run's average
                last = max((log["num_tokens"] for log in train["log_history"] if "num_tokens" in log), default=0)
                tokens_per_s = last / train["train_seconds"] / train["num_processes"] if train["train_seconds"] else None
            peak = peak_tflops_of(train.get("device"), peak_tflops)
            row.update(device=train.get("device"), peak_tflops=peak)
            mfu = mfu_percent(tokens_per_s, train["model_config"], train.get("attention_span"), peak) \
                if train.get("model_config") else None
            train_losses = [log["loss"] for log in train["log_history"] if "loss" in log]
            eval_losses = [log["eval_loss"] for log in train["log_history"] if "eval_loss" in log]
            row.update(devices=train["num_processes"], train_seconds=seconds, gpu_hours=hours * train["num_processes"],
                       train_time_measured="train command, launch to exit" if wall else "training loop (run_summary.json)",
                       real_tokens_per_s_per_gpu=tokens_per_s, mfu_percent=mfu,
                       peak_memory_gib_per_gpu=peak_memory_gib(train)[0],
                       train_loss=train_losses[-1] if train_losses else None,
                       eval_loss=eval_losses[-1] if eval_losses else None)
        elif row["baseline"]:
            row.update(gpu_hours=0.0)
        row["bfcl_non_live"], row["bfcl_live"], row["bfcl_irrelevance"], row["bfcl_overall"] = bfcl_scores(run["bfcl"])
        row["bfcl_multi_turn"], row["bfcl_overall_leaderboard"], row["bfcl_overall_leaderboard_parts"] = \
            bfcl_leaderboard_scores(run["bfcl"])
        ranks = [b for b in ((run["profile"] or {}).get("per_rank") or []) if "error" not in b]
        if ranks:  # the mean over ranks
            for column, key in (("compute_percent", "compute"), ("exposed_comm_percent", "exposed_comm"), ("idle_percent", "idle")):
                row[column] = sum(b[key] for b in ranks) / len(ranks)
        row["model"] = (train or {}).get("settings", {}).get("model_name_or_path") or point.get("baseline_model") \
            or ((run["bfcl"] or {}).get("generation") or {}).get("model")
        rows.append(row)

    for row in rows:
        base = pick_baseline(row, rows, baseline)
        if base is not None and row["bfcl_overall"] is not None and base["bfcl_overall"] is not None:
            row["points_over_baseline"] = row["bfcl_overall"] - base["bfcl_overall"]
        if row.get("gpu_hours") is not None:
            row["cost_usd"], row["usd_per_point"] = cost_columns(row["gpu_hours"], row.get("points_over_baseline"), price_per_gpu_hour)
    return rows


def pick_baseline(row, rows, baseline_dir):
    """The untrained run a row is compared with: --baseline, else the only baseline, else the one of the same model."""
    if baseline_dir:
        return next((r for r in rows if Path(r["run_dir"]).resolve() == Path(baseline_dir).resolve()), None)
    candidates = [r for r in rows if r["baseline"]]
    if len(candidates) == 1:
        return candidates[0]
    return next((r for r in candidates if r["model"] == row["model"]), None)


def fmt_cell(row, column):
    value = row.get(column)
    if column == "usd_per_point" and value is None and not row["baseline"] and row.get("cost_usd") is not None \
            and row.get("points_over_baseline") is not None:
        return "no gain"
    if value is None or value == "":
        return "—"
    if column == "train_seconds":
        return format_duration(value)
    digits = {"gpu_hours": 3, "real_tokens_per_s_per_gpu": 0, "mfu_percent": 2, "peak_memory_gib_per_gpu": 2,
              "train_loss": 3, "eval_loss": 3, "cost_usd": 2, "usd_per_point": 2}.get(column, 1)
    if column == "points_over_baseline":
        return f"{value:+.2f}"
    return format_number(float(value), digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


MARKDOWN_COLUMNS = [("run", "run"), ("settings", "settings that differ"), ("train_seconds", "train time"),
                    ("gpu_hours", "GPU x h"), ("real_tokens_per_s_per_gpu", "real tok/s/GPU"), ("mfu_percent", "MFU %"),
                    ("peak_memory_gib_per_gpu", "peak GiB/GPU"), ("train_loss", "train loss"), ("eval_loss", "eval loss"),
                    ("bfcl_non_live", "non-live"), ("bfcl_live", "live"), ("bfcl_irrelevance", "irrelevance"),
                    ("bfcl_overall", "overall"), ("bfcl_multi_turn", "multi-turn"),
                    ("bfcl_overall_leaderboard", "leaderboard overall"), ("points_over_baseline", "pts vs base"), ("cost_usd", "cost $"),
                    ("usd_per_point", "$/pt"), ("exposed_comm_percent", "exposed comm %"), ("status", "status")]


def write_report(run_dirs, output_dir, price_per_gpu_hour, peak_tflops=None, baseline=None, title="Runs",
                 mixed_formats=False):
    rows = report_rows(run_dirs, price_per_gpu_hour, peak_tflops, baseline, mixed_formats)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{c: "no gain" if fmt_cell(r, c) == "no gain" else "" if r.get(c) is None else r[c] for c in COLUMNS}
                          for r in rows])
    lines = [f"# {title}", "",
             f"Cost: GPU x hours of training (a sweep point's train command from launch to exit, else the training loop of "
             f"run_summary.json) at ${price_per_gpu_hour:.3f} per GPU-hour; $/pt: cost per BFCL point gained over "
             "the untrained baseline. BFCL in %: overall is the mean of non-live (AST), live (AST) and irrelevance, the "
             "leaderboard's v4 Overall restricted to its single-turn parts (equal weights), and pts vs base uses it; "
             "multi-turn is the mean of the four multi-turn categories; leaderboard overall is the official Overall "
             "(10/10/10/30/40 with agentic), where every part not run counts 0 (results.csv lists the parts run). "
             "Real tok/s/GPU: non-padding tokens, warm-up log excluded; MFU: (6N + 12·L·d·s) FLOPs per real token "
             "against the device's peak; peak GiB/GPU: the largest rank's peak (GPU: allocated; CPU: RSS); "
             "exposed comm %: share of profiled step time in collectives not hidden by compute (profile_steps).", "",
             "| " + " | ".join(h for _, h in MARKDOWN_COLUMNS) + " |",
             "|" + "|".join("---" if c in ("run", "settings", "status") else "---:" for c, _ in MARKDOWN_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt_cell(row, c).replace("|", "/") for c, _ in MARKDOWN_COLUMNS) + " |")
    peaks = {r["device"]: r["peak_tflops"] for r in rows if r.get("peak_tflops")}
    lines += ["", "MFU against: " + ", ".join(f"{device} {peak:.4g} TFLOP/s" for device, peak in peaks.items())
              + (" (CPU: the best 1-thread fp32 matmul measured when this table was written, so it moves with the load)"
                 if "cpu" in peaks and not peak_tflops else "")] if peaks else []
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    write_plots(rows, output_dir)
    return rows


def write_plots(rows, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["baseline"] and r["bfcl_overall"] is not None), None)
    trained = [r for r in rows if r.get("devices")]
    plots = (("score_vs_cost.png", "cost_usd", "training cost ($)", "bfcl_overall", "BFCL overall, single-turn (%)", rows),
             ("score_vs_memory.png", "peak_memory_gib_per_gpu", "peak memory per GPU (GiB)", "bfcl_overall",
              "BFCL overall, single-turn (%)", trained),
             ("speed_vs_memory.png", "peak_memory_gib_per_gpu", "peak memory per GPU (GiB)", "real_tokens_per_s_per_gpu",
              "real tokens/s per GPU", trained))
    for file, x_key, x_label, y_key, y_label, candidates in plots:
        points = [r for r in candidates if r.get(x_key) is not None and r.get(y_key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=80)
        ax.scatter([r[x_key] for r in points], [r[y_key] for r in points], color="tab:blue")
        for i, r in enumerate(sorted(points, key=lambda r: r[x_key])):  # neighbours' labels alternate above and below
            ax.annotate(r["run"], (r[x_key], r[y_key]), fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
        ax.margins(x=0.2, y=0.15)
        if y_key == "bfcl_overall" and base is not None and base not in points:
            ax.axhline(base["bfcl_overall"], color="grey", linestyle="--", linewidth=1, label=f"{base['run']} (untrained)")
            ax.legend(fontsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        fig.tight_layout()
        fig.savefig(output_dir / file)
        plt.close(fig)
