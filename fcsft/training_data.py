"""Training data for train_sft.py: load each source, convert it to the trainer's format, and apply the data recipe.

A recipe names one dataset (`dataset_name`, `dataset_format`) or a mixture (`datasets:`, TRL's DatasetConfig keys
plus `format`). Formats: every converter of data_formats.py (openai, messages, sharegpt, hermes, glaive, toolace,
apigen_mt, xlam) into TRL's conversational rows, `auto` (detected from the columns; the log says which), and
prompt_completion / dolly. The transforms train the whole BFCL score, not only the call-a-tool categories:

    irrelevance_fraction        share of single-call rows made "no listed tool fits": the called tools are removed
                                from the list and the reply is plain text with no call (BFCL's irrelevance categories)
    function_masking_fraction   share of rows with tools whose function and parameter names become random identifiers,
                                the same in the tool list and in every turn (Hammer's function masking)
    extra_tools                 tools from other rows added to each single-call row's list (selection practice)
    curriculum                  simple rows first (one call, few tools), complex ones last, in that order
    decontaminate               drop rows any of whose user turns matches a BFCL v4 test question (on by default)

xlam rows keep their own path (parse, transform the xLAM dicts, then convert), which gives the demo's rows exactly;
the other conversational formats are transformed on the normal form (data_formats.py). Every dropped row is counted
by source and reason; build_datasets returns that report, which train_sft.py logs and writes into run_summary.json.
"""

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from trl.scripts.utils import DatasetConfig

import fcsft.chat_formats as fc
import fcsft.data_formats as df
from fcsft.decontamination import BfclQuestions, request_texts
from fcsft.errors import UserError

logger = logging.getLogger(__name__)

PROMPT_COMPLETION = {"prompt_completion": fc.check_prompt_completion_row, "dolly": fc.dolly_to_prompt_completion}
FORMATS = (*df.FORMATS, *PROMPT_COMPLETION)  # auto, the conversational converters, then prompt/completion ones


@dataclass
class SourceConfig(DatasetConfig):
    """One dataset of a mixture: TRL's DatasetConfig keys (path, name, data_dir, data_files, split, columns,
    fraction: normalised shares, capped so that no dataset is oversampled) plus the row format."""

    format: str = "xlam"


def source_configs(args, recipe=None):
    """The recipe's sources: its `datasets:` list, or the single `dataset_name`."""
    if args.datasets and args.dataset_name:
        raise UserError(f"{recipe} sets both dataset_name and datasets: keep one")
    if not args.datasets:
        if not args.dataset_name:
            raise UserError(f"the recipe {recipe} must set dataset_name or datasets")
        if args.dataset_format not in FORMATS:
            raise UserError(f"dataset_format '{args.dataset_format}' in {recipe} is not one of {FORMATS}")
        return [SourceConfig(path=args.dataset_name, name=args.dataset_config, split=args.dataset_split,
                             format=args.dataset_format)]
    known = {f.name for f in fields(SourceConfig)}
    sources = []
    for index, item in enumerate(args.datasets):
        if isinstance(item, SourceConfig):
            sources.append(item)
            continue
        unknown = sorted(set(item) - known) if isinstance(item, dict) else []
        if not isinstance(item, dict) or unknown or "path" not in item:
            raise UserError(f"datasets[{index}] in {recipe} must be a mapping with `path` and only the keys "
                     f"{sorted(known)}" + (f"; unknown: {unknown}" if unknown else ""))
        sources.append(SourceConfig(**item))
    for index, source in enumerate(sources):
        if source.fraction is not None and (isinstance(source.fraction, bool) or not isinstance(source.fraction, int | float)):
            raise UserError(f"datasets[{index}] ({source.path}) in {recipe}: fraction {source.fraction!r} is not a number")
    fractions = [s.fraction for s in sources]
    if any(f is not None for f in fractions) and (None in fractions or any(f < 0 for f in fractions) or not sum(fractions)):
        raise UserError(f"in {recipe}, set a non-negative `fraction` on every dataset of the mixture or on none")
    for source in sources:
        if source.format not in FORMATS:
            raise UserError(f"dataset {source.path} in {recipe}: format '{source.format}' is not one of {FORMATS}")
    check_one_kind([s.format for s in sources if s.format != "auto"], recipe)
    return sources


def check_one_kind(formats, recipe):
    """The trainer takes conversational rows or prompt/completion pairs, not both in one run."""
    if len({f in PROMPT_COMPLETION for f in formats}) > 1:
        raise UserError(f"{recipe} mixes conversational ({', '.join(df.CONVERTERS)}) and prompt/completion datasets "
                        f"({', '.join(sorted(set(formats) & set(PROMPT_COMPLETION)))}): the trainer takes one kind per run")


# ----------------------------------------------------------------------------------------------------------------
# Loading: a local file or a hub dataset, with a one-line error that names the dataset and the likely cause
# ----------------------------------------------------------------------------------------------------------------


def why_not_loaded(err, source):
    text = f"{type(err).__name__}: {err}"
    if "Gated" in text or "gated" in text:
        return "it is gated: accept its licence on the hub, then `huggingface-cli login`"
    if "offline" in text.lower() or "Couldn't reach" in text or "ConnectionError" in text or "LocalEntryNotFound" in text:
        return ("the hub is unreachable (HF_HUB_OFFLINE=1 or no network) and it is not in the local cache: download it "
                "first, or point `path` at a local .json/.jsonl/.parquet file")
    if "DatasetNotFound" in text or "doesn't exist" in text or "not found" in text.lower():
        return "no such dataset on the hub (check the id), or it is gated and you are not logged in"
    if "split" in text.lower():
        return f"it has no split '{source.split}' ({text.splitlines()[0][:200]})"
    return text.splitlines()[0][:300]


def check_data_file(path, key):
    """A local JSON/JSONL file read before `datasets` parses it, so that an empty file, a truncated line or bytes that
    are not UTF-8 get one line naming the file and line (datasets raises a bare StopIteration or 70 traceback lines)."""
    if path.suffix not in (".json", ".jsonl"):
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{key} file {path}:{line}: not UTF-8 text (byte {data[err.start]:#x} at offset {err.start}); "
                        "re-encode the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{key} file {path} is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON array
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{key} file {path}:{err.lineno}: not valid JSON ({err.msg})") from None
        return
    for number, line in enumerate(text.splitlines(), 1):  # JSON lines
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{key} file {path}:{number}: not a valid JSON line ({err.msg}; truncated?)") from None


def load_source(source, key="dataset_name"):
    """The raw rows of one source; `key` is where the recipe names it, for the error message."""
    from datasets import load_dataset

    path = Path(source.path)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if path.suffix in builders:
        if not path.is_file():
            raise UserError(f"{key} file not found: {path}")
        check_data_file(path, key)
        raw = load_dataset(builders[path.suffix], data_files=str(path), split="train")
    else:
        try:
            raw = load_dataset(source.path, name=source.name, data_dir=source.data_dir, data_files=source.data_files,
                               split=source.split)
        except Exception as err:  # datasets raises many types; the user needs the dataset and the cause, not a traceback
            raise UserError(f"cannot load dataset '{source.path}' (split '{source.split}'): {why_not_loaded(err, source)}")
    return raw.select_columns(source.columns) if source.columns else raw


# ----------------------------------------------------------------------------------------------------------------
# Transforms on parsed xLAM rows {query, tools: [spec], answers: [{name, arguments}]}
# ----------------------------------------------------------------------------------------------------------------


def make_irrelevant(row, rng, tool_pool):
    """Remove the tools the answer calls; if none is left, list 1-3 unrelated tools instead. The answer becomes [].
    None when the data has no unrelated tool to list (a row needs at least one)."""
    called = {call["name"] for call in row["answers"]}
    tools = [t for t in row["tools"] if t["name"] not in called]
    if not tools:
        others = [t for t in tool_pool if t["name"] not in called]
        tools = rng.sample(others, min(len(others), rng.randint(1, 3)))
    return {**row, "tools": tools, "answers": []} if tools else None


def add_extra_tools(row, rng, tool_pool, n):
    """n tools drawn from other rows (none sharing a name with a listed one), shuffled into the list."""
    listed = {t["name"] for t in row["tools"]}
    candidates = [t for t in tool_pool if t["name"] not in listed]
    tools = row["tools"] + rng.sample(candidates, min(n, len(candidates)))
    rng.shuffle(tools)
    return {**row, "tools": tools}


def mask_names(row, rng):
    """Function names -> random 5-15 characters, parameter names -> random 4-10, consistently in the tool list and
    the answer, so the model must read descriptions instead of memorising names (Hammer's function masking)."""
    taken = set()
    renamed = {t["name"]: df.random_identifier(rng, 5, 15, taken) for t in row["tools"]}
    params = {}
    tools = []
    for tool in row["tools"]:
        spec = tool.get("parameters") or {}
        schema_style = spec.get("type") in ("object", "dict") and isinstance(spec.get("properties"), dict)
        names = list(spec["properties"] if schema_style else spec)
        params[tool["name"]] = mapping = {p: df.random_identifier(rng, 4, 10, taken) for p in names}
        if schema_style:
            spec = {**spec, "properties": {mapping[p]: v for p, v in spec["properties"].items()},
                    "required": [mapping.get(p, p) for p in spec.get("required", [])]}
        else:
            spec = {mapping[p]: v for p, v in spec.items()}
        tools.append({**tool, "name": renamed[tool["name"]], "parameters": spec})
    answers = [{"name": renamed[c["name"]],
                "arguments": {params[c["name"]].get(k, k): v for k, v in (c.get("arguments") or {}).items()}}
               for c in row["answers"]]
    return {**row, "tools": tools, "answers": answers}


def pick(rng, indices, fraction):
    """Exactly round(fraction * len(indices)) of them, at random."""
    return set(rng.sample(indices, round(fraction * len(indices))))


def convert_xlam_source(raw, args, seed, report):
    """Parse, validate, transform and convert xLAM rows; returns [(example, [transform names])]."""
    parsed = []
    for index, row in enumerate(raw):
        try:
            row = fc.parse_xlam_row(row)
            fc.xlam_to_messages(row)  # validates the row as it is, before any transform
            parsed.append(row)
        except fc.MalformedRow as err:
            report["skipped"][err.reason] += 1
            report["first_bad"].setdefault(err.reason, f"row {index}: {err}")
    pool = list({t["name"]: t for row in parsed for t in row["tools"]}.values())
    rng = random.Random(seed)
    with_calls = [i for i, row in enumerate(parsed) if row["answers"]]
    irrelevant = pick(rng, with_calls, args.irrelevance_fraction) if args.irrelevance_fraction else set()
    masked = pick(rng, list(range(len(parsed))), args.function_masking_fraction) if args.function_masking_fraction else set()
    examples = []
    for i, row in enumerate(parsed):
        row_rng = random.Random(f"{seed}-{i}")  # per row: the same row gets the same transform whatever else changes
        tags = [] if row["answers"] else ["no_call"]
        if i in irrelevant and (irrelevant_row := make_irrelevant(row, row_rng, pool)):
            row, tags = irrelevant_row, tags + ["irrelevance"]
        if args.extra_tools:
            row, tags = add_extra_tools(row, row_rng, pool, args.extra_tools), tags + ["extra_tools"]
        if i in masked:
            row, tags = mask_names(row, row_rng), tags + ["masked"]
        example = fc.xlam_to_messages(row, args.irrelevance_reply)
        example["complexity"] = (max(len(row["answers"]), 1), len(row["tools"]))
        examples.append((example, tags))
    for tag in ("irrelevance", "no_call", "extra_tools", "masked"):
        report["transforms"][tag] = sum(tag in tags for _, tags in examples)
    return examples


def resolve_source_format(raw, source):
    """The source's concrete format: its `format`, or the one `auto` reads off the columns (and the first row)."""
    try:
        return df.resolve_format(source.format, raw.column_names, raw[0] if len(raw) else None)
    except ValueError as err:
        raise UserError(f"dataset {source.path}: {err}") from None


def count_skipped(report, skipped, first_bad):
    report["skipped"].update(skipped)
    for reason, row in first_bad.items():
        report["first_bad"].setdefault(reason, row)


def convert_source(raw, data_format, args, seed, report):
    """[(example, [transform names])] of one source in a concrete format; skipped rows counted in `report`."""
    if data_format == "xlam":
        return convert_xlam_source(raw, args, seed, report)
    if data_format in PROMPT_COMPLETION:
        return convert_prompt_completion_source(raw, data_format, report)
    conversion = df.convert_rows(raw, data_format)
    count_skipped(report, conversion.skipped, conversion.first_bad)
    return transform_examples(conversion.examples, args, seed, report)


def convert_prompt_completion_source(raw, data_format, report):
    examples = []
    for index, row in enumerate(raw):
        try:
            example = PROMPT_COMPLETION[data_format](row)
        except fc.MalformedRow as err:
            count_skipped(report, Counter([err.reason]), {err.reason: f"row {index}: {err}"})
            continue
        examples.append(({**example, "complexity": (1, 0)}, []))
    return examples


def transform_examples(examples, args, seed, report):
    """The data recipe on normal-form rows of any format: irrelevance and extra tools on single-call rows, function
    masking on every row with tools (across all its turns); the same picks as the xlam path (exact shares, one
    random.Random per row). A transform that does not apply to a row (returns None) leaves it as it is."""
    pool = df.tool_pool(examples)
    rng = random.Random(seed)
    single = [i for i, example in enumerate(examples) if df.is_single_call(example)]
    with_tools = [i for i, example in enumerate(examples) if example.get("tools")]
    irrelevant = pick(rng, single, args.irrelevance_fraction) if args.irrelevance_fraction else set()
    masked = pick(rng, with_tools, args.function_masking_fraction) if args.function_masking_fraction else set()
    out = []
    for i, example in enumerate(examples):
        row_rng = random.Random(f"{seed}-{i}")
        tags = [] if df.called_names(example) else ["no_call"]
        if i in irrelevant and (made := df.make_irrelevant(example, row_rng, pool, args.irrelevance_reply)):
            example, tags = made, tags + ["irrelevance"]
        if args.extra_tools and (made := df.add_extra_tools(example, row_rng, pool, args.extra_tools)):
            example, tags = made, tags + ["extra_tools"]
        if i in masked:
            example, tags = df.mask_functions(example, row_rng), tags + ["masked"]
        out.append(({**example, "complexity": df.complexity(example)}, tags))
    for tag in ("irrelevance", "no_call", "extra_tools", "masked"):
        report["transforms"][tag] = sum(tag in tags for _, tags in out)
    report["untrained_turns"] = sum(df.untrained_turns(example) for example, _ in out)
    return out


def decontaminate(examples, bfcl, stats):
    """The rows none of whose user turns matches a BFCL v4 question; the others counted, the first one shown."""
    kept = []
    for example, tags in examples:
        hit = next(((text, match) for text in request_texts(example) if (match := bfcl.match(text))), None)
        if hit:
            stats["decontaminated"] += 1
            text, (bfcl_id, question) = hit
            stats["decontaminated_example"] = stats["decontaminated_example"] or \
                f"{text[:100]!r} ~ BFCL {bfcl_id}: {question[:100]!r}"
        else:
            kept.append((example, tags))
    return kept


# ----------------------------------------------------------------------------------------------------------------
# The whole recipe
# ----------------------------------------------------------------------------------------------------------------


def mixture_sizes(sizes, fractions):
    """TRL's mixture rule (trl/scripts/utils.py get_dataset): shares normalised to one, and the largest total for
    which no dataset is asked for more rows than it has; no fractions: every row of every dataset."""
    if all(f is None for f in fractions):
        return list(sizes)
    weights = [f / sum(fractions) for f in fractions]
    total = min(size / weight for size, weight in zip(sizes, weights) if weight > 0)
    return [round(weight * total) for weight in weights]


def load_and_convert(source, number, args, seed, bfcl):
    """(examples, stats) of one source: loaded, converted in its (detected) format, checked, transformed and
    decontaminated; UserError when more rows are malformed than max_malformed_fraction allows."""
    raw = load_source(source, f"datasets[{number}]" if args.datasets else "dataset_name")
    if args.max_samples:
        raw = raw.shuffle(seed=seed).select(range(min(args.max_samples, len(raw))))
    data_format = resolve_source_format(raw, source)
    stats = {"path": source.path, "format": data_format, "detected": source.format == "auto", "rows": len(raw),
             "skipped": Counter(), "first_bad": {}, "transforms": {}, "untrained_turns": 0, "decontaminated": 0,
             "decontaminated_example": None}
    examples = convert_source(raw, data_format, args, seed + number, stats)
    if bfcl:
        examples = decontaminate(examples, bfcl, stats)
    bad = sum(stats["skipped"].values())
    if stats["rows"] == 0 or bad > args.max_malformed_fraction * stats["rows"]:
        first = "; ".join(f"first {reason}: {row[:120]}" for reason, row in stats["first_bad"].items())
        raise UserError(f"{bad} of {stats['rows']} rows of {source.path} are malformed, more than "
                        f"max_malformed_fraction={args.max_malformed_fraction}: {dict(stats['skipped'])} "
                        f"(read as {data_format}" + (f"; {first})" if first else ")"))
    random.Random(seed + number).shuffle(examples)  # the mixture takes the first rows of each source
    return examples, stats


def build_datasets(args, seed, recipe=None):
    """(train dataset, eval dataset or None, report) for a recipe's ScriptArguments."""
    sources = source_configs(args, recipe)
    bfcl = BfclQuestions(args.decontamination_data_dir) if args.decontaminate else None
    if not args.decontaminate:
        logger.warning("data: decontaminate is off: rows that repeat BFCL test questions stay in, and BFCL scores of "
                       "this model may be inflated")
    per_source, report = [], {"sources": [], "decontaminate": args.decontaminate}
    for number, source in enumerate(sources):
        examples, stats = load_and_convert(source, number, args, seed, bfcl)
        per_source.append(examples)
        report["sources"].append(stats)
    check_one_kind([stats["format"] for stats in report["sources"]], recipe)  # what `auto` chose counts too

    empty = [s.path for s, e in zip(sources, per_source) if not e and s.fraction != 0]
    weighted = any(s.fraction is not None for s in sources)  # then one empty source empties all (TRL's rule)
    if empty and (weighted or not any(per_source)):
        raise UserError(f"no rows left of {', '.join(empty)} after the checks above, so there is nothing to train on")
    sizes = mixture_sizes([len(e) for e in per_source], [s.fraction for s in sources])
    rows = []
    for examples, size, stats in zip(per_source, sizes, report["sources"]):
        stats["taken"] = size
        rows += [({**example, "source": stats["path"]}, tags) for example, tags in examples[:size]]
    random.Random(seed).shuffle(rows)
    held_out = 0
    if args.eval_split_size:
        held_out = round(args.eval_split_size * len(rows)) if args.eval_split_size < 1 else int(args.eval_split_size)
    eval_rows, rows = rows[:held_out], rows[held_out:]
    if args.curriculum:
        # Stable sort on (calls, tools listed): one call among few tools first, parallel calls among many tools last;
        # rows of equal complexity keep their shuffled order. train_sft.py makes the sampler sequential.
        rows.sort(key=lambda item: tuple(item[0]["complexity"]))
    report["train_rows"], report["eval_rows"] = len(rows), len(eval_rows)
    report["untrained_turns"] = sum(stats["untrained_turns"] for stats in report["sources"])
    log_report(report)
    conversational = report["sources"][0]["format"] not in PROMPT_COMPLETION
    return to_dataset(rows, conversational), (to_dataset(eval_rows, conversational) if eval_rows else None), report


def to_dataset(rows, conversational):
    from datasets import Dataset, Features, Json, List, Value

    columns = ["messages", "tools"] if conversational else ["prompt", "completion"]
    table = [{**{c: example[c] for c in columns}, "transforms": ",".join(tags), "source": example.get("source", "")}
             for example, tags in rows]  # source: for the per-source count of rows cut or dropped for length
    if not conversational:
        return Dataset.from_list(table)
    # Json() keeps each message and its tool-call arguments as written; Arrow structs would merge every row's argument
    # names into one schema and render nulls into the prompt.
    for row in table:
        row["tools"] = json.dumps(row["tools"]) if row["tools"] else None
    features = Features({"messages": List(Json()), "tools": Value("string"), "transforms": Value("string"),
                         "source": Value("string")})
    return Dataset.from_list(table, features=features)


def export_data(args, seed, recipe, path):
    """--export_data: the rows the trainer would tokenize, one JSON object per line ({messages, tools}, or {prompt,
    completion}), after conversion and the data recipe; eval rows (eval_split_size) go to <stem>.eval.jsonl.
    Prints the per-source counts. No model, no tokenizer: how a user checks a conversion before training."""
    train, held_out, report = build_datasets(args, seed, recipe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [(path, train)] + ([(path.with_suffix(".eval.jsonl"), held_out)] if held_out else [])
    for target, dataset in written:
        with open(target, "w") as f:
            for row in dataset:
                f.write(json.dumps(exported_row(row), ensure_ascii=False) + "\n")
    for stats in report["sources"]:
        skipped = sum(stats["skipped"].values())
        print(f"{stats['path']} ({stats['format']}{', auto' if stats.get('detected') else ''}): {stats['rows']} rows, "
              f"{skipped} skipped, {stats['decontaminated']} decontaminated, {stats['taken']} taken")
    print(", ".join(f"wrote {len(dataset)} rows to {target}" for target, dataset in written))
    return report


def exported_row(row):
    """A training dataset row as the trainer reads it: `tools` decoded from the JSON string the dataset stores."""
    if "messages" not in row:
        return {"prompt": row["prompt"], "completion": row["completion"]}
    return {"messages": row["messages"], "tools": json.loads(row["tools"]) if row["tools"] else None}


def weight_zero_tokenizer(model_args, training_args, report):
    """None when no row has a weight-0 assistant turn (the trainer loads the tokenizer itself). Otherwise the model's
    tokenizer with a training chat template that leaves those turns out of TRL's assistant mask
    (data_formats.weighted_training_template), and its own template kept as `original_chat_template`, which
    restore_chat_template puts back before the final save. UserError when the loss is not assistant-only."""
    if not report.get("untrained_turns"):
        return None
    if not training_args.assistant_only_loss:
        raise UserError(f"{report['untrained_turns']} assistant turns have weight 0 (shown, not trained), which only "
                        "assistant_only_loss: true honours: set it, or drop the weights from the data")
    from transformers import AutoProcessor
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)  # as SFTTrainer does
    tokenizer.original_chat_template = tokenizer.chat_template
    try:
        training_template = get_training_chat_template(tokenizer) or tokenizer.chat_template
        tokenizer.chat_template = df.weighted_training_template(training_template)
    except ValueError as err:
        raise UserError(f"weight-0 turns in the data, but {model_args.model_name_or_path}'s chat template: {err}") from None
    return tokenizer


def restore_chat_template(tokenizer):
    """The model's own chat template back on the tokenizer (saved with the final model) after training."""
    if hasattr(tokenizer, "original_chat_template"):
        tokenizer.chat_template = tokenizer.original_chat_template


def log_report(report):
    for stats in report["sources"]:
        detected = ", detected by format: auto" if stats.get("detected") else ""
        logger.warning("data: %s (%s%s): %d rows, %d taken into the mixture", stats["path"], stats["format"], detected,
                       stats["rows"], stats["taken"])
        if stats["skipped"]:
            logger.warning("  skipped %d of %d rows of %s:", sum(stats["skipped"].values()), stats["rows"], stats["path"])
            for reason, count in stats["skipped"].most_common():
                logger.warning("  %-22s %6d  (first: %s)", reason, count, stats["first_bad"][reason][:120])
        if any(stats["transforms"].values()):
            logger.warning("  transforms: %s", ", ".join(f"{k} {v}" for k, v in stats["transforms"].items() if v))
        if stats.get("untrained_turns"):
            logger.warning("  %d assistant turns have weight 0: shown as context, not trained", stats["untrained_turns"])
        if stats["decontaminated"]:
            logger.warning("  decontaminated: %d rows dropped as BFCL test questions (e.g. %s)", stats["decontaminated"],
                           stats["decontaminated_example"])


def report_for_summary(report):
    """JSON-ready copy of the report (Counters become dicts)."""
    return json.loads(json.dumps(report, default=dict))


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
