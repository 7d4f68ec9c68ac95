"""Evaluate a model on the Berkeley Function-Calling Leaderboard (BFCL v4) single-turn categories, scored exactly as
the official checker scores them (our implementation lives in bfcl_scorer.py and is tested against it).

    python eval_bfcl.py --model Qwen/Qwen2.5-3B-Instruct --categories all --output-dir runs/bfcl/qwen2.5-3b
    accelerate launch --multi_gpu --num_processes 8 eval_bfcl.py --model ... --output-dir ...  # a slice per process
    python eval_bfcl.py score --result-dir runs/bfcl/qwen2.5-3b                                 # no model loaded
    python eval_bfcl.py compare runs/bfcl/base runs/bfcl/sft --plot cmp.png                      # side by side
    python eval_bfcl.py prompts --model M --categories all --output prompts.jsonl                # what the model sees
    python eval_bfcl.py --model runs/x --output-dir runs/bfcl/x --model-card runs/x/README.md    # scores into the card

Prompts are, by default (`--prompt-format bfcl`), the exact text the official leaderboard harness builds for the
model's family, so the numbers are comparable with the leaderboard's; `--prompt-format chat_template` renders them
with the model's own chat template instead (what train_sft.py trains on and what a server renders for `tools`).

--model may be an adapter folder (adapter_config.json): its base model is loaded with the adapter merged in.

Generation appends BFCL result files (`BFCL_v4_<category>_result.json`, one {"id", "result"} per line) after every
batch; the same command run again generates only the ids still missing. Multi-turn and agentic categories are out
of scope (they need executable environments), so the leaderboard's Overall score is not reported.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bfcl_scorer import BFCL_DECODERS, call_outcome, is_relevance_category, score_bfcl_entry
from function_calling import BFCL_PROMPT_BUILDERS, bfcl_chat, bfcl_family, bfcl_prompt

NON_LIVE = ["simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
            "irrelevance"]
LIVE = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance"]
GROUPS = {"non_live": NON_LIVE, "live": LIVE, "all": NON_LIVE + LIVE}
OUT_OF_SCOPE = ("multi_turn", "web_search", "memory", "format_sensitivity")
PROMPT_FORMATS = ("bfcl", "chat_template")
SCOPE_NOTE = ("Single-turn categories only: multi-turn and agentic (web search, memory) categories are out of scope, "
              "so the leaderboard's Overall accuracy (which weights them in) is not reported.")


# ---------------------------------------------------------------------------------------------------------------
# Data: BFCL_v4_<category>.json (+ possible_answer/BFCL_v4_<category>.json), one JSON object per line
# ---------------------------------------------------------------------------------------------------------------


def package_data_dir():
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        sys.exit("bfcl-eval is not installed (`make setup` installs it), so pass --data-dir with BFCL_v4_*.json files")
    return Path(spec.submodule_search_locations[0]) / "data"


def category_order(category):
    known = NON_LIVE + LIVE
    return (known.index(category) if category in known else len(known), category)


def categories_in(data_dir):
    names = [p.name[len("BFCL_v4_"):-len(".json")] for p in Path(data_dir).glob("BFCL_v4_*.json")]
    return sorted((n for n in names if not n.startswith(OUT_OF_SCOPE)), key=category_order)


def resolve_categories(requested, data_dir):
    """Category names and groups -> categories present in data_dir. "all" is every in-scope file there."""
    available = categories_in(data_dir)
    chosen = []
    for name in (n for item in requested for n in item.split(",") if n):
        if name.startswith(OUT_OF_SCOPE):
            sys.exit(f"{name}: multi-turn and agentic categories are out of scope for eval_bfcl.py. {SCOPE_NOTE}")
        if name == "all":
            members = available
        elif name in GROUPS:
            members = [c for c in GROUPS[name] if c in available]
        elif name in available:
            members = [name]
        else:
            sys.exit(f"unknown category {name!r}: {data_dir} has {', '.join(available) or 'no BFCL_v4_*.json files'}")
        chosen += [c for c in members if c not in chosen]
    if not chosen:
        sys.exit(f"no categories selected from {data_dir}")
    return chosen


def read_jsonl(path):
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                sys.exit(f"{path}:{number}: not valid JSON ({err})")
    return rows


def load_category(data_dir, category):
    """(entries, answers); answers are None for (ir)relevance categories, else aligned with entries by position,
    as the official eval_runner aligns them."""
    path = Path(data_dir) / f"BFCL_v4_{category}.json"
    entries = read_jsonl(path)
    for number, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "question", "function") if k not in entry]
        if missing:
            sys.exit(f"{path}:{number}: entry without {', '.join(missing)}")
    if is_relevance_category(category):
        return entries, None
    answer_path = Path(data_dir) / "possible_answer" / f"BFCL_v4_{category}.json"
    if not answer_path.exists():
        sys.exit(f"{answer_path}: missing (every non-relevance category needs its possible answers)")
    answers = read_jsonl(answer_path)
    if len(answers) != len(entries):
        sys.exit(f"{answer_path}: {len(answers)} answers for {len(entries)} entries in {path}")
    for number, answer in enumerate(answers, 1):
        if not isinstance(answer.get("ground_truth"), list):
            sys.exit(f"{answer_path}:{number}: no ground_truth list")
    return entries, answers


# ---------------------------------------------------------------------------------------------------------------
# Result files: append as batches finish; on restart merge, dedupe and drop a truncated last line
# ---------------------------------------------------------------------------------------------------------------


def result_path(output_dir, category):
    return Path(output_dir) / f"BFCL_v4_{category}_result.json"


def rank_result_path(output_dir, category, rank):
    return Path(output_dir) / f"BFCL_v4_{category}_result.rank{rank}.jsonl"


def read_results(path):
    """id -> raw result. The first line for an id wins; a truncated last line (a killed run) is ignored."""
    results = {}
    lines = Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                print(f"{path}:{number}: ignoring a truncated last line", file=sys.stderr)
                continue
            sys.exit(f"{path}:{number}: not valid JSON")
        if not isinstance(row, dict) or "id" not in row or "result" not in row:
            sys.exit(f"{path}:{number}: expected an object with `id` and `result`")
        results.setdefault(row["id"], row["result"])
    return results


def write_jsonl_atomic(path, rows):
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")  # ASCII: one line per row
    os.replace(tmp, path)


def append_jsonl(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()


def consolidate_results(output_dir, category, entries):
    """Merge the result file with per-rank partial files of an earlier multi-process run into one file in dataset
    order, without duplicates. Returns the set of ids already done."""
    path = result_path(output_dir, category)
    partials = sorted(Path(output_dir).glob(f"BFCL_v4_{category}_result.rank*.jsonl"))
    sources = ([path] if path.exists() else []) + partials
    merged = {}
    for source in sources:
        for id_, result in read_results(source).items():
            merged.setdefault(id_, result)
    if merged or path.exists():
        order = {entry["id"]: i for i, entry in enumerate(entries)}
        ids = sorted(merged, key=lambda i: (order.get(i, len(order)), str(i)))
        write_jsonl_atomic(path, [{"id": i, "result": merged[i]} for i in ids])
    for partial in partials:
        partial.unlink()
    return set(merged)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def resolve_prompt_format(model_name, model_type, requested, mode):
    """{"prompt_format": what is used, "bfcl_family", "fallback": why not what was asked}. `bfcl` needs an official
    prompt builder for the model's family (function_calling.BFCL_PROMPT_BUILDERS); without one the model's chat
    template is used, and the run says so in its log, generation.json and summaries."""
    family = bfcl_family(model_name, model_type)
    if requested == "chat_template":
        return {"prompt_format": "chat_template", "bfcl_family": family, "fallback": None}
    if (family, mode) in BFCL_PROMPT_BUILDERS:
        return {"prompt_format": "bfcl", "bfcl_family": family, "fallback": None}
    reason = (f"--prompt-format bfcl: no official BFCL prompt builder for {model_name} (family {family or 'unknown'}, "
              f"model_type {model_type}, {mode} mode); using its chat template instead, so scores are not "
              "leaderboard-comparable")
    return {"prompt_format": "chat_template", "bfcl_family": family, "fallback": reason}


def model_prompt_format(args):
    """resolve_prompt_format for args.model, from its config.json alone (no weights)."""
    from transformers import AutoConfig

    model = args.model
    if is_adapter(model):  # an adapter folder is prompted as its base model
        model = json.loads((Path(model) / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    return resolve_prompt_format(model, config.model_type, args.prompt_format, args.mode)


def load_tokenizer(model, trust_remote_code=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_prompts(tokenizer, work, mode, prompt_format):
    """The prompt text for each (category, entry) of `work`: the official harness's text for the model's family
    (`bfcl`), or the model's own chat template (`chat_template`; in fc mode with `tools`, after checking that the
    template renders them)."""
    if prompt_format["prompt_format"] == "bfcl":
        return [bfcl_prompt(entry, category, mode, prompt_format["bfcl_family"]) for category, entry in work]
    if tokenizer.chat_template is None:
        sys.exit("the tokenizer has no chat template: --prompt-format chat_template renders prompts with it")
    prompts, checked = [], False
    for category, entry in work:
        messages, tools = bfcl_chat(entry, category, mode)
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        if tools and not checked:
            if tools[0]["function"]["name"] not in text:
                sys.exit("the chat template ignores `tools`: use --mode prompt (BFCL's prompt-mode system prompt)")
            checked = True
        prompts.append(text)
    return prompts


def model_dtype(requested, device_type):
    """The dtype generation runs in: `auto` is bf16 on GPUs, fp32 on CPU."""
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cuda" else "float32"


def is_adapter(model):
    return (Path(model) / "adapter_config.json").is_file()


def load_model(model, **load_kwargs):
    """A full checkpoint, or an adapter folder (adapter_config.json, as train_sft.py or merge_adapters.py write it):
    its base model with the adapter merged in, so that it generates at the base model's speed."""
    from transformers import AutoModelForCausalLM

    if is_adapter(model):
        from merge_adapters import load_base_with_adapters

        return load_base_with_adapters([model], **load_kwargs)[0].merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(model, **load_kwargs)


def prompt_token_ids(tokenizer, prompts):
    """The token ids generation feeds the model. The prompt text already holds its special tokens, so none are
    added (Qwen tokenizers add none anyway, as the official harness's server tokenizes it)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def greedy_generation_config(model, tokenizer, max_new_tokens):
    """Greedy decoding that stops at any of the model's end tokens: (GenerationConfig, set of end token ids)."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids),
                              pad_token_id=tokenizer.pad_token_id)
    return config, eos_ids


def decode_generated(tokenizer, rows, eos_ids):
    """Generated token rows -> (texts up to the first end token, special tokens dropped; tokens generated)."""
    texts, generated_tokens = [], 0
    for row in rows:
        length = next((k + 1 for k, token in enumerate(row) if token in eos_ids), len(row))
        generated_tokens += length
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
    return texts, generated_tokens


def generate_with_transformers(args, state, tokenizer, token_ids, write_batch):
    import torch
    from tqdm.auto import tqdm
    device = state.device
    dtype = getattr(torch, model_dtype(args.dtype, device.type))
    model = load_model(args.model, dtype=dtype, device_map={"": str(device)}, trust_remote_code=args.trust_remote_code).eval()
    config, eos_ids = greedy_generation_config(model, tokenizer, args.max_new_tokens)
    generated_tokens, start_time = 0, time.time()
    for start in tqdm(range(0, len(token_ids), args.batch_size), desc=f"generating (rank {state.process_index})",
                      disable=not state.is_local_main_process):
        batch = list(range(start, min(start + args.batch_size, len(token_ids))))
        inputs = tokenizer.pad({"input_ids": [token_ids[i] for i in batch]}, return_tensors="pt").to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config)
        texts, tokens = decode_generated(tokenizer, output[:, inputs["input_ids"].shape[1]:].tolist(), eos_ids)
        generated_tokens += tokens
        write_batch(batch, texts)
    return generated_tokens, time.time() - start_time


def generate_with_vllm(args, state, tokenizer, token_ids, write_batch):
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        sys.exit("--backend vllm needs vllm installed (pip install vllm)")
    if state.num_processes > 1:
        sys.exit("--backend vllm runs as one process; use --tensor-parallel-size instead of accelerate launch")
    if is_adapter(args.model):
        sys.exit(f"--backend vllm: {args.model} is an adapter; merge it first (python merge_adapters.py {args.model} "
                 "--output MERGED) or use --backend transformers")
    from tqdm.auto import tqdm

    llm = LLM(model=args.model, dtype="auto" if args.dtype == "auto" else args.dtype, seed=0,
              tensor_parallel_size=args.tensor_parallel_size, trust_remote_code=args.trust_remote_code)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    generated_tokens, chunk, start_time = 0, max(256, args.batch_size), time.time()  # chunks keep results flowing
    for start in tqdm(range(0, len(token_ids), chunk), desc="generating (vllm)"):
        batch = list(range(start, min(start + chunk, len(token_ids))))
        outputs = llm.generate([{"prompt_token_ids": token_ids[i]} for i in batch], sampling, use_tqdm=False)
        generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        write_batch(batch, [o.outputs[0].text for o in outputs])
    return generated_tokens, time.time() - start_time


def generate_missing(args, state, work, output_dir, prompt_format):
    """Generate this rank's share of `work` [(category, entry)], appending results as batches finish.
    Returns (prompts, generated tokens) summed over ranks and the generation wall time (model loading excluded)."""
    from accelerate.utils import gather_object

    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    token_ids = prompt_token_ids(tokenizer, render_prompts(tokenizer, work, args.mode, prompt_format))
    # Longest first, so padding per batch is small and an out-of-memory shows up at once; ranks take turns.
    order = sorted(range(len(work)), key=lambda i: -len(token_ids[i]))[state.process_index::state.num_processes]
    my_work, my_ids = [work[i] for i in order], [token_ids[i] for i in order]

    def write_batch(batch, texts):
        by_category = defaultdict(list)
        for i, text in zip(batch, texts):
            by_category[my_work[i][0]].append({"id": my_work[i][1]["id"], "result": text})
        for category, rows in by_category.items():
            path = result_path(output_dir, category) if state.num_processes == 1 else \
                rank_result_path(output_dir, category, state.process_index)
            append_jsonl(path, rows)

    generate = generate_with_vllm if args.backend == "vllm" else generate_with_transformers
    tokens, seconds = generate(args, state, tokenizer, my_ids, write_batch) if my_ids else (0, 0.0)
    per_rank = gather_object([(len(my_ids), tokens, seconds)])  # also waits for every rank
    return sum(r[0] for r in per_rank), sum(r[1] for r in per_rank), max(r[2] for r in per_rank)


def weights_fingerprint(model):
    """A cheap content hash of a local checkpoint (size, first and last MiB of each weight file), so that a retrained
    model at the same path never resumes the old one's results, while a byte-identical rebuild still does."""
    digest = hashlib.sha1()
    for path in sorted(Path(model).glob("*.safetensors")) + sorted(Path(model).glob("*.bin")):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(0, size - (1 << 20)))
            digest.update(f"{path.name}:{size}:".encode() + head + f.read())
    return digest.hexdigest()[:16] if Path(model).is_dir() else None


def generation_settings(args, prompt_format):
    """What decides the outputs; results generated under other settings (a prompt format included) are never
    resumed."""
    return {"model": args.model, "weights": weights_fingerprint(args.model), "mode": args.mode,
            "prompt_format": prompt_format["prompt_format"], "max_new_tokens": args.max_new_tokens,
            # the family changes the prompt only in the bfcl format
            "bfcl_family": prompt_format["bfcl_family"] if prompt_format["prompt_format"] == "bfcl" else None}


def load_datasets(data_dir, requested_categories, limit=None):
    """(data dir, categories, {category: (entries, answers)}), the first `limit` entries of each category."""
    data_dir = Path(data_dir) if data_dir else package_data_dir()
    categories = resolve_categories(requested_categories, data_dir)
    datasets = {c: load_category(data_dir, c) for c in categories}
    if limit:
        datasets = {c: (e[:limit], a and a[:limit]) for c, (e, a) in datasets.items()}
    return data_dir, categories, datasets


def run_generation(args):
    import torch
    from accelerate import PartialState

    # A multi-process launch without GPUs needs cpu=True for accelerate to set up gloo (MULTI_CPU) process groups.
    state = PartialState(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    data_dir, categories, datasets = load_datasets(args.data_dir, args.categories, args.limit)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompt_format = model_prompt_format(args)
    if prompt_format["fallback"] and state.is_main_process:
        print(f"warning: {prompt_format['fallback']}", file=sys.stderr)
    stats_path, settings = output_dir / "generation.json", generation_settings(args, prompt_format)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    existing = [result_path(output_dir, c) for c in categories if result_path(output_dir, c).exists()]
    if existing and stats.get("settings", settings) != settings and not args.overwrite:
        before = stats["settings"]
        changed = ", ".join(f"{k}: {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v)
        sys.exit(f"{output_dir} holds results generated with other settings ({changed}): pass --overwrite to "
                 "regenerate them, or use another --output-dir")
    state.wait_for_everyone()
    if state.is_main_process:
        if args.overwrite or "settings" not in stats:  # recorded before generating, so a killed run is guarded too
            stats = {"settings": settings}
            stats_path.write_text(json.dumps(stats, indent=2) + "\n")
        for category, (entries, _) in datasets.items():
            if args.overwrite:
                for stale in output_dir.glob(f"BFCL_v4_{category}_result*"):
                    stale.unlink()
            consolidate_results(output_dir, category, entries)  # merge what an interrupted run left behind
    state.wait_for_everyone()
    done = {c: set(read_results(result_path(output_dir, c))) if result_path(output_dir, c).exists() else set()
            for c in categories}
    work = [(c, e) for c, (entries, _) in datasets.items() for e in entries if e["id"] not in done[c]]
    skipped = sum(len(entries) for entries, _ in datasets.values()) - len(work)
    if state.is_main_process:
        print(f"{len(work)} prompts to generate over {', '.join(categories)} ({skipped} already in {output_dir})")

    start_time = time.time()
    prompts_done, tokens_done, gen_time = (generate_missing(args, state, work, output_dir, prompt_format) if work
                                           else (0, 0, 0.0))
    if not state.is_main_process:
        return
    device = torch.cuda.get_device_name(state.device) if state.device.type == "cuda" else state.device.type
    for category, (entries, _) in datasets.items():
        consolidate_results(output_dir, category, entries)
    if work or "prompts_generated" not in stats:  # with nothing left to do, keep the stats of the run that generated
        stats = {
            "settings": settings, "model": args.model, "backend": args.backend, "mode": args.mode, "decoder": args.decoder,
            "prompt_format": prompt_format["prompt_format"], "prompt_format_requested": args.prompt_format,
            "bfcl_family": prompt_format["bfcl_family"], "prompt_format_fallback": prompt_format["fallback"],
            "data_dir": args.data_dir and str(data_dir.resolve()), "categories": categories, "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "dtype": model_dtype(args.dtype, state.device.type),
            "device": f"{state.num_processes} x {device}", "num_processes": state.num_processes,
            "prompts_generated": prompts_done, "prompts_already_done": skipped, "generated_tokens": tokens_done,
            "wall_time_s": round(gen_time, 2), "total_wall_time_s": round(time.time() - start_time, 2),
            "prompts_per_s": round(prompts_done / gen_time, 3) if prompts_done else None,
            "generated_tokens_per_s": round(tokens_done / gen_time, 1) if prompts_done else None,
        }
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
        print(f"generated {prompts_done} prompts in {gen_time:.1f}s on {stats['device']} "
              f"({stats['prompts_per_s']} prompts/s, {stats['generated_tokens_per_s']} generated tokens/s)")
    if not args.no_score:
        run_score(output_dir, output_dir, data_dir, args.decoder, model_card=args.model_card)


# ---------------------------------------------------------------------------------------------------------------
# Scoring and aggregation
# ---------------------------------------------------------------------------------------------------------------


def find_result_files(result_dir):
    files = {}
    for path in sorted(Path(result_dir).rglob("BFCL_v4_*_result.json")):
        category = path.name[len("BFCL_v4_"):-len("_result.json")]
        if category in files:
            sys.exit(f"two result files for {category}: {files[category]} and {path}; "
                     "point --result-dir at one model's folder")
        files[category] = path
    return files


def score_category(category, results, entries, answers, decoder):
    """Per-entry verdicts (dataset order, entries with a result only) and {accuracy, correct, total, expected,
    error_types (counts by the official error type), rates (the call_outcome steps: decodes_as_calls,
    right_functions, correct)}."""
    known = {entry["id"] for entry in entries}
    unknown = [i for i in results if i not in known]
    if unknown:
        print(f"{category}: ignoring {len(unknown)} result ids not in the data set (e.g. {unknown[0]})", file=sys.stderr)
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


def _mean(formula, parts, weighted=False):
    """parts: (name, {accuracy, total} or None). Unweighted or entry-weighted mean, when every part was run."""
    present = [score for _, score in parts if score is not None and score["accuracy"] is not None]
    missing = [name for name, score in parts if score is None or score["accuracy"] is None]
    if not present:
        return {"accuracy": None, "status": "not run", "formula": formula}
    if missing:
        return {"accuracy": None, "status": f"incomplete (missing {', '.join(missing)})", "formula": formula}
    total = sum(score["total"] for score in present)
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
    custom = [c for c in scores if c not in NON_LIVE + LIVE]
    if custom:
        aggregates["overall (custom)"] = _mean("unweighted mean of " + ", ".join(custom), [part(c) for c in custom])
    return aggregates


def percent(value):
    return "not run" if value is None else f"{100 * value:.2f}"


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
    official_run = any(c in NON_LIVE + LIVE for c in scores)
    rows = [c for c in NON_LIVE + LIVE if official_run] + sorted(c for c in scores if c not in NON_LIVE + LIVE)
    lines += ["| category | accuracy (%) | correct / total |", "|---|---:|---:|"]
    for c in rows:
        s = scores.get(c)
        count = ""
        if s:
            count = f"{s['correct']} / {s['total']}" + (f" (of {s['expected']})" if s["total"] != s["expected"] else "")
        lines.append(f"| {c} | {percent(s and s['accuracy'])} | {count} |")
    lines += ["", "| aggregate | accuracy (%) | how |", "|---|---:|---|"]
    for name, agg in summary["aggregates"].items():
        if official_run or name == "overall (custom)":
            value = percent(agg["accuracy"]) if agg["status"] in ("ok", "not run") else agg["status"]
            lines.append(f"| {name} | {value} | {agg['formula']} |")
    lines += ["", "## Error analysis", "", ERROR_ANALYSIS_NOTE, "",
              "| category | " + " | ".join(f"{step} (%)" for step in OUTCOME_STEPS.values()) + " | errors by official type |",
              "|---" + "|---:" * len(OUTCOME_STEPS) + "|---|"]
    for c in (c for c in rows if c in scores):
        rates = scores[c]["rates"]
        errors = ", ".join(f"{name} {count}" for name, count in scores[c]["error_types"].items()) or "none"
        values = ["" if rates[k] is None else percent(rates[k]) for k in OUTCOME_STEPS]
        lines.append(f"| {c} | " + " | ".join(values) + f" | {errors} |")
    generation = summary.get("generation")
    if generation and "prompts_generated" in generation:
        lines += ["", f"Generated with `{generation['model']}` ({generation['backend']}, {generation['mode']} mode) on "
                  f"{generation['device']}: {generation['prompts_generated']} prompts in {generation['wall_time_s']}s, "
                  f"{generation['prompts_per_s']} prompts/s, {generation['generated_tokens_per_s']} generated tokens/s."]
    return "\n".join(lines + ["", SCOPE_NOTE, ""])


def build_summary(scores, decoder, data_dir, generation, prompt_format):
    return {"scope": SCOPE_NOTE, "decoder": decoder, "data_dir": str(data_dir), "prompt_format": prompt_format,
            "categories": scores, "aggregates": aggregate_scores(scores),
            "not_run": [c for c in NON_LIVE + LIVE if c not in scores], "generation": generation}


def write_summary(output_dir, summary, quiet=False):
    (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = summary_markdown(summary)
    (Path(output_dir) / "summary.md").write_text(markdown)
    if not quiet:
        print(markdown)


def run_score(result_dir, output_dir=None, data_dir=None, decoder=None, prompt_format=None, model_card=None):
    result_dir = Path(result_dir)
    output_dir = Path(output_dir or result_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generation_file = result_dir / "generation.json"
    generation = json.loads(generation_file.read_text()) if generation_file.exists() else None
    recorded = prompt_format_of(generation)["prompt_format"]
    if prompt_format and recorded and prompt_format != recorded:
        sys.exit(f"--prompt-format {prompt_format}, but {generation_file} records {recorded}")
    data_dir = Path(data_dir or (generation or {}).get("data_dir") or package_data_dir())
    decoder = decoder or (generation or {}).get("decoder") or "qwen"
    files = find_result_files(result_dir)
    if not files:
        sys.exit(f"no BFCL_v4_*_result.json files under {result_dir}")
    scores = {}
    for category in sorted(files, key=category_order):
        if category.startswith(OUT_OF_SCOPE):
            print(f"skipping {files[category]}: {SCOPE_NOTE}", file=sys.stderr)
            continue
        if not (data_dir / f"BFCL_v4_{category}.json").exists():
            sys.exit(f"{files[category]}: no BFCL_v4_{category}.json in {data_dir} (pass --data-dir)")
        entries, answers = load_category(data_dir, category)
        rows, scores[category] = score_category(category, read_results(files[category]), entries, answers, decoder)
        write_jsonl_atomic(output_dir / f"BFCL_v4_{category}_score.json", rows)
    summary = build_summary(scores, decoder, data_dir, generation, prompt_format_of(generation, prompt_format))
    write_summary(output_dir, summary)
    if model_card:  # the scores into the card's model-index metadata, which the hub shows
        from model_card import write_bfcl_results

        write_bfcl_results(model_card, summary)
        print(f"BFCL results written into {model_card}")
    return summary


def load_summaries(dirs, mixed_formats=False):
    """summary.json of each folder; runs whose prompt formats differ are compared only when asked to."""
    summaries = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            sys.exit(f"{path} not found: run `python eval_bfcl.py score --result-dir {d}` first")
        summaries.append(json.loads(path.read_text()))
    formats = [(s.get("prompt_format") or {}).get("prompt_format") for s in summaries]
    if len(set(formats)) > 1 and not mixed_formats:
        listed = ", ".join(f"{d}: {f or 'unknown'}" for d, f in zip(dirs, formats))
        sys.exit(f"compare: these runs were prompted differently ({listed}), so their scores differ for that reason "
                 "too; pass --mixed-formats to compare them anyway")
    return summaries, formats


def table(header, rows, text_columns=1):
    """A markdown table; the first `text_columns` columns left-aligned, numbers right-aligned."""
    rule = "|---" * text_columns + "|---:" * (len(header) - text_columns) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows]


def run_compare(dirs, plot=None, mixed_formats=False):
    summaries, formats = load_summaries(dirs, mixed_formats)
    categories = sorted({c for s in summaries for c in s["categories"]}, key=category_order)
    official_run = any(c in NON_LIVE + LIVE for c in categories)
    shown = [c for c in NON_LIVE + LIVE if official_run] + [c for c in categories if c not in NON_LIVE + LIVE]
    rows = [(c, [s["categories"].get(c, {}).get("accuracy") for s in summaries]) for c in shown]
    names = dict.fromkeys(n for s in summaries for n in s["aggregates"] if official_run or n == "overall (custom)")
    rows += [(f"**{n}**", [s["aggregates"].get(n, {}).get("accuracy") for s in summaries]) for n in names]

    def with_deltas(values):
        deltas = ["" if v is None or values[0] is None else f"{100 * (v - values[0]):+.2f}" for v in values[1:]]
        return [percent(v) for v in values] + deltas

    deltas_header = [f"Δ {d}" for d in dirs[1:]]
    lines = [f"Prompt format: " + ", ".join(f"{d}: {f or 'unknown'}" for d, f in zip(dirs, formats)), ""]
    lines += table(["category", *dirs, *deltas_header], [[name, *with_deltas(values)] for name, values in rows])
    lines += ["", "Accuracy in %; Δ in points against the first column. " + SCOPE_NOTE, "", ERROR_ANALYSIS_NOTE, ""]
    analysis, errors = [], []
    for c in (c for c in categories if c in shown):
        for key, step in OUTCOME_STEPS.items():
            values = [(s["categories"].get(c) or {}).get("rates", {}).get(key) for s in summaries]
            if any(v is not None for v in values):
                analysis.append([c, step, *with_deltas(values)])
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def run_prompts(args):
    """Write the exact prompt text generation would feed the model, one JSON object per entry; no weights loaded."""
    _, _, datasets = load_datasets(args.data_dir, args.categories, args.limit)
    prompt_format = model_prompt_format(args)
    if prompt_format["fallback"]:
        print(f"warning: {prompt_format['fallback']}", file=sys.stderr)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    work = [(category, entry) for category, (entries, _) in datasets.items() for entry in entries]
    prompts = render_prompts(tokenizer, work, args.mode, prompt_format)
    rows = [{"id": entry["id"], "category": category, "prompt_format": prompt_format["prompt_format"],
             "prompt": prompt, "num_tokens": len(ids)}
            for (category, entry), prompt, ids in zip(work, prompts, prompt_token_ids(tokenizer, prompts))]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.output, rows)
    family = f", {prompt_format['bfcl_family']} family" if prompt_format["prompt_format"] == "bfcl" else ""
    print(f"wrote {len(rows)} prompts ({prompt_format['prompt_format']} format{family}) to {args.output}")


def add_prompt_arguments(parser):
    """What decides the prompt text: shared by generation and the prompts subcommand."""
    parser.add_argument("--model", required=True, help="local path or Hugging Face hub id")
    parser.add_argument("--categories", nargs="+", default=["all"], help="categories or groups: all, non_live, live")
    parser.add_argument("--data-dir", help="BFCL_v4_<category>.json + possible_answer/ (default: bfcl-eval's v4 data)")
    parser.add_argument("--mode", choices=["fc", "prompt"], default="fc",
                        help="fc: the model is told the functions as tools; prompt: BFCL's system prompt lists them "
                             "and asks for Python-style calls")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="bfcl",
                        help="bfcl: the official harness's prompt text for the model's family (leaderboard-comparable; "
                             "falls back to chat_template for a family without one); chat_template: the model's own "
                             "chat template")
    parser.add_argument("--limit", type=int, help="only the first N entries of each category (smoke tests)")
    parser.add_argument("--trust-remote-code", action="store_true")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py score", description="Score existing BFCL result files.")
        parser.add_argument("--result-dir", required=True, help="searched recursively for BFCL_v4_*_result.json")
        parser.add_argument("--output-dir", help="where score files and summaries go (default: --result-dir)")
        parser.add_argument("--data-dir", help="BFCL_v4_*.json + possible_answer/ (default: the run's, else bfcl-eval's)")
        parser.add_argument("--decoder", choices=sorted(BFCL_DECODERS), help="default: the run's, else qwen")
        parser.add_argument("--model-card", help="README.md to write the results into (model-index metadata + table)")
        parser.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                            help="how result files without generation.json were prompted (e.g. bfcl for the official "
                                 "harness's own result files); recorded in the summary so compare can check it")
        args = parser.parse_args(argv[1:])
        run_score(args.result_dir, args.output_dir, args.data_dir, args.decoder, args.prompt_format, args.model_card)
        return
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py compare", description="Compare scored runs side by side.")
        parser.add_argument("dirs", nargs="+", help="output folders holding summary.json")
        parser.add_argument("--plot", help="also draw the error analysis per category, run against run, to this PNG")
        parser.add_argument("--mixed-formats", action="store_true",
                            help="compare runs generated with different prompt formats (refused otherwise)")
        args = parser.parse_args(argv[1:])
        run_compare(args.dirs, args.plot, args.mixed_formats)
        return
    if argv[:1] == ["prompts"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py prompts",
                                         description="Write the prompts generation would feed the model (JSONL: id, "
                                                     "category, prompt_format, prompt, num_tokens); loads no weights.")
        add_prompt_arguments(parser)
        parser.add_argument("--output", required=True, help="the JSONL file to write")
        run_prompts(parser.parse_args(argv[1:]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(parser)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--decoder", choices=sorted(BFCL_DECODERS), help="default: qwen in fc mode, python in prompt mode")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the longest BFCL answer is ~1,300 characters of tool calls")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results of these categories")
    parser.add_argument("--no-score", action="store_true", help="generate only")
    parser.add_argument("--model-card", help="README.md to write the results into (model-index metadata + table); "
                        "model_card.py writes the rest of the card")
    args = parser.parse_args(argv)
    args.decoder = args.decoder or ("qwen" if args.mode == "fc" else "python")
    run_generation(args)


if __name__ == "__main__":
    main()
