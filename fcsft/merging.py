"""Merge LoRA adapters: one into its base model (a full checkpoint for serving and eval_bfcl.py), or several into one
with PEFT's `add_weighted_adapter` (the plan's "ensemble methods: merge multiple LoRA adapters").
merge_adapters.py is its command line.

Inputs are adapter folders (adapter_config.json + adapter_model.safetensors, as train_sft.py writes for LoRA/QLoRA
recipes, final or checkpoint-N). The base model is the one the adapters name (`base_model_name_or_path`), or
--base-model. The output is a full Hugging Face checkpoint that plain transformers loads, or with --adapter-only one
adapter; either way with the tokenizer and a README.md model card recording the inputs, weights, method and settings.

Methods (PEFT 0.21 `add_weighted_adapter`; `weights` scale each adapter's update, whose own scale is alpha/r):
  linear        A' = sum sqrt(w_i s_i) A_i, B' = sum sqrt(w_i s_i) B_i: cheap, but B'A' mixes the adapters' factors
                (cross terms), so it is not the weighted sum of the updates; same rank for every adapter
  cat           A', B' = the A_i (scaled by w_i s_i) and B_i stacked: exactly sum w_i s_i B_i A_i, rank = sum of ranks
  svd           the exact weighted sum of the updates, truncated by SVD to --svd-rank (default: the largest rank)
  ties          TIES-merging of the A and B factors: keep the top --density by magnitude, elect signs, average
  dare_linear   DARE: drop factor entries with probability 1 - density, rescale, then linear (random: --seed)
  dare_ties     DARE, then TIES sign election (random: --seed)
A QLoRA adapter is merged into the unquantized base (loaded in --dtype): the merged weights are not the 4-bit ones it
trained against, which usually costs little; score the merged model to be sure.
"""

import json
from pathlib import Path

from fcsft.errors import UserError
from fcsft.model_card import front_matter

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")  # PEFT combines their factors entry by entry
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def adapter_config(folder):
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not an adapter folder (no adapter_config.json)")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are merged")
    return config


def check_inputs(args, configs):
    """Everything that can be wrong without loading a model, with the file or flag that is wrong."""
    bases = {c.get("base_model_name_or_path") for c in configs}
    if not args.base_model and len(bases) != 1:
        names = ", ".join(f"{a}: {c.get('base_model_name_or_path')}" for a, c in zip(args.adapters, configs))
        raise UserError(f"the adapters name different base models ({names}); pass --base-model if they "
                 "really share one")
    if len(args.weights) != len(args.adapters):
        raise UserError(f"{len(args.weights)} --weights for {len(args.adapters)} adapters")
    if len(args.adapters) > 1:
        ranks = [c["r"] for c in configs]
        if args.method in SAME_RANK_METHODS and len(set(ranks)) > 1:
            raise UserError(f"--method {args.method} needs adapters of one rank, got r={ranks} for "
                     f"{args.adapters}; use cat or svd")
        if args.method in DENSITY_METHODS and not (args.density and 0 < args.density <= 1):
            raise UserError(f"--method {args.method} needs --density in (0, 1] (the share of entries kept)")
    if args.adapter_only and len(args.adapters) == 1 and args.weights == [1.0]:
        raise UserError("--adapter-only with one adapter and weight 1 would copy it; drop --adapter-only "
                 "to merge it into the base")


def load_base_with_adapters(adapters, base_model=None, **load_kwargs):
    """(PeftModel, base): the base model (from_pretrained with `load_kwargs`: dtype, device_map, ...) with every adapter
    loaded as input_0, input_1, ...; the first is active. eval_bfcl.py scores an adapter folder through this."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [f"input_{i}" for i in range(len(adapters))]
    base = base_model or adapter_config(adapters[0])["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, **load_kwargs)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for folder, name in zip(adapters[1:], names[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    return model, base


def tokenizer_source(adapters, base):
    """train_sft.py saves the tokenizer (and chat template) next to the adapter; the base's is the fallback."""
    return next((str(a) for a in adapters if any((Path(a) / f).is_file() for f in TOKENIZER_FILES)), base)


def targets(config):
    modules = config.get("target_modules") or []
    return [modules] if isinstance(modules, str) else modules


def merge_card(args, configs, base):
    single = len(args.adapters) == 1
    lines = [front_matter(base, [], args.adapter_only, ["lora", "merge", "trl"]),
             f"# {Path(args.output).name}", "",
             (f"`{args.adapters[0]}` merged into `{base}`: a full checkpoint that plain transformers loads."
              if single else
              f"{len(args.adapters)} LoRA adapters of `{base}` combined by PEFT's `add_weighted_adapter` "
              f"(`combination_type={args.method}`) into " +
              ("one adapter." if args.adapter_only else "one adapter, then merged into the base: a full checkpoint "
                                                        "that plain transformers loads.")), "",
             "| input adapter | weight | r | lora_alpha | update scale alpha/r | target modules |",
             "|---|---:|---:|---:|---:|---|"]
    for folder, weight, config in zip(args.adapters, args.weights, configs):
        lines.append(f"| `{folder}` | {weight:g} | {config['r']} | {config['lora_alpha']} | "
                     f"{config['lora_alpha'] / config['r']:g} | {', '.join(sorted(targets(config)))} |")
    method = None if single else args.method
    settings = {"method": method, "density": args.density if method in DENSITY_METHODS else None,
                "svd_rank": args.svd_rank if method == "svd" else None, "seed": args.seed if method else None,
                "dtype": args.dtype, "output": "adapter" if args.adapter_only else "merged checkpoint"}
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in settings.items() if value is not None]
    lines += ["", "Command: `python merge_adapters.py " + " ".join(args.argv) + "`", ""]
    return "\n".join(lines)


def merge(args):
    import torch
    from transformers import AutoTokenizer

    configs = [adapter_config(folder) for folder in args.adapters]
    check_inputs(args, configs)
    model, base = load_base_with_adapters(args.adapters, args.base_model, dtype=args.dtype)
    names = list(model.peft_config)
    if len(args.adapters) == 1 and args.weights == [1.0]:
        combined = names[0]
    else:
        torch.manual_seed(args.seed)  # DARE drops entries at random
        # "default" is the name PEFT saves without a sub-folder; the inputs are input_0, input_1, ...
        model.add_weighted_adapter(names, args.weights, adapter_name="default", combination_type=args.method,
                                   density=args.density if args.method in DENSITY_METHODS else None,
                                   svd_rank=args.svd_rank)
        combined = "default"
    model.set_adapter(combined)
    for name in names:
        if name != combined:
            model.delete_adapter(name)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.adapter_only:
        model.save_pretrained(output)
    else:
        model.merge_and_unload().save_pretrained(output)
    AutoTokenizer.from_pretrained(tokenizer_source(args.adapters, base)).save_pretrained(output)
    (output / "README.md").write_text(merge_card(args, configs, base))
    return output
