"""train_sft.py's recipe: a YAML file of ScriptArguments / SFTConfig / ModelConfig keys, command-line flags that
override it, and the checks that need neither data nor model (unknown keys, QLoRA, context parallelism, the BFCL
evaluation keys), so that a bad recipe fails in seconds with the key and the file named.
"""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from fcsft.bfcl_data import resolve_categories
from fcsft.chat_formats import NO_TOOL_FITS_REPLY
from fcsft.errors import UserError, did_you_mean
from fcsft.step_profile import parse_steps
from fcsft.training_data import FORMATS, SourceConfig, source_configs

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    dataset_name: str = field(default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.parquet file."})
    dataset_format: str = field(default="xlam", metadata={"help": f"One of {FORMATS} (docs/data_formats.md)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from the dataset."})
    datasets: list[SourceConfig] = field(default_factory=list, metadata={
        "help": "A mixture instead of dataset_name: TRL DatasetConfig keys (path, name, split, data_files, fraction) + format."})
    max_samples: int | None = field(default=None, metadata={"help": "Keep only N random rows of each dataset."})
    eval_split_size: float = field(default=0.0, metadata={"help": "Held-out eval rows: a fraction (<1) or a count."})
    max_malformed_fraction: float = field(default=0.01, metadata={"help": "Fail when more rows than this are malformed."})
    irrelevance_fraction: float = field(default=0.0, metadata={
        "help": "Share of single-call rows made 'no listed tool fits' (called tools removed, plain reply)."})
    irrelevance_reply: str = field(default=NO_TOOL_FITS_REPLY, metadata={
        "help": "The assistant's reply when no listed tool fits."})
    function_masking_fraction: float = field(default=0.0, metadata={
        "help": "Share of rows with tools whose function and parameter names become random identifiers (all turns)."})
    extra_tools: int = field(default=0, metadata={"help": "Tools from other rows added to each single-call row's tool list."})
    curriculum: bool = field(default=False, metadata={"help": "Simple rows first, complex last (sequential sampler)."})
    decontaminate: bool = field(default=True, metadata={"help": "Drop rows whose request matches a BFCL v4 test question."})
    decontamination_data_dir: str | None = field(default=None, metadata={
        "help": "BFCL_v4_*.json to decontaminate against (default: the installed bfcl-eval's)."})
    show_examples: int = field(default=0, metadata={"help": "Print N rendered examples with the trained span marked, then exit."})
    export_data: str | None = field(default=None, metadata={
        "help": "Write the training rows (after conversion and the data recipe) to this .jsonl, print the counts, exit: "
                "no model is loaded."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (WANDB_PROJECT)."})
    epoch_checkpoints: bool = field(default=False, metadata={"help": "Save a HF checkpoint per epoch in output_dir/checkpoints/epN."})
    hub_push_epochs: str | None = field(default=None, metadata={"help": "Push each epoch: 'branch', 'repo' or 'both'."})
    save_final_model: bool = field(default=True, metadata={"help": "Gather and save the final model (benchmarks turn it off)."})
    bfcl_eval_dir: str | None = field(default=None, metadata={"help": "BFCL-format split (BFCL_v4_<category>.json + possible_answer/) answered and scored at every evaluation: eval_bfcl/* metrics."})
    bfcl_eval_categories: str = field(default="all", metadata={"help": "Comma-separated categories or groups of bfcl_eval_dir (eval_bfcl.py --categories)."})
    bfcl_eval_limit: int | None = field(default=None, metadata={"help": "Only the first N entries of each category."})
    bfcl_eval_prompt_format: str = field(default="bfcl", metadata={"help": "bfcl (the official harness's prompts) or chat_template (eval_bfcl.py --prompt-format)."})
    bfcl_eval_max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per answer at most."})
    bfcl_eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call on each rank."})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "Stop after N evaluations without improving metric_for_best_model (EarlyStoppingCallback)."})
    early_stopping_threshold: float = field(default=0.0, metadata={"help": "How much metric_for_best_model must improve to count."})
    profile_steps: str | None = field(default=None, metadata={"help": "Record a torch.profiler trace of optimizer steps A-B "
                                                                      "into output_dir/profile and print where their time went."})


# ----------------------------------------------------------------------------------------------------------------
# Recipe parsing: a positional YAML path, flags override it, unknown keys are errors that name key and file.
# ----------------------------------------------------------------------------------------------------------------


def unknown_keys(parser, recipe, config, argv):
    """Problems for the recipe keys and flags the parser does not know, and the unknown names. Checked before any
    dataclass is built: building SFTConfig validates bf16 against the hardware, and that error must not hide a typo."""
    dests = {a.dest for a in parser._actions}
    flags = {opt for a in parser._actions for opt in a.option_strings}
    keys = [key for key in config if key not in dests and key != "env"]  # `env` is TRL's: variables set from the recipe
    given = [item.split("=")[0] for item in argv if item.startswith("--")]
    bad_flags = [flag for flag in given if flag not in flags]  # exact names only: the parser takes no abbreviations
    problems = [f"unknown key '{key}' in {recipe}" for key in keys] + [f"unknown command-line flag '{f}'" for f in bad_flags]
    return problems, keys + [flag[2:] for flag in bad_flags]


def parse_recipe(argv):
    """(script_args, training_args, model_args) from `RECIPE.yaml [--key value ...]`, checked before anything loads."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig), allow_abbrev=False)
    recipe, config, argv = read_recipe(argv)
    refuse_token_arguments(recipe, config, argv)
    check_value_types(parser, recipe, config)
    check_value_types(parser, "the command line", flag_values(argv))
    problems, unknown = unknown_keys(parser, recipe, config, argv)
    if problems:
        raise UserError("; ".join(problems) + did_you_mean(unknown, {a.dest for a in parser._actions}))
    argv = ["--config", recipe, *argv] if recipe else argv
    # QLoRA's check needs ModelConfig alone; it goes before SFTConfig is built, which validates bf16 against the
    # hardware and would stop a QLoRA recipe on a machine without a GPU for the wrong reason.
    model_only = TrlParser((ModelConfig,)).parse_args_and_config(list(argv), return_remaining_strings=True)[0]
    problem = quantization_problem(model_only, recipe, **launch_environment())
    if problem:
        raise UserError(problem)
    from fcsft.distributed import check_gpu_launch

    check_gpu_launch()  # a GPU accelerate config without a GPU: one line, before SFTConfig's bf16 check on every rank
    script_args, training_args, model_args = build_arguments(parser, argv, recipe, config)
    if script_args.datasets and any(a.split("=")[0] == "--dataset_name" for a in argv):
        logger.warning("--dataset_name %s replaces the datasets mixture of %s", script_args.dataset_name, recipe)
        script_args.datasets = []  # flags override the recipe, the data source included
    check_recipe(script_args, training_args, model_args, recipe)
    script_args.recipe = recipe
    return script_args, training_args, model_args


def read_recipe(argv):
    """(recipe path or None, its keys, the remaining flags)."""
    import yaml

    if not argv or argv[0].startswith("-"):
        return None, {}, argv
    recipe, argv = argv[0], argv[1:]
    if not Path(recipe).is_file():
        raise UserError(f"recipe file not found: {recipe}")
    try:
        config = yaml.safe_load(Path(recipe).read_text()) or {}
    except yaml.YAMLError as err:  # its message gives line and column
        raise UserError(f"{recipe} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise UserError(f"{recipe} must be a YAML mapping of keys to values")
    return recipe, config, argv


def refuse_token_arguments(recipe, config, argv):
    """A token given as hub_token is refused, not scrubbed: on a command line it is in `ps`, the shell history and a
    sweep's logs, and transformers saves it into every checkpoint's training_args.bin, where no scrubbing reaches.
    HF_TOKEN is the one route (the trainer's push and fcsft/hub.py both read it)."""
    from fcsft.hub import extra_secrets

    flags = [item for item in argv if item.split("=")[0] == "--hub_token"]
    if not config.get("hub_token") and not flags:
        return
    given = config.get("hub_token") or (flags[0].split("=", 1)[1] if "=" in flags[0] else
                                        argv[argv.index(flags[0]) + 1] if argv.index(flags[0]) + 1 < len(argv) else None)
    if given:
        extra_secrets.add(str(given))
    where = f"hub_token in {recipe}" if config.get("hub_token") else "--hub_token on the command line"
    raise UserError(f"{where}: a token given there would be written into run_summary.json and every checkpoint's "
                    "training_args.bin; remove it and `export HF_TOKEN=hf_...` instead (pushes read it from there)")


def flag_values(argv):
    """{key: value} of `--key value` and `--key=value` flags (a flag without a value is left out)."""
    values = {}
    for index, item in enumerate(argv):
        if item.startswith("--"):
            key, _, value = item[2:].partition("=")
            if not value and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                value = argv[index + 1]
            if value:
                values[key] = value
    return values


def check_value_types(parser, recipe, config):
    """A recipe value the parser cannot convert (learning_rate: "fast") named with its key and file, instead of the
    parser's whole usage text."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in config.items():
        action = actions.get(key)
        convert = getattr(action, "type", None)
        if convert not in (int, float) or value is None or isinstance(value, bool):
            continue
        try:
            convert(value)
        except (TypeError, ValueError):
            raise UserError(f"{recipe}: {key}: {value!r} is not a number ({convert.__name__})") from None


def build_arguments(parser, argv, recipe, config):
    """The three dataclasses; SFTConfig checks bf16 against the hardware, which gets a message that names the key."""
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as err:
        if "bf16" not in str(err):
            raise
        where = f"`bf16: true` in {recipe}" if "bf16" in config else f"bf16 is on (TRL's default; {recipe} does not set it)"
        raise UserError(f"{where}, but this machine has no bf16 support: set `bf16: false` "
                        "(and `fp16: true` on a GPU without bf16)") from None


def check_recipe(script_args, training_args, model_args, recipe):
    """What the parser cannot see: the data sources, key combinations, evaluation, context parallelism, profiling."""
    source_configs(script_args, recipe)  # dataset keys are checked before any data or model is loaded
    check_trainable_values(training_args, recipe)
    reorders = [key for key in ("packing", "shuffle_dataset") if getattr(training_args, key)]
    if script_args.curriculum and reorders:  # TRL shuffles, or packs by length, after our ordering
        raise UserError(f"{recipe}: curriculum orders the rows simple to complex, but {' and '.join(reorders)} "
                        "reorders them: set it to false, or drop curriculum")
    if not model_args.model_name_or_path:
        raise UserError(f"the recipe {recipe} must set model_name_or_path")
    check_evaluation_keys(script_args, training_args, recipe)
    problem = context_parallel_problem(training_args, model_args, recipe,
                                       int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")))
    if problem:
        raise UserError(problem)
    if script_args.profile_steps is not None:
        try:
            parse_steps(script_args.profile_steps)
        except UserError as err:
            raise UserError(f"{recipe}: {err}") from None


def check_trainable_values(training_args, recipe):
    """Values with which nothing trains (or the trainer fails after the model loads), refused before loading: a run
    with num_train_epochs: -1 would otherwise train 0 steps and save the untrained model as its result."""
    args, problems = training_args, []
    if args.max_steps is not None and args.max_steps <= 0 and args.num_train_epochs <= 0:
        problems.append(f"num_train_epochs is {args.num_train_epochs:g}: set it above 0 (or max_steps above 0)")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            problems.append(f"{key} is {getattr(args, key)}: it must be at least 1")
    if args.learning_rate < 0:
        problems.append(f"learning_rate is {args.learning_rate:g}: it must not be negative")
    if args.max_length is not None and args.max_length < 1:
        problems.append(f"max_length is {args.max_length}: it must be at least 1 (or null for no limit)")
    if args.eval_strategy != "no" and args.per_device_eval_batch_size < 1:
        problems.append(f"per_device_eval_batch_size is {args.per_device_eval_batch_size}: it must be at least 1")
    if problems:
        raise UserError(f"{recipe}: " + "; ".join(problems))


def check_evaluation_keys(script_args, training_args, recipe):
    """The BFCL eval and early stopping ride on the Trainer's evaluations: say what is missing before any loading."""
    problems = []
    bfcl_metric = (training_args.metric_for_best_model or "").removeprefix("eval_").startswith("bfcl/")
    if script_args.bfcl_eval_dir:
        if not Path(script_args.bfcl_eval_dir).is_dir():
            problems.append(f"bfcl_eval_dir {script_args.bfcl_eval_dir} is not a folder")
        else:
            try:
                resolve_categories(script_args.bfcl_eval_categories.split(","), script_args.bfcl_eval_dir,
                                   multi_turn=False)
            except UserError as err:  # its message names the category and what the folder has
                problems.append(f"bfcl_eval_categories: {err}")
        if script_args.bfcl_eval_prompt_format not in ("bfcl", "chat_template"):
            problems.append(f"bfcl_eval_prompt_format '{script_args.bfcl_eval_prompt_format}' is not bfcl or chat_template")
        if training_args.eval_strategy == "no":
            problems.append("bfcl_eval_dir is answered at every evaluation: set eval_strategy (steps or epoch) and eval_steps")
        if not script_args.eval_split_size:
            problems.append("bfcl_eval_dir needs the Trainer to evaluate, and the Trainer evaluates only with an eval "
                            "dataset: set eval_split_size (e.g. 200)")
    elif bfcl_metric:
        problems.append(f"metric_for_best_model {training_args.metric_for_best_model} needs bfcl_eval_dir")
    if script_args.early_stopping_patience is not None and not training_args.metric_for_best_model:
        problems.append("early_stopping_patience needs metric_for_best_model (e.g. eval_bfcl/overall)")
    if problems:
        raise UserError(f"{recipe}: " + "; ".join(problems))


def recipe_keys():
    """Every key a recipe (or a command-line flag) may set."""
    from trl import ModelConfig, SFTConfig

    return {f.name for args in (ScriptArguments, SFTConfig, ModelConfig) for f in dataclasses.fields(args)}


def run_settings(script_args, training_args, model_args):
    """Every argument of the run, JSON-safe: what `sweep.py report` compares between runs."""
    values = {**dataclasses.asdict(script_args), **dataclasses.asdict(model_args), **training_args.to_dict()}
    return json.loads(json.dumps(values, default=str))


# ----------------------------------------------------------------------------------------------------------------
# Launch checks that need neither data nor model: QLoRA and context parallelism fail here in seconds, with the key.
# ----------------------------------------------------------------------------------------------------------------

MIXED_PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's mixed_precision -> compute dtype


def launch_environment():
    """What the QLoRA check depends on: accelerate launch's environment, bitsandbytes and a CUDA device."""
    import importlib.util

    import torch

    return {"fsdp": os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
            "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
            "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
            "cuda_available": torch.cuda.is_available()}


def quantization_problem(model_args, recipe, fsdp, mixed_precision, bitsandbytes_installed, cuda_available):
    """Why the recipe's quantized base (QLoRA) cannot train in this launch, or None.

    Under FSDP2 the 4-bit weights must be stored (`bnb_4bit_quant_storage`) in the compute dtype. With the default
    uint8, accelerate 1.15 leaves them out of sharding (a whole copy on every GPU). With another float dtype, FSDP2's
    mixed-precision policy casts the packed 4-bit bytes to the compute dtype as if they were numbers, i.e. garbage
    weights: transformers 5.23 aligns that policy with the storage dtype (update_fsdp_plugin_peft) only for FSDP1,
    where the optimizer is created late; for FSDP2 the accelerate config's mixed_precision is used as is."""
    key = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit" if model_args.load_in_8bit else None
    if key is None:
        return None
    if not bitsandbytes_installed:
        return f"{key}: true in {recipe} needs bitsandbytes, which is not installed (pip install -r requirements-gpu.txt)"
    if not cuda_available:
        return f"{key}: true in {recipe} needs a CUDA GPU for bitsandbytes' quantized weights, and none is visible"
    if not model_args.use_peft:
        return f"{key}: true in {recipe} freezes a quantized base, so only adapters can train: set use_peft: true"
    if not fsdp:
        return None
    if model_args.load_in_8bit:
        return (f"load_in_8bit: true in {recipe}: FSDP cannot shard 8-bit weights; use load_in_4bit with "
                "bnb_4bit_quant_storage, or a DDP accelerate config")
    storage = model_args.bnb_4bit_quant_storage or "uint8"
    compute = MIXED_PRECISION_DTYPES.get(mixed_precision, model_args.dtype)
    if storage == compute:
        return None
    why = ("FSDP2 cannot shard 4-bit weights packed in an integer dtype (accelerate keeps a whole copy on every GPU)"
           if storage in ("uint8", "int8") else
           f"FSDP2 would cast the packed 4-bit bytes from {storage} to the compute dtype {compute} as numbers (garbage "
           "weights)")
    return (f"bnb_4bit_quant_storage: {storage} in {recipe} under FSDP: {why}; set bnb_4bit_quant_storage: {compute} "
            f"(the compute dtype: mixed_precision {mixed_precision}, dtype {model_args.dtype})")


def context_parallel_problem(training_args, model_args, recipe, cp_size):
    """Why the recipe cannot run with context parallelism (parallelism_config_cp_size > 1 in the accelerate config).

    transformers 5.23 / accelerate 1.15 / torch 2.13 shard each sequence over the cp ranks with torch's context_parallel:
    SDPA only (its ring attention replaces the CUDA SDPA kernels; no FlashAttention, no CPU), the attention mask is
    dropped for plain causal attention (so no packing: TRL refuses it, rows would attend across each other), and the
    head-tail load balancer cuts every sequence into 2 x cp_size equal chunks."""
    if cp_size <= 1:
        return None
    if training_args.packing or training_args.padding_free:
        key = "packing" if training_args.packing else "padding_free"
        return (f"{key}: true in {recipe} cannot run with context parallelism (cp_size {cp_size}): it drops the "
                "attention mask, so packed rows would attend to each other; set packing: false, padding_free: false")
    if model_args.attn_implementation != "sdpa":
        return (f"attn_implementation: {model_args.attn_implementation} in {recipe}: context parallelism (cp_size "
                f"{cp_size}) supports only sdpa")
    if not training_args.pad_to_multiple_of or training_args.pad_to_multiple_of % (2 * cp_size):
        return (f"pad_to_multiple_of: {training_args.pad_to_multiple_of} in {recipe}: context parallelism splits each "
                f"sequence into 2 x cp_size = {2 * cp_size} equal chunks; set it to a multiple of {2 * cp_size}")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Settings that follow from the recipe and the launch
# ----------------------------------------------------------------------------------------------------------------


def settle_launch_settings(script_args, training_args):
    """Adjust what the launch decides: W&B offline without an account, activation checkpointing asked of FSDP and
    of the recipe at once (transformers refuses both), a sequential sampler for a curriculum."""
    if "wandb" in (training_args.report_to or []):
        if script_args.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", script_args.wandb_project)
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"  # no account needed; `wandb sync` uploads later
            logger.warning("wandb: no WANDB_API_KEY, logging offline to %s/wandb", os.environ.get("WANDB_DIR", "."))
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false") == "true" and training_args.activation_checkpointing:
        logger.warning("activation checkpointing comes from the FSDP config; turning off the recipe's gradient_checkpointing")
        training_args.activation_checkpointing = training_args.gradient_checkpointing = False
    if script_args.curriculum and training_args.train_sampling_strategy != "sequential":
        logger.warning("curriculum: train_sampling_strategy %s -> sequential, so the simple-to-complex order is kept",
                       training_args.train_sampling_strategy)
        training_args.train_sampling_strategy = "sequential"


def model_init_kwargs(model_args, training_args):
    """How the trainer loads the model from the recipe's ModelConfig, as in TRL's sft.py."""
    from trl import get_quantization_config

    kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
              "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
              **(training_args.model_init_kwargs or {})}
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return kwargs
