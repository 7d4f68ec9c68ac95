"""Generation for BFCL prompts: the prompt format (the official harness's text, or the model's chat template), model
and tokenizer loading (an adapter folder is merged into its base), and batched greedy generation with transformers
(one slice of the prompts per process under accelerate launch) or vLLM, appending result files as batches finish so
that an interrupted run resumes where it stopped.
"""

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

from fcsft.bfcl_data import (
    SCOPE_NOTE,
    append_jsonl,
    consolidate_results,
    is_multi_turn,
    load_datasets,
    rank_result_path,
    read_results,
    result_path,
    write_jsonl_atomic,
)
from fcsft.bfcl_multi_turn import (
    generate_multi_turn,
    harness_model_name,
    load_multi_turn_category,
    official_context_length,
)
from fcsft.bfcl_multi_turn import category_of as multi_turn_category_of
from fcsft.bfcl_prompts import BFCL_PROMPT_BUILDERS, bfcl_chat, bfcl_family, bfcl_prompt
from fcsft.errors import UserError
from fcsft.hub import check_model_source
from fcsft.metrics import device_name

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("bfcl", "chat_template")


def resolve_prompt_format(model_name, model_type, requested, mode):
    """{"prompt_format": what is used, "bfcl_family", "fallback": why not what was asked}. `bfcl` needs an official
    prompt builder for the model's family (bfcl_prompts.BFCL_PROMPT_BUILDERS); without one the model's chat
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
        raise UserError("the tokenizer has no chat template: --prompt-format chat_template renders prompts with it")
    prompts, checked = [], False
    for category, entry in work:
        messages, tools = bfcl_chat(entry, category, mode)
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        if tools and not checked:
            if tools[0]["function"]["name"] not in text:
                raise UserError("the chat template ignores `tools`: use --mode prompt (BFCL's prompt-mode system prompt)")
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
        from fcsft.merging import load_base_with_adapters

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


# Loaded once per process, so that single-turn and multi-turn generation of one run share the weights (and vLLM's
# engine, which holds most of the GPU memory and is not freed within a process).
_LOADED = {}


def transformers_model(args, state):
    import torch

    key = ("transformers", args.model, args.dtype, str(state.device))
    if key not in _LOADED:
        dtype = getattr(torch, model_dtype(args.dtype, state.device.type))
        _LOADED[key] = load_model(args.model, dtype=dtype, device_map={"": str(state.device)},
                                  trust_remote_code=args.trust_remote_code).eval()
    return _LOADED[key]


def vllm_engine(args, state):
    """vLLM's engine, with prefix caching: a multi-turn step's prompt extends the previous step's."""
    try:
        from vllm import LLM
    except ImportError:
        raise UserError("--backend vllm needs vllm installed (pip install vllm)")
    if state.num_processes > 1:
        raise UserError("--backend vllm runs as one process; use --tensor-parallel-size instead of accelerate launch")
    if is_adapter(args.model):
        raise UserError(f"--backend vllm: {args.model} is an adapter; merge it first (python merge_adapters.py {args.model} "
                 "--output MERGED) or use --backend transformers")
    key = ("vllm", args.model, args.dtype, args.tensor_parallel_size)
    if key not in _LOADED:
        _LOADED[key] = LLM(model=args.model, dtype="auto" if args.dtype == "auto" else args.dtype, seed=0,
                           tensor_parallel_size=args.tensor_parallel_size, trust_remote_code=args.trust_remote_code,
                           enable_prefix_caching=True)
    return _LOADED[key]


def generate_with_transformers(args, state, tokenizer, token_ids, write_batch):
    import torch
    from tqdm.auto import tqdm
    device = state.device
    model = transformers_model(args, state)
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
    llm = vllm_engine(args, state)
    from tqdm.auto import tqdm
    from vllm import SamplingParams

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


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn: the official loop (bfcl_multi_turn.generate_multi_turn), every step one batched generation
# ---------------------------------------------------------------------------------------------------------------


def multi_turn_unsupported(prompt_format, mode):
    """Why the official multi-turn loop cannot run for this model, or None. The loop builds the official Qwen FC
    prompt (QwenFCHandler) at every step; other families' multi-turn prompts are not implemented."""
    if prompt_format["prompt_format"] == "bfcl" and prompt_format["bfcl_family"] == "qwen" and mode == "fc":
        return None
    return ("multi-turn generation follows the official loop with the Qwen FC prompt: it needs --mode fc, "
            f"--prompt-format bfcl and a Qwen-family model (this run: --mode {mode}, prompt format "
            f"{prompt_format['prompt_format']}, family {prompt_format['bfcl_family'] or 'unknown'})")


class StepGenerator:
    """generate(prompts, budgets) -> texts for bfcl_multi_turn.generate_multi_turn: greedy, each prompt's output cut
    at its own token budget, special tokens skipped; counts what it generated."""

    def __init__(self, args, state, tokenizer):
        self.args, self.state, self.tokenizer = args, state, tokenizer
        self.generated_tokens = self.prompts = 0

    def __call__(self, prompts, budgets):
        token_ids = prompt_token_ids(self.tokenizer, prompts)
        texts = self._vllm(token_ids, budgets) if self.args.backend == "vllm" else self._transformers(token_ids, budgets)
        self.prompts += len(prompts)
        return texts

    def _transformers(self, token_ids, budgets):
        import torch

        model = transformers_model(self.args, self.state)
        texts = [None] * len(token_ids)
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))  # little padding per batch
        for start in range(0, len(order), self.args.batch_size):
            batch = order[start:start + self.args.batch_size]
            # greedy: a longer budget's first k tokens are what budget k generates
            config, eos_ids = greedy_generation_config(model, self.tokenizer, max(budgets[i] for i in batch))
            inputs = self.tokenizer.pad({"input_ids": [token_ids[i] for i in batch]}, return_tensors="pt")
            inputs = inputs.to(self.state.device)
            with torch.inference_mode():
                output = model.generate(**inputs, generation_config=config)
            rows = output[:, inputs["input_ids"].shape[1]:].tolist()
            for i, row in zip(batch, rows):
                (texts[i],), tokens = decode_generated(self.tokenizer, [row[:budgets[i]]], eos_ids)
                self.generated_tokens += tokens
        return texts

    def _vllm(self, token_ids, budgets):
        from vllm import SamplingParams

        llm = vllm_engine(self.args, self.state)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids],
                               [SamplingParams(temperature=0.0, max_tokens=b) for b in budgets], use_tqdm=False)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text for o in outputs]


def context_length_of(args, tokenizer):
    """The model's context length as the official handler takes it (an adapter: its base model's config)."""
    from transformers import AutoConfig

    model = args.model
    if is_adapter(model):
        model = json.loads((Path(model) / "adapter_config.json").read_text())["base_model_name_or_path"]
    return official_context_length(AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code), tokenizer)


def generate_multi_turn_missing(args, state, work, output_dir):
    """Run the official multi-turn loop on this rank's share of `work` [(category, prepared entry)], appending each
    entry's record (id, result, token counts, steps) to the result file as soon as the entry finishes. Returns
    (entries, steps, generated tokens) summed over ranks and the loop's wall time (slowest rank)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    mine = work[state.process_index::state.num_processes]
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    generate = StepGenerator(args, state, tokenizer)
    entries_done, start_time = 0, time.time()
    if mine:
        if args.backend == "transformers":
            transformers_model(args, state)  # loaded before the clock starts, as for single-turn
        else:
            vllm_engine(args, state)
        start_time = time.time()
        records = generate_multi_turn([entry for _, entry in mine], generate,
                                      lambda text: len(tokenizer.tokenize(text)), context_length_of(args, tokenizer),
                                      # the name the checker will use: the result folder's (multi_turn_model_name)
                                      model_name=harness_model_name(Path(output_dir).resolve().name),
                                      step_token_cap=args.multi_turn_step_tokens)
        for record in tqdm(records, total=len(mine), desc=f"multi-turn entries (rank {state.process_index})",
                           disable=not state.is_local_main_process):
            category = multi_turn_category_of(record["id"])
            path = result_path(output_dir, category) if state.num_processes == 1 else \
                rank_result_path(output_dir, category, state.process_index)
            append_jsonl(path, [record])
            entries_done += 1
    seconds = time.time() - start_time if mine else 0.0
    per_rank = gather_object([(entries_done, generate.prompts, generate.generated_tokens, seconds)])
    return tuple(sum(r[k] for r in per_rank) for k in range(3)) + (max(r[3] for r in per_rank),)


def multi_turn_stats(entries, steps, tokens, seconds, already_done, state):
    return {"entries_generated": entries, "entries_already_done": already_done, "steps": steps,
            "generated_tokens": tokens, "wall_time_s": round(seconds, 2),
            "prompts_per_s": round(steps / seconds, 3) if steps and seconds else None,
            "generated_tokens_per_s": round(tokens / seconds, 1) if steps and seconds else None,
            "device": f"{state.num_processes} x {device_name()}"}


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


def rank_result_paths(output_dir, category):
    return sorted(Path(output_dir).glob(f"BFCL_v4_{category}_result.rank*.jsonl"))


def generation_settings(args, prompt_format):
    """What decides the outputs; results generated under other settings (a prompt format included) are never
    resumed."""
    return {"model": args.model, "weights": weights_fingerprint(args.model), "mode": args.mode,
            "prompt_format": prompt_format["prompt_format"], "max_new_tokens": args.max_new_tokens,
            # the family changes the prompt only in the bfcl format
            "bfcl_family": prompt_format["bfcl_family"] if prompt_format["prompt_format"] == "bfcl" else None,
            "multi_turn_step_tokens": args.multi_turn_step_tokens}


def changed_settings(before, settings):
    """The settings that differ from an earlier run's; a setting the earlier run did not record yet is not a change
    (folders from before it existed still resume)."""
    return {k: (before[k], v) for k, v in settings.items() if k in before and before[k] != v}


def choose_multi_turn(args, categories, prompt_format, data_dir, is_main):
    """The categories to run: multi-turn ones dropped (with a warning) when the model's prompt has no official
    multi-turn loop here and they came with a group; refused when named. The log says which parts of the
    leaderboard's Overall are not run."""
    requested = [n for item in args.categories for n in item.split(",") if n]
    multi = [c for c in categories if is_multi_turn(c)]
    reason = multi_turn_unsupported(prompt_format, args.mode) if multi else None
    if reason:
        named = [n for n in requested if is_multi_turn(n) or n == "multi_turn"]
        if named:
            raise UserError(f"{', '.join(named)}: {reason}")
        if is_main:
            logger.warning(f"multi-turn categories not run: {reason}")
        categories = [c for c in categories if not is_multi_turn(c)]
    if is_main and "all" in requested and not args.data_dir:
        print(SCOPE_NOTE)
    return categories


def record_settings(args, state, stats_path, stats, settings, output_dir, categories, entries_by_category):
    """Refuse results of other settings; record the settings before generating (so a killed run is guarded too) and
    merge what an interrupted run left behind."""
    # A killed multi-process run leaves only per-rank files (merged at the next start): they count as results too
    existing = [path for c in categories for path in [result_path(output_dir, c), *rank_result_paths(output_dir, c)]
                if path.exists()]
    changed = changed_settings(stats.get("settings", {}), settings)
    if existing and changed and not args.overwrite:
        listed = ", ".join(f"{k}: {before} -> {now}" for k, (before, now) in changed.items())
        raise UserError(f"{output_dir} holds results generated with other settings ({listed}): pass --overwrite to "
                        "regenerate them, or use another --output-dir")
    state.wait_for_everyone()
    if state.is_main_process:
        if args.overwrite or "settings" not in stats or changed:
            stats = {**({} if args.overwrite else stats), "settings": settings}
            stats_path.write_text(json.dumps(stats, indent=2) + "\n")
        for category, entries in entries_by_category.items():
            if args.overwrite:
                for stale in output_dir.glob(f"BFCL_v4_{category}_result*"):
                    stale.unlink()
            consolidate_results(output_dir, category, entries)
    state.wait_for_everyone()
    return stats


def run_generation(args):
    """Generate the answers still missing in args.output_dir (every process its slice). Returns the data folder on the
    main process (None on the others), for scoring."""
    import torch
    from accelerate import PartialState

    # A multi-process launch without GPUs needs cpu=True for accelerate to set up gloo (MULTI_CPU) process groups.
    state = PartialState(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    data_dir, categories, datasets = load_datasets(args.data_dir, args.categories, args.limit, multi_turn=True)
    check_model_source(args.model, "--model")  # a mistyped path or an uncached hub id: one line, no folder made
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompt_format = model_prompt_format(args)
    if prompt_format["fallback"] and state.is_main_process:
        logger.warning(f"{prompt_format['fallback']}")
    categories = choose_multi_turn(args, categories, prompt_format, data_dir, state.is_main_process)
    multi_turn = {c: load_multi_turn_category(c, data_dir)[0][:args.limit or None] for c in categories if is_multi_turn(c)}
    entries_by_category = {**{c: entries for c, (entries, _) in datasets.items()}, **multi_turn}
    stats_path, settings = output_dir / "generation.json", generation_settings(args, prompt_format)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats = record_settings(args, state, stats_path, stats, settings, output_dir, categories, entries_by_category)
    done = {c: set(read_results(result_path(output_dir, c))) if result_path(output_dir, c).exists() else set()
            for c in categories}
    work = [(c, e) for c, (entries, _) in datasets.items() for e in entries if e["id"] not in done[c]]
    skipped = sum(len(entries) for entries, _ in datasets.values()) - len(work)
    multi_work = [(c, e) for c, entries in multi_turn.items() for e in entries if e["id"] not in done[c]]
    multi_skipped = sum(len(entries) for entries in multi_turn.values()) - len(multi_work)
    if state.is_main_process:
        if datasets:
            print(f"{len(work)} prompts to generate over {', '.join(datasets)} ({skipped} already in {output_dir})")
        if multi_turn:
            print(f"{len(multi_work)} multi-turn entries to run over {', '.join(multi_turn)} ({multi_skipped} already "
                  f"in {output_dir})")

    start_time = time.time()
    prompts_done, tokens_done, gen_time = (generate_missing(args, state, work, output_dir, prompt_format) if work
                                           else (0, 0, 0.0))
    multi = generate_multi_turn_missing(args, state, multi_work, output_dir) if multi_work else None
    if not state.is_main_process:
        return None
    for category, entries in entries_by_category.items():
        consolidate_results(output_dir, category, entries)
    if work or multi or "prompts_generated" not in stats:  # with nothing left to do, keep the stats of the run that generated
        single_turn = {
            "prompts_generated": prompts_done, "prompts_already_done": skipped, "generated_tokens": tokens_done,
            "wall_time_s": round(gen_time, 2),
            "prompts_per_s": round(prompts_done / gen_time, 3) if prompts_done else None,
            "generated_tokens_per_s": round(tokens_done / gen_time, 1) if prompts_done else None,
        }
        if not work and "prompts_generated" in stats:  # this run generated multi-turn only: keep single-turn's stats
            single_turn = {k: stats[k] for k in single_turn}
        stats = {
            "settings": settings, "model": args.model, "backend": args.backend, "mode": args.mode, "decoder": args.decoder,
            "prompt_format": prompt_format["prompt_format"], "prompt_format_requested": args.prompt_format,
            "bfcl_family": prompt_format["bfcl_family"], "prompt_format_fallback": prompt_format["fallback"],
            "data_dir": args.data_dir and str(data_dir.resolve()), "categories": categories, "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "dtype": model_dtype(args.dtype, state.device.type),
            "device": f"{state.num_processes} x {device_name()}", "num_processes": state.num_processes,
            **single_turn, "total_wall_time_s": round(time.time() - start_time, 2),
            "multi_turn": multi_turn_stats(*multi, multi_skipped, state) if multi else stats.get("multi_turn"),
        }
        stats_path.write_text(json.dumps(stats, indent=2) + "\n")
        if work:
            print(f"generated {prompts_done} prompts in {gen_time:.1f}s on {stats['device']} "
                  f"({stats['prompts_per_s']} prompts/s, {stats['generated_tokens_per_s']} generated tokens/s)")
        if multi:
            m = stats["multi_turn"]
            print(f"ran {m['entries_generated']} multi-turn entries in {m['wall_time_s']}s on {m['device']}: "
                  f"{m['steps']} steps ({m['prompts_per_s']} prompts/s), {m['generated_tokens_per_s']} generated tokens/s")
    return data_dir


def run_prompts(args):
    """Write the exact prompt text generation would feed the model, one JSON object per entry; no weights loaded."""
    _, categories, datasets = load_datasets(args.data_dir, args.categories, args.limit, multi_turn=True)
    skipped = [c for c in categories if is_multi_turn(c)]
    if skipped:
        print(f"not written: {', '.join(skipped)} (a multi-turn prompt depends on the model's earlier answers)")
    prompt_format = model_prompt_format(args)
    if prompt_format["fallback"]:
        logger.warning(f"{prompt_format['fallback']}")
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
