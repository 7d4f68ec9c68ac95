"""Scores and reports for BFCL results: per-entry verdicts (the official checker's rules: bfcl_checker.py for
single-turn, bfcl_multi_turn.py for multi-turn), the leaderboard's aggregate columns and its Overall, summaries (summary.json / summary.md), side-by-side comparisons, the error analysis
(decodes as calls -> right functions -> right arguments) and its plot.
"""

import json
import logging
from collections import Counter
from pathlib import Path

from fcsft.bfcl_checker import call_outcome, score_bfcl_entry
from fcsft.bfcl_data import (
    LIVE,
    MULTI_TURN,
    NON_LIVE,
    OUT_OF_SCOPE,
    SCOPE_NOTE,
    category_order,
    find_result_files,
    is_multi_turn,
    load_category,
    package_data_dir,
    read_results,
    write_jsonl_atomic,
)
from fcsft.bfcl_multi_turn import (
    harness_model_name,
    leaderboard_overall,
    load_multi_turn_category,
    multi_turn_accuracy,
    multi_turn_error_analysis,
    score_multi_turn_category,
)
from fcsft.errors import UserError
from fcsft.metrics import format_percent

logger = logging.getLogger(__name__)

def score_category(category, results, entries, answers, decoder):
    """Per-entry verdicts (dataset order, entries with a result only) and {accuracy, correct, total, expected,
    error_types (counts by the official error type), rates (the call_outcome steps: decodes_as_calls,
    right_functions, correct)}."""
    known = {entry["id"] for entry in entries}
    unknown = [i for i in results if i not in known]
    if unknown:
        logger.warning(f"{category}: ignoring {len(unknown)} result ids not in the data set (e.g. {unknown[0]})")
    rows = []
    for index, entry in enumerate(entries):
        if entry["id"] not in results:
            continue
        raw = results[entry["id"]]
        truth = answers[index]["ground_truth"] if answers else None
        verdict = score_bfcl_entry(entry, raw, category, ground_truth=truth, decoder=decoder)
        outcome = call_outcome(verdict, category, truth)
        row = {"id": entry["id"], "valid": verdict["valid"], "decodes_as_calls": outcome["decodes_as_calls"]}
        if outcome["right_functions"] is not None:
            row["right_functions"] = outcome["right_functions"]
        if not verdict["valid"]:
            row.update(error_type=verdict["error_type"], error=verdict["error"], model_result=raw)
            if "decoded" in verdict:
                row["decoded"] = verdict["decoded"]
        rows.append(row)
    correct = sum(row["valid"] for row in rows)
    errors = Counter(row["error_type"] for row in rows if not row["valid"])
    rate = lambda key: sum(row[key] for row in rows) / len(rows) if rows and key in rows[0] else None  # noqa: E731
    return rows, {"accuracy": correct / len(rows) if rows else None, "correct": correct, "total": len(rows),
                  "expected": len(entries), "error_types": dict(errors.most_common()),
                  "rates": {"decodes_as_calls": rate("decodes_as_calls"), "right_functions": rate("right_functions"),
                            "correct": rate("valid")}}


def single_turn_overall(aggregates):
    """The leaderboard's v4 Overall weighs Non-Live 10, Live 10, Irrelevance 10 (then multi-turn 30, agentic 40):
    restricted to its single-turn parts, the unweighted mean of those three aggregates."""
    return _mean("unweighted mean of Non-Live AST, Live AST, Irrelevance (the leaderboard's v4 Overall restricted to its "
                 "single-turn parts)", [(name, aggregates.get(name)) for name in ("Non-Live AST", "Live AST", "Irrelevance")])


def _mean(formula, parts, weighted=False):
    """parts: (name, {accuracy, total} or None). Unweighted or entry-weighted mean, when every part was run."""
    present = [score for _, score in parts if score is not None and score["accuracy"] is not None]
    missing = [name for name, score in parts if score is None or score["accuracy"] is None]
    if not present:
        return {"accuracy": None, "status": "not run", "formula": formula}
    if missing:
        return {"accuracy": None, "status": f"incomplete (missing {', '.join(missing)})", "formula": formula}
    total = sum(score.get("total", 0) for score in present)
    if weighted:
        accuracy = sum(score["accuracy"] * score["total"] for score in present) / total
    else:
        accuracy = sum(score["accuracy"] for score in present) / len(present)
    return {"accuracy": accuracy, "total": total, "status": "ok", "formula": formula}


def aggregate_scores(scores):
    """The leaderboard's summary columns from per-category {accuracy, total}. An aggregate is reported only when all
    its categories were run, as the official table shows N/A otherwise."""
    part = lambda c: (c, scores.get(c))  # noqa: E731
    simple = _mean("unweighted mean of simple_python, simple_java, simple_javascript",
                   [part("simple_python"), part("simple_java"), part("simple_javascript")])
    aggregates = {
        "Simple AST": simple,
        "Non-Live AST": _mean("unweighted mean of simple (above), multiple, parallel, parallel_multiple",
                              [("simple", simple), part("multiple"),
                               part("parallel"), part("parallel_multiple")]),
        "Live AST": _mean("mean of live_simple, live_multiple, live_parallel, live_parallel_multiple weighted by entries",
                          [part(c) for c in ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")],
                          weighted=True),
        "Irrelevance": _mean("unweighted mean of irrelevance, live_irrelevance",
                             [part("irrelevance"), part("live_irrelevance")]),
        "Relevance": _mean("live_relevance", [part("live_relevance")]),
    }
    aggregates["Overall (single-turn)"] = single_turn_overall(aggregates)
    if any(c in NON_LIVE + LIVE + MULTI_TURN for c in scores):
        aggregates["Multi-Turn"] = multi_turn_accuracy(scores)
        aggregates["Overall (leaderboard)"] = leaderboard_aggregate(scores)
    custom = [c for c in scores if c not in NON_LIVE + LIVE + MULTI_TURN]
    if custom:
        aggregates["overall (custom)"] = _mean("unweighted mean of " + ", ".join(custom), [part(c) for c in custom])
    return aggregates


def leaderboard_aggregate(scores):
    """The leaderboard's Overall as the official table computes it (a category not run counts 0), labelled with the
    parts run. Status "ok" only when every part was run in full; else "partial" (the number is still the official
    table's, and the formula says what was counted as 0)."""
    try:
        overall = leaderboard_overall(scores)
    except UserError as err:  # the live AST sizes come from bfcl-eval's data when those categories were not run
        return {"accuracy": None, "status": f"not computed ({err})", "formula": "the leaderboard's Overall"}
    by_status = {status: [n for n, p in overall["parts"].items() if p["status"] == status]
                 for status in ("run", "partly run", "not run")}
    label = "the leaderboard's Overall: Non-Live 10, Live 10, Irrelevance 10, Multi-Turn 30, Agentic 40 (normalised)"
    label += "; run: " + (", ".join(by_status["run"]) or "none")
    if by_status["partly run"]:
        label += "; partly run (missing categories count 0): " + ", ".join(by_status["partly run"])
    if by_status["not run"]:
        label += "; not run, counted 0: " + ", ".join(by_status["not run"])
    return {"accuracy": overall["accuracy"], "status": "ok" if overall["complete"] else "partial", "formula": label,
            "parts": overall["parts"]}


OUTCOME_STEPS = {"decodes_as_calls": "decodes as calls", "right_functions": "right function(s)",
                 "correct": "right arguments"}


ERROR_ANALYSIS_NOTE = ("Error analysis, in % of the entries run: the output decodes as tool calls -> the right "
                       "function(s) are called -> with the right arguments (the official verdict, i.e. the accuracy). "
                       "In irrelevance categories a decoded call is the mistake; where only relevance is scored there "
                       "is no function step.")


def prompt_format_of(generation, declared=None):
    """{"prompt_format", "bfcl_family", "fallback"} of a scored run: from its generation.json, else as declared on
    the command line (`score --prompt-format`), else unknown (None). Runs from before --prompt-format existed had
    only the chat template."""
    if generation and "settings" in generation:
        return {"prompt_format": generation.get("prompt_format", "chat_template"),
                "bfcl_family": generation.get("bfcl_family"), "fallback": generation.get("prompt_format_fallback")}
    return {"prompt_format": declared, "bfcl_family": None, "fallback": None}


def describe_prompt_format(info):
    if info["prompt_format"] == "bfcl":
        family = f" for the {info['bfcl_family']} family" if info.get("bfcl_family") else ""
        return f"`bfcl` (the official harness's prompt text{family}: leaderboard-comparable)"
    if info["prompt_format"] == "chat_template":
        return "`chat_template` (the model's own chat template: not leaderboard-comparable)" + (
            f". Fallback: {info['fallback']}" if info.get("fallback") else "")
    return "unknown (result files without generation.json; `score --prompt-format` declares it)"


def summary_markdown(summary):
    scores, lines = summary["categories"], [f"# BFCL v4 results ({summary['decoder']} decoder)", ""]
    lines += [f"Prompt format: {describe_prompt_format(summary['prompt_format'])}.", ""]
    official_run = any(c in NON_LIVE + LIVE + MULTI_TURN for c in scores)
    rows = [c for c in NON_LIVE + LIVE + MULTI_TURN if official_run] + \
        sorted(c for c in scores if c not in NON_LIVE + LIVE + MULTI_TURN)
    lines += ["| category | accuracy (%) | correct / total |", "|---|---:|---:|"]
    for c in rows:
        s = scores.get(c)
        count = ""
        if s:
            count = f"{s['correct']} / {s['total']}" + (f" (of {s['expected']})" if s["total"] != s["expected"] else "")
        lines.append(f"| {c} | {format_percent(s and s['accuracy'])} | {count} |")
    lines += ["", "| aggregate | accuracy (%) | how |", "|---|---:|---|"]
    for name, agg in summary["aggregates"].items():
        if official_run or name == "overall (custom)":
            value = format_percent(agg["accuracy"]) if agg["accuracy"] is not None or agg["status"] == "not run" \
                else agg["status"]
            lines.append(f"| {name} | {value} | {agg['formula']} |")
    lines += ["", "## Error analysis"]
    single_turn = [c for c in rows if c in scores and not is_multi_turn(c)]
    if single_turn:
        lines += ["", ERROR_ANALYSIS_NOTE, "",
                  "| category | " + " | ".join(f"{step} (%)" for step in OUTCOME_STEPS.values()) + " | errors by official type |",
                  "|---" + "|---:" * len(OUTCOME_STEPS) + "|---|"]
    for c in single_turn:
        rates = scores[c]["rates"]
        errors = ", ".join(f"{name} {count}" for name, count in scores[c]["error_types"].items()) or "none"
        values = ["" if rates[k] is None else format_percent(rates[k]) for k in OUTCOME_STEPS]
        lines.append(f"| {c} | " + " | ".join(values) + f" | {errors} |")
    lines += multi_turn_analysis_lines(scores, rows)
    generation = summary.get("generation") or {}
    if generation.get("prompts_generated"):
        lines += ["", f"Generated with `{generation['model']}` ({generation['backend']}, {generation['mode']} mode) on "
                  f"{generation['device']}: {generation['prompts_generated']} prompts in {generation['wall_time_s']}s, "
                  f"{generation['prompts_per_s']} prompts/s, {generation['generated_tokens_per_s']} generated tokens/s."]
    multi = generation.get("multi_turn")
    if multi:
        lines += ["", f"Multi-turn generated with `{generation['model']}` ({generation['backend']}): "
                  f"{multi['entries_generated']} entries in {multi['wall_time_s']}s on {multi['device']}, "
                  f"{multi['steps']} steps ({multi['prompts_per_s']} prompts/s), {multi['generated_tokens']} tokens "
                  f"generated ({multi['generated_tokens_per_s']} tokens/s)."]
    return "\n".join(lines + ["", SCOPE_NOTE, ""])


MULTI_TURN_ANALYSIS_NOTE = ("Multi-turn error analysis: the turns run, the share of them in which some step decodes "
                            "to a call, and the failed entries by official error type, with the turn where the check "
                            "failed (`-`: the entry has no per-turn verdict, e.g. force-terminated or an inference "
                            "error).")


def multi_turn_analysis_lines(scores, rows):
    categories = [c for c in rows if c in scores and is_multi_turn(c)]
    if not categories:
        return []
    lines = ["", MULTI_TURN_ANALYSIS_NOTE, "",
             "| category | entries | turns | turns with a call (%) | failed entries by error type (turn: entries) |",
             "|---|---:|---:|---:|---|"]
    for c in categories:
        analysis = scores[c]["multi_turn"]
        failed = "; ".join(f"{kind} " + ", ".join(f"{turn}: {n}" for turn, n in by_turn.items())
                           for kind, by_turn in analysis["failed_turns"].items()) or "none"
        lines.append(f"| {c} | {analysis['entries']} | {analysis['turns']} | "
                     f"{format_percent(analysis['turns_with_call_share'])} | {failed} |")
    return lines


def build_summary(scores, decoder, data_dir, generation, prompt_format):
    return {"scope": SCOPE_NOTE, "decoder": decoder, "data_dir": str(data_dir), "prompt_format": prompt_format,
            "categories": scores, "aggregates": aggregate_scores(scores),
            "not_run": [c for c in NON_LIVE + LIVE + MULTI_TURN if c not in scores], "generation": generation}


def write_summary(output_dir, summary, quiet=False):
    (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = summary_markdown(summary)
    (Path(output_dir) / "summary.md").write_text(markdown)
    if not quiet:
        print(markdown)


def duplicated_ids(path):
    """{"count": lines whose id an earlier line already had, "first": the first such id}, or None."""
    seen, count, first = set(), 0, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            id_ = json.loads(line).get("id")
        except (json.JSONDecodeError, AttributeError):
            continue  # read_results has already judged malformed lines
        if id_ in seen:
            count, first = count + 1, first or id_
        seen.add(id_)
    return {"count": count, "first": first} if count else None


def run_score(result_dir, output_dir=None, data_dir=None, decoder=None, prompt_format=None):
    result_dir = Path(result_dir)
    output_dir = Path(output_dir or result_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generation_file = result_dir / "generation.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else None
    recorded = prompt_format_of(generation)["prompt_format"]
    if prompt_format and recorded and prompt_format != recorded:
        raise UserError(f"--prompt-format {prompt_format}, but {generation_file} records {recorded}")
    data_dir = Path(data_dir or (generation or {}).get("data_dir") or package_data_dir())
    decoder = decoder or (generation or {}).get("decoder") or "qwen"
    files = find_result_files(result_dir)
    if not files:
        raise UserError(f"no BFCL_v4_*_result.json files under {result_dir}")
    scores, duplicates = {}, {}
    for category in sorted(files, key=category_order):
        if category.startswith(OUT_OF_SCOPE):
            logger.warning(f"skipping {files[category]}: {SCOPE_NOTE}")
            continue
        if not (data_dir / f"BFCL_v4_{category}.json").exists():
            raise UserError(f"{files[category]}: no BFCL_v4_{category}.json in {data_dir} (pass --data-dir)")
        if is_multi_turn(category):
            rows, scores[category] = score_multi_turn_file(category, files[category], data_dir)
        else:
            entries, answers = load_category(data_dir, category)
            rows, scores[category] = score_category(category, read_results(files[category]), entries, answers, decoder)
        write_jsonl_atomic(output_dir / f"BFCL_v4_{category}_score.json", rows)
        duplicates[category] = duplicated_ids(files[category])
    summary = build_summary(scores, decoder, data_dir, generation, prompt_format_of(generation, prompt_format))
    summary["duplicate_ids"] = {category: found for category, found in duplicates.items() if found}
    for category, found in summary["duplicate_ids"].items():  # the first line of an id is the one scored
        print(f"warning: {files[category]} holds {found['count']} duplicated id(s) (first: {found['first']}); "
              "only the first line of each was scored")
    write_summary(output_dir, summary)
    return summary


def multi_turn_model_name(path):
    """The model name a multi-turn result file is checked under: its folder's name, as the official checker takes
    the model's result folder (skipping the official layout's group folder, <model>/multi_turn/)."""
    folder = Path(path).resolve().parent
    return harness_model_name((folder.parent if folder.name == "multi_turn" else folder).name)


def score_multi_turn_file(category, path, data_dir):
    """Score rows and the category's score (with its error analysis) for one multi-turn result file."""
    entries, answers = load_multi_turn_category(category, data_dir)
    results = read_results(path)
    known = {entry["id"] for entry in entries}
    unknown = [i for i in results if i not in known]
    if unknown:
        logger.warning(f"{category}: ignoring {len(unknown)} result ids not in the data set (e.g. {unknown[0]})")
    try:
        rows, score = score_multi_turn_category(category, results, entries, answers, multi_turn_model_name(path))
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    score["multi_turn"] = multi_turn_error_analysis({category: rows})[category]
    return rows, score


def load_summaries(dirs, mixed_formats=False):
    """summary.json of each folder; runs whose prompt formats differ are compared only when asked to."""
    summaries = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            raise UserError(f"{path} not found: run `python eval_bfcl.py score --result-dir {d}` first")
        summaries.append(json.loads(path.read_text()))
    return summaries, check_prompt_formats(dirs, summaries, mixed_formats)


def check_prompt_formats(names, summaries, mixed_formats=False):
    """The prompt format of each summary. Runs prompted differently score differently for that reason too, so they
    are compared (by `compare` and `sweep.py report`) only when asked to."""
    formats = [(s.get("prompt_format") or {}).get("prompt_format") for s in summaries]
    if len(set(formats)) > 1 and not mixed_formats:
        listed = ", ".join(f"{name}: {f or 'unknown'}" for name, f in zip(names, formats))
        raise UserError(f"these runs were prompted differently ({listed}), so their scores differ for that reason "
                        "too; pass --mixed-formats to compare them anyway")
    return formats


def table(header, rows, text_columns=1):
    """A markdown table; the first `text_columns` columns left-aligned, numbers right-aligned."""
    rule = "|---" * text_columns + "|---:" * (len(header) - text_columns) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows]


def run_compare(dirs, plot=None, mixed_formats=False):
    summaries, formats = load_summaries(dirs, mixed_formats)
    categories = sorted({c for s in summaries for c in s["categories"]}, key=category_order)
    official_run = any(c in NON_LIVE + LIVE + MULTI_TURN for c in categories)
    shown = [c for c in NON_LIVE + LIVE + MULTI_TURN if official_run] + \
        [c for c in categories if c not in NON_LIVE + LIVE + MULTI_TURN]
    rows = [(c, [s["categories"].get(c, {}).get("accuracy") for s in summaries]) for c in shown]
    names = dict.fromkeys(n for s in summaries for n in s["aggregates"] if official_run or n == "overall (custom)")
    rows += [(f"**{n}**", [s["aggregates"].get(n, {}).get("accuracy") for s in summaries]) for n in names]

    def with_deltas(values):
        deltas = ["" if v is None or values[0] is None else f"{100 * (v - values[0]):+.2f}" for v in values[1:]]
        return [format_percent(v) for v in values] + deltas

    deltas_header = [f"Δ {d}" for d in dirs[1:]]
    lines = ["Prompt format: " + ", ".join(f"{d}: {f or 'unknown'}" for d, f in zip(dirs, formats)), ""]
    lines += table(["category", *dirs, *deltas_header], [[name, *with_deltas(values)] for name, values in rows])
    lines += ["", "Accuracy in %; Δ in points against the first column. " + SCOPE_NOTE, "", ERROR_ANALYSIS_NOTE, ""]
    analysis, errors = [], []
    for c in (c for c in categories if c in shown):
        for key, step in OUTCOME_STEPS.items():
            values = [(s["categories"].get(c) or {}).get("rates", {}).get(key) for s in summaries]
            if any(v is not None for v in values):
                analysis.append([c, step, *with_deltas(values)])
        values = [((s["categories"].get(c) or {}).get("multi_turn") or {}).get("turns_with_call_share") for s in summaries]
        if is_multi_turn(c) and any(v is not None for v in values):
            analysis.append([c, "turns with a call", *with_deltas(values)])
        for error_type in dict.fromkeys(t for s in summaries for t in (s["categories"].get(c) or {}).get("error_types", {})):
            counts = [(s["categories"].get(c) or {}).get("error_types", {}).get(error_type, 0) for s in summaries]
            errors.append([c, error_type, *map(str, counts)])
    lines += table(["category", "step", *dirs, *deltas_header], analysis, text_columns=2)
    lines += ["", "Entries by official error type:", ""] + table(["category", "error type", *dirs], errors, text_columns=2)
    print("\n".join(lines))
    if plot:
        plot_comparison(dirs, summaries, [c for c in categories if c in shown], plot)
        print(f"\nwrote {plot}")


def plot_comparison(dirs, summaries, categories, path):
    """One panel per step of the error analysis; a bar per run for each category."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [Path(d).name for d in dirs]
    names = names if len(set(names)) == len(names) else [str(d) for d in dirs]  # folder names, when they differ
    fig, axes = plt.subplots(len(OUTCOME_STEPS), 1, figsize=(max(6, 1.2 * len(categories) * len(dirs)), 9), sharex=True)
    width = 0.8 / len(dirs)
    for ax, (key, step) in zip(axes, OUTCOME_STEPS.items()):
        for i, (name, s) in enumerate(zip(names, summaries)):
            values = [(s["categories"].get(c) or {}).get("rates", {}).get(key) for c in categories]
            bars = ax.bar([x + (i - (len(dirs) - 1) / 2) * width for x in range(len(categories))],
                          [float("nan") if v is None else 100 * v for v in values], width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)  # a 0 is a number too, not a missing bar
        ax.set_ylim(0, 108)  # room for the labels above 100
        ax.set_ylabel(f"{step} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[0].set_title("BFCL: how far the answers got, per category")
    axes[-1].set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
