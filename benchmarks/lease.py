"""The helper behind benchmarks/lease.sh: one GPU lease's stages, their checks, and the report (benchmarks/LEASE.md).

    python benchmarks/lease.py env | install --wheelhouse W | prep --model M ... | train-check | bench -- BENCH_ARGS
    python benchmarks/lease.py eval-check | test-record | stage NAME STATUS SECONDS | pending NAME | report
    python benchmarks/lease.py check-carry wheelhouse [runs/lease-in]                 # here, before a device call
    python benchmarks/lease.py collect FILES_AT [--dest benchmarks/h200-qwen2.5-3b]   # here, after the lease

State lives in $LEASE_STATE (default runs/lease): lease.json (every stage's status, timing and results) and the runs'
files. Each stage's raw result is copied into $LEASE_OUT ($OUT on the device machine) the moment it exists, under the
names in OUT_FILES (at most 8 files come back from a device call). Every number in the report is recomputed from those
raw files, so `collect` gives the same report here from whatever a cut-short call returned.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `import fcsft` from a checkout; the scripts are run as commands, never imported

# fcsft.bench (torch, transformers) is imported where it is used: the bookkeeping commands run several times per
# stage and must start in a blink, before the install stage too
from fcsft import memory_estimate  # noqa: E402
from fcsft.metrics import (  # noqa: E402
    GPUS,
    GiB,
    format_number,
    is_cpu,
    measured_cpu_peak_tflops,
    mfu_percent,
    peak_memory_gib,
    peak_tflops_of,
    real_token_throughput,
)

BFCL_SINGLE_TURN_PROMPTS = 3641
# BFCL v4 single-turn categories (eval_bfcl.py's `all`) and their sizes (REFERENCE.md): 3,641 prompts
BFCL_CATEGORIES = {"simple_python": 400, "simple_java": 100, "simple_javascript": 50, "multiple": 200, "parallel": 200,
                   "parallel_multiple": 200, "irrelevance": 240, "live_simple": 258, "live_multiple": 1053,
                   "live_parallel": 16, "live_parallel_multiple": 24, "live_irrelevance": 884, "live_relevance": 16}
TARGETS = {"mfu_percent": 45.0, "speedup_vs_trl_defaults": 2.0, "estimate_error_percent": 10.0, "eval_seconds": 180.0}
# What comes back from a device call, named as it lands in $OUT (what `collect` reads)
OUT_FILES = {"state": "lease.json", "log": "lease.log", "train": "train_summary.json", "bench": "bench_runs.json",
             "eval": "eval_generation.json", "test-gpu": "test_gpu.log"}
STAGE_FILES = {"train": "train/run_summary.json", "bench": "bench/runs.json", "eval": "eval/generation.json",
               "test-gpu": "test_gpu.log"}  # under $LEASE_STATE
PACKAGES = ["torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "safetensors", "huggingface_hub",
            "liger-kernel", "bitsandbytes", "bfcl-eval", "triton", "pyarrow", "fsspec", "numpy", "pandas", "dill",
            "multiprocess", "xxhash", "regex", "pytest"]
CORE_IMPORTS = ["transformers", "trl", "accelerate", "peft", "datasets", "bfcl_eval"]
GPU_IMPORTS = ["liger_kernel", "bitsandbytes"]  # GPU extras: a failure is fatal only where CUDA is present
# The "largest batch that fits" rows (padding-free, flex attention; fcsft.bench.GPU1_SETTINGS), largest first, without
# and with activation checkpointing: the lease runs the first whose estimate times SAFETY fits the device (an H200
# fits the first of each). Checkpointed rows stop at 64: beyond ~28k tokens per micro-batch the step only gets
# longer, not faster.
BATCHES_NO_CHECKPOINTING = ["padding_free_flex_batch_32", "padding_free_flex", "padding_free_flex_batch_4"]
BATCHES_CHECKPOINTING = ["checkpointing_batch_64", "checkpointing_batch_32", "checkpointing_batch_16"]
SAFETY = 1.2


def state_dir():
    return Path(os.environ.get("LEASE_STATE", REPO / "runs" / "lease"))


def out_dir():
    out = os.environ.get("LEASE_OUT") or os.environ.get("OUT")
    return Path(out) if out else None


# ----------------------------------------------------------------------------------------------------------------
# State: lease.json, published to $OUT after every change
# ----------------------------------------------------------------------------------------------------------------


def read_state(path=None):
    path = Path(path) if path else state_dir() / "lease.json"
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def write_state(state):
    path = state_dir() / "lease.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    publish(path, OUT_FILES["state"])


def publish(path, name):
    """Copy a result into $OUT under `name`, atomically (a call cut short returns either the old or the new file)."""
    out = out_dir()
    if out is None or not Path(path).is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, out / name)
    return True


def update(key, value):
    state = read_state()
    state[key] = value
    write_state(state)


# ----------------------------------------------------------------------------------------------------------------
# Stage bookkeeping (called by lease.sh)
# ----------------------------------------------------------------------------------------------------------------


def cmd_start(args):
    """A new call: seed the state from a carried earlier call (runs/lease-in) on a fresh machine, and note the call."""
    incoming = Path(args.incoming)
    state_path = state_dir() / "lease.json"
    if not state_path.is_file() and (incoming / OUT_FILES["state"]).is_file():
        state_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(incoming / OUT_FILES["state"], state_path)
        print(f"lease: resuming the stages recorded in {incoming / OUT_FILES['state']}")
    runs = state_dir() / STAGE_FILES["bench"]
    if not runs.is_file() and (incoming / OUT_FILES["bench"]).is_file():
        runs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(incoming / OUT_FILES["bench"], runs)  # bench_fsdp.py --resume keeps its finished rows
        print(f"lease: bench rows carried in from {incoming / OUT_FILES['bench']}")
    state = read_state()
    state.setdefault("calls", []).append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget,
                                          "device": args.device, "stages": args.stages, "cap_scale": args.cap_scale})
    state.setdefault("stages", {})
    write_state(state)


def cmd_pending(args):
    """Exit 0 when the stage still has to run (not recorded ok by this or a carried earlier call)."""
    status = read_state().get("stages", {}).get(args.name, {}).get("status")
    sys.exit(0 if status != "ok" else 1)


def cmd_stage(args):
    """Record a stage's status and time, and publish its raw result file if it has one."""
    state = read_state()
    state.setdefault("stages", {})[args.name] = {"status": args.status, "seconds": args.seconds,
                                                 "cap_s": args.cap, "call": len(state.get("calls", [])) or 1}
    write_state(state)
    if args.name in STAGE_FILES:
        publish(state_dir() / STAGE_FILES[args.name], OUT_FILES[args.name])
    print(f"== {args.name}: {args.status} ({args.seconds}s of {args.cap}s)", flush=True)


def cmd_get(args):
    value = read_state()
    for part in args.key.split("."):
        value = value[part]
    print(value)


# ----------------------------------------------------------------------------------------------------------------
# env and install
# ----------------------------------------------------------------------------------------------------------------


def installed_versions(names):
    import importlib.metadata as metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def matmul_tflops():
    """Median bf16 8192^3 matmul rate on random data (the ceiling METHOD.md asks to measure; MFU stays vs 989)."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return round(2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12, 1)


def cmd_env(args):
    import platform

    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "packages": installed_versions(PACKAGES)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / GiB, 2),
                    multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count(),
                    bf16_matmul_tflops=matmul_tflops())
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            info["nvidia_smi"] = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"],
                                                capture_output=True, text=True).stdout.strip()
    else:
        info["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    update("env", info)
    print(json.dumps(info, indent=1))


def wheel_name_version(filename):
    """(canonical project name, version) of a wheel file name (PEP 427: name-version-...whl, '_' for '-')."""
    name, version = Path(filename).name.split("-")[:2]
    return canonical(name), version


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def install_plan(wheels, installed):
    """[(wheel, action, why)]: install a carried wheel when its package is missing or at another version (the carried
    versions are the pins CI tests); keep it when the machine already has that version."""
    plan = []
    for wheel in sorted(wheels, key=lambda w: Path(w).name):
        name, version = wheel_name_version(wheel)
        have = installed.get(name)
        if have is None:
            plan.append((str(wheel), "install", "missing"))
        elif have != version:
            plan.append((str(wheel), "install", f"has {have}"))
        else:
            plan.append((str(wheel), "keep", f"has {have}"))
    return plan


def import_check(modules, env):
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n"
            "        mod = importlib.import_module(m); out[m] = getattr(mod, '__version__', 'ok')\n"
            "    except Exception as e:\n        out[m] = 'FAILED: ' + repr(e)[:300]\nprint(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env, cwd=REPO)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {m: f"FAILED: {proc.stderr[-300:]}" for m in modules}


def cmd_install(args):
    """The carried wheels into the machine's own Python (--no-deps, offline), else into a target folder on PYTHONPATH."""
    import torch

    wheelhouse = Path(args.wheelhouse)
    wheels = sorted(wheelhouse.glob("*.whl")) + sorted(wheelhouse.glob("gpu/*.whl"))
    installed = {canonical(k): v for k, v in installed_versions(
        [wheel_name_version(w)[0] for w in wheels]).items()}
    plan = install_plan(wheels, installed)
    for wheel, action, why in plan:
        print(f"install: {action:7} {Path(wheel).name} ({why})")
    chosen = [w for w, action, _ in plan if action == "install"]
    result = {"wheelhouse": str(wheelhouse), "plan": [{"wheel": Path(w).name, "action": a, "why": y} for w, a, y in plan],
              "target": None}
    env = dict(os.environ)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check"]
    if not wheels:
        result["error"] = f"no wheels in {wheelhouse}"
    elif chosen:
        started = time.perf_counter()
        proc = subprocess.run(pip + chosen, capture_output=True, text=True)
        if proc.returncode != 0:  # a read-only image Python: the same wheels into a folder on PYTHONPATH
            print(f"install: pip into {sys.prefix} failed ({proc.stderr.strip()[-300:]}); using {args.target}")
            proc = subprocess.run(pip + ["--upgrade", "--target", args.target] + chosen, capture_output=True, text=True)
            result["target"] = args.target
            env["PYTHONPATH"] = args.target + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            (state_dir() / "env.sh").write_text(f'export PYTHONPATH={args.target}${{PYTHONPATH:+:$PYTHONPATH}}\n')
        result.update(pip_returncode=proc.returncode, pip_stderr_tail=proc.stderr.strip()[-500:],
                      pip_seconds=round(time.perf_counter() - started, 1))
    result["imports"] = import_check(CORE_IMPORTS + GPU_IMPORTS, env)
    versions = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, json, sys\n"
                               "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n"
                               "        return None\nprint(json.dumps({n: v(n) for n in sys.argv[1:]}))", *PACKAGES],
                              capture_output=True, text=True, env=env, cwd=REPO)
    result["packages_after"] = json.loads(versions.stdout) if versions.returncode == 0 else None
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    # bfcl-eval is installed without its (unused, 6 GB) dependencies, on purpose: those lines are expected
    result["pip_check"] = [line for line in check.stdout.splitlines() if not line.startswith("bfcl-eval")]
    update("install", result)
    for module, version in result["imports"].items():
        print(f"install: import {module}: {version}")
    for line in result["pip_check"]:
        print(f"install: pip check: {line}")
    failed = [m for m, v in result["imports"].items()
              if str(v).startswith("FAILED") and (m in CORE_IMPORTS or torch.cuda.is_available())]
    if failed or result.get("error") or result.get("pip_returncode", 0) != 0:
        sys.exit(f"install: failed: {failed or result.get('error') or result.get('pip_stderr_tail')}")


# ----------------------------------------------------------------------------------------------------------------
# prep: tokenizer assets, the random-init model, xLAM-schema rows, the BFCL sample
# ----------------------------------------------------------------------------------------------------------------


def bfcl_data_dir():
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        sys.exit("prep: bfcl-eval is not installed (the install stage installs its wheel)")
    return Path(spec.submodule_search_locations[0]) / "data"


def read_json_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_bfcl_sample(source, dest, every):
    """Every `every`-th entry of each single-turn category (file order), with its answers: a fixed sample that keeps
    the categories' proportions, so its time per prompt extrapolates to all 3,641."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "possible_answer").mkdir(exist_ok=True)
    counts, full = {}, {}
    for category in BFCL_CATEGORIES:
        entries = read_json_lines(source / f"BFCL_v4_{category}.json")
        full[category] = len(entries)
        kept = entries[::every]
        ids = {e["id"] for e in kept}
        (dest / f"BFCL_v4_{category}.json").write_text("".join(json.dumps(e) + "\n" for e in kept))
        answers = source / "possible_answer" / f"BFCL_v4_{category}.json"
        if answers.is_file():
            rows = [a for a in read_json_lines(answers) if a["id"] in ids]
            (dest / "possible_answer" / f"BFCL_v4_{category}.json").write_text("".join(json.dumps(a) + "\n" for a in rows))
        counts[category] = len(kept)
    return counts, full


def cmd_prep(args):
    from fcsft import bench

    state = state_dir()
    assets = Path(args.assets)
    if not (assets / "tiny-qwen2" / "config.json").is_file():
        subprocess.run([sys.executable, "make_demo_assets.py", "--out", str(assets)], cwd=REPO, check=True)
    tokenizer = assets / "tiny-qwen2"
    if args.model == "tiny":
        model_dir = tokenizer
    else:  # where bench_fsdp.py --work-dir STATE/benchwork looks for it, so the bench reuses it
        models = state / "benchwork" / "models"
        model_dir = models / args.model
        if not (model_dir / "config.json").is_file():
            building = state / "benchwork" / "models-building"  # renamed when complete: a killed build is never reused
            shutil.rmtree(building, ignore_errors=True)
            started = time.perf_counter()
            bench.random_init_model_dir(args.model, tokenizer, building)
            models.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(building / args.model, model_dir)
            building.rmdir()
            print(f"prep: random-init {args.model} in {time.perf_counter() - started:.0f}s -> {model_dir}")
    rows = state / "xlam_rows.jsonl"
    if not rows.is_file() or sum(1 for _ in rows.open()) != args.rows:
        bench.write_xlam_rows(rows, args.rows, seed=0)  # bench_fsdp.py --rows N builds the same rows (seed 0)
    lengths, completions = bench.token_lengths(rows, tokenizer)
    data = bench.describe_lengths(lengths, completions)
    sample, full = write_bfcl_sample(bfcl_data_dir(), state / "bfcl_sample", args.eval_every)
    prep = {"model": args.model, "model_dir": str(model_dir), "tokenizer": str(tokenizer), "assets": str(assets),
            "rows_path": str(rows), "data": {**data, "lengths": lengths}, "bfcl_sample_every": args.eval_every,
            "bfcl_sample": sample, "bfcl_sample_prompts": sum(sample.values()), "bfcl_prompts": sum(full.values())}
    update("prep", prep)
    print(f"prep: model {model_dir}; {args.rows} rows, tokens per row mean {data['mean']}, max {data['max']}; "
          f"BFCL sample {prep['bfcl_sample_prompts']} of {prep['bfcl_prompts']} prompts (every {args.eval_every}th)")
    if prep["bfcl_prompts"] != BFCL_SINGLE_TURN_PROMPTS:
        print(f"prep: warning: the installed bfcl-eval has {prep['bfcl_prompts']} single-turn prompts, not "
              f"{BFCL_SINGLE_TURN_PROMPTS}")


# ----------------------------------------------------------------------------------------------------------------
# train: the README's main command, checked
# ----------------------------------------------------------------------------------------------------------------


def train_metrics(summary, data, peak_tflops, warmup_steps):
    """Throughput, MFU, peak memory (GiB) against fcsft.memory_estimate and the checks, from run_summary.json alone."""
    from fcsft import bench

    settings, config = summary["settings"], summary["model_config"]
    measured = real_token_throughput(summary, warmup_steps)
    peak_gib, what = peak_memory_gib(summary)
    reserved = [r.get("peak_reserved_gib") for r in summary["peak_memory_per_rank"]]
    accumulation = settings.get("gradient_accumulation_steps") or 1
    knobs = {"per_device_train_batch_size": settings["per_device_train_batch_size"], "max_length": settings["max_length"],
             "packing": bool(settings.get("packing")), "padding_free": bool(settings.get("padding_free")),
             "train_sampling_strategy": settings.get("train_sampling_strategy") or "random"}
    checkpointing = bool(settings.get("activation_checkpointing") or settings.get("gradient_checkpointing"))
    _, row_length = bench.worst_micro_batch(data["lengths"], knobs, summary["global_step"] * accumulation,
                                            summary["num_processes"])
    setup = memory_estimate.Setup(
        world_size=summary["num_processes"], strategy="full_shard", dtype=settings.get("dtype") or "float32",
        mixed_precision="bf16" if settings.get("bf16") else "no", activation_checkpointing=checkpointing,
        batch_size=knobs["per_device_train_batch_size"], seq_len=round(row_length),
        padding_free=knobs["padding_free"] or knobs["packing"], attention=settings.get("attn_implementation") or "sdpa",
        loss_fraction=data["assistant_token_fraction"], gradient_accumulation_steps=accumulation,
        device="cuda" if what == "max_memory_allocated" else "cpu")
    estimated_gib = memory_estimate.estimate(config, setup)["peak"] / GiB
    losses = [log["loss"] for log in summary["log_history"] if "loss" in log]
    sharding = summary.get("sharding", {})
    metrics = {
        "setting": "recipe (train_sft.py recipes/xlam.yaml)", "status": "ok", "batch_size": knobs["per_device_train_batch_size"],
        "gradient_accumulation_steps": accumulation, "max_length": knobs["max_length"], "activation_checkpointing": checkpointing,
        "sampler": knobs["train_sampling_strategy"], "attn_implementation": setup.attention, "steps": summary["global_step"],
        "warmup_steps_excluded": warmup_steps, **measured, "attention_span": summary["attention_span"],
        "peak_tflops": peak_tflops,
        "mfu_percent": mfu_percent(measured["real_tokens_per_second_per_device"], config, summary["attention_span"],
                                   peak_tflops),
        "peak_memory_gib": peak_gib, "peak_reserved_gib": max(reserved) if None not in reserved else None,
        "memory_measure": what, "estimated_peak_gib": estimated_gib,
        "estimate_error_percent": 100 * (estimated_gib - peak_gib) / peak_gib,
        "losses": losses, "train_seconds": summary.get("train_seconds"), "device": summary.get("device"),
        "sharding": {k: sharding.get(k) for k in ("parameter_dtypes", "compute_dtype", "dtensor_parameters", "parameters")},
    }
    expected_compute = "torch.bfloat16" if settings.get("bf16") else "torch.float32"
    metrics["checks"] = {
        "fsdp2": summary.get("distributed_type") == "DistributedType.FSDP" and summary.get("fsdp_version") == 2,
        "all_steps": summary["global_step"] == settings.get("max_steps"),
        "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
        "fp32_masters": sharding.get("parameter_dtypes") == ["torch.float32"],
        "compute_dtype": sharding.get("compute_dtype") == expected_compute,
    }
    return metrics


def train_peak_tflops(device):
    """Peak FLOP/s for the train stage's MFU: the datasheet on a GPU; on CPU the matmul rate of all this process's
    threads (the train stage is one process using every core)."""
    import torch

    return peak_tflops_of(device, measured_cpu_peak_tflops(threads=torch.get_num_threads()) if is_cpu(device) else None)


def load_checkpoint_check(folder, config):
    """The saved final model loads as a plain (non-DTensor) model of the right size and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                 device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    expected = memory_estimate.parameter_counts(memory_estimate.shape_of(config))["total"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "weather in Oslo?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(device)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return {"parameters": parameters, "expected_parameters": expected, "dtensors": sum(type(p).__name__ == "DTensor"
            for p in model.parameters()), "generated_tokens": generated.shape[1] - prompt["input_ids"].shape[1],
            "weights_gib": round(weights / GiB, 2), "seconds": round(time.perf_counter() - started, 1),
            "ok": parameters == expected and generated.shape[1] > prompt["input_ids"].shape[1]}


def cmd_train_check(args):
    state = read_state()
    folder = state_dir() / "train"
    summary = json.loads((folder / "run_summary.json").read_text())
    peak = train_peak_tflops(state.get("env", {}).get("device", ""))
    metrics = train_metrics(summary, state["prep"]["data"], peak, args.warmup_steps)
    if args.load:
        metrics["checkpoint"] = load_checkpoint_check(folder, summary["model_config"])
        metrics["checks"]["checkpoint_loads"] = metrics["checkpoint"]["ok"]
    update("train", metrics)
    print(f"train: {metrics['real_tokens_per_second_per_device']:.0f} real tokens/s, MFU "
          f"{fmt(metrics['mfu_percent'], 1)}%, peak {metrics['peak_memory_gib']:.2f} GiB (estimate "
          f"{metrics['estimated_peak_gib']:.2f}, {metrics['estimate_error_percent']:+.1f}%), loss "
          f"{metrics['losses'][0]:.3f} -> {metrics['losses'][-1]:.3f}; checks {metrics['checks']}")
    if not all(metrics["checks"].values()):
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------------
# bench: bench_fsdp.py's rows, with the largest batches that fit this device
# ----------------------------------------------------------------------------------------------------------------


def largest_that_fits(names, config, lengths, loss_fraction, device_gib):
    """(setting name, estimated peak GiB) of the first of `names` (fcsft.bench.GPU1_SETTINGS, largest first) whose
    fcsft.memory_estimate peak for this data x SAFETY fits device_gib; the last (smallest) when none does."""
    from fcsft import bench

    catalogue = {s.name: s for s in bench.GPU1_SETTINGS}
    for name in names:
        setting = catalogue[name]
        knobs = {**bench.REFERENCE_KNOBS, **setting.recipe}
        peak_gib = bench.estimate_run(config, knobs, setting.strategy, lengths, loss_fraction, 16, 1, True)["peak"] / GiB
        if peak_gib * SAFETY <= device_gib:
            return name, peak_gib
    return names[-1], peak_gib


def bench_settings(device_gib, data, config):
    """Setting names for this lease, in the order they run, and how the two sized rows were chosen."""
    sized = {}
    for key, names in (("no_checkpointing", BATCHES_NO_CHECKPOINTING), ("checkpointing", BATCHES_CHECKPOINTING)):
        name, peak_gib = largest_that_fits(names, config, data["lengths"], data["assistant_token_fraction"], device_gib)
        sized[key] = {"setting": name, "estimated_peak_gib": round(peak_gib, 1), "safety": SAFETY,
                      "device_gib": round(device_gib, 1)}
    # xlam_recipe last: the train stage is that row
    names = ["trl_defaults", sized["no_checkpointing"]["setting"], "liger", sized["checkpointing"]["setting"], "xlam_recipe"]
    return names, sized


def cmd_bench(args):
    """bench_fsdp.py (run as a command) with this lease's rows: TRL's defaults, checkpointing off/on at the largest
    batch that fits, Liger, the recipe's data settings."""
    import torch

    state = read_state()
    prep = state["prep"]
    if torch.cuda.is_available():
        device_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    else:  # the rehearsal sizes the rows for an H200, so that it runs the same names
        device_gib = GPUS["h200"]["usable_gib"]
    # the rehearsal's tiny model is sized as the GPU's 3B, so that it runs the same setting names
    config = memory_estimate.load_config("qwen2.5-3b" if prep["model"] == "tiny" else prep["model"])
    names, sized = bench_settings(device_gib, prep["data"], config)
    update("bench_plan", {"settings": names, "sized": sized})
    command = [sys.executable, "bench_fsdp.py", *args.bench_args, "--settings", ",".join(names)]
    print("bench: " + " ".join(command[1:]), flush=True)
    sys.exit(subprocess.run(command, cwd=REPO).returncode)


def bench_rows(runs):
    """One row per setting from bench_fsdp.py's runs.json: the median run if any succeeded, else the last attempt."""
    from fcsft import bench

    return [bench.median_run(attempts) for name, attempts in runs.items() if not name.startswith("_") and attempts]


# ----------------------------------------------------------------------------------------------------------------
# eval and test-gpu
# ----------------------------------------------------------------------------------------------------------------


def eval_metrics(generation, total_prompts=BFCL_SINGLE_TURN_PROMPTS):
    n, seconds = generation.get("prompts_generated") or 0, generation.get("wall_time_s") or 0.0
    per_prompt = seconds / n if n else None
    return {"prompts": n, "generation_seconds": seconds, "total_seconds": generation.get("total_wall_time_s"),
            "prompts_per_s": generation.get("prompts_per_s"), "generated_tokens_per_s": generation.get("generated_tokens_per_s"),
            "generated_tokens_per_prompt": round(generation["generated_tokens"] / n, 1) if n else None,
            "max_new_tokens": generation.get("max_new_tokens"), "batch_size": generation.get("batch_size"),
            "dtype": generation.get("dtype"), "device": generation.get("device"),
            "extrapolated_seconds": round(per_prompt * total_prompts, 1) if per_prompt else None,
            "extrapolated_to": total_prompts}


def cmd_eval_check(args):
    generation = json.loads((state_dir() / STAGE_FILES["eval"]).read_text())
    metrics = eval_metrics(generation)
    update("eval", metrics)
    print(f"eval: {metrics['prompts']} prompts in {metrics['generation_seconds']}s ({metrics['prompts_per_s']} prompts/s, "
          f"{metrics['generated_tokens_per_prompt']} tokens each): all {metrics['extrapolated_to']} in "
          f"{metrics['extrapolated_seconds']}s extrapolated")


PYTEST_CLOSING = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in ([\d.]+)s\b.*$")


def test_gpu_result(log_text):
    """pytest's closing line ('8 skipped in 9.10s', '= 7 passed, 1 failed in 200.1s (0:03:20) =') and its counts."""
    for line in reversed(log_text.strip().splitlines()):
        match = PYTEST_CLOSING.match(line.strip())
        if match:
            counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", match[1])}
            return {"closing_line": line.strip(), "counts": counts, "seconds": float(match[2]),
                    "ok": not counts.get("failed") and not counts.get("error") and not counts.get("errors")}
    return {"closing_line": None, "counts": {}, "ok": False}


def cmd_test_record(args):
    result = test_gpu_result((state_dir() / STAGE_FILES["test-gpu"]).read_text(errors="replace"))
    update("test_gpu", result)
    print(f"test-gpu: {result['closing_line']}")


# ----------------------------------------------------------------------------------------------------------------
# Report: targets and stages, from lease.json and the raw files
# ----------------------------------------------------------------------------------------------------------------


def fmt(value, digits=1):
    """fcsft.metrics.format_number, with "-" for nothing measured."""
    return format_number(float(value) if isinstance(value, int) and not isinstance(value, bool) else value, digits) or "-"


def targets(state, rows):
    """[(target, value, verdict, detail)] for the four targets and test-gpu. A target with nothing measured is
    'not measured', never a pass."""
    ok = [r for r in rows if r.get("status") == "ok"]
    train = state.get("train")
    result = []
    measured = ok + ([train] if train else [])
    with_mfu = [r for r in measured if r.get("mfu_percent") is not None]
    if with_mfu:
        best = max(with_mfu, key=lambda r: r["mfu_percent"])
        result.append((f"MFU >= {TARGETS['mfu_percent']:g}% (best row)", f"{best['mfu_percent']:.1f}%",
                       best["mfu_percent"] >= TARGETS["mfu_percent"], best["setting"]))
    else:
        result.append((f"MFU >= {TARGETS['mfu_percent']:g}% (best row)", "-", None, "not measured"))
    reference = next((r for r in ok if r["setting"] == "trl_defaults"), None)
    if reference and measured:
        best = max(measured, key=lambda r: r["real_tokens_per_second_per_device"])
        ratio = best["real_tokens_per_second_per_device"] / reference["real_tokens_per_second_per_device"]
        result.append((f">= {TARGETS['speedup_vs_trl_defaults']:g}x trl_defaults' real tokens/s", f"{ratio:.2f}x",
                       ratio >= TARGETS["speedup_vs_trl_defaults"], best["setting"]))
    else:
        result.append((f">= {TARGETS['speedup_vs_trl_defaults']:g}x trl_defaults' real tokens/s", "-", None,
                       "not measured (trl_defaults row missing)"))
    errors = [(r["setting"], r["estimate_error_percent"]) for r in measured if r.get("estimate_error_percent") is not None]
    if errors:
        worst = max(errors, key=lambda e: abs(e[1]))
        outside = [f"{name} {err:+.1f}%" for name, err in errors if abs(err) > TARGETS["estimate_error_percent"]]
        result.append((f"estimate_memory.py within {TARGETS['estimate_error_percent']:g}% of every row's peak",
                       f"worst {worst[1]:+.1f}% ({worst[0]})", not outside,
                       f"{len(errors)} rows; outside: {', '.join(outside)}" if outside else f"{len(errors)} rows"))
    else:
        result.append((f"estimate_memory.py within {TARGETS['estimate_error_percent']:g}% of every row's peak", "-", None,
                       "not measured"))
    ev = state.get("eval")
    if ev and ev.get("extrapolated_seconds"):
        result.append((f"{BFCL_SINGLE_TURN_PROMPTS:,} single-turn prompts in <= {TARGETS['eval_seconds']:g}s (extrapolated)",
                       f"{ev['extrapolated_seconds']:.0f}s", ev["extrapolated_seconds"] <= TARGETS["eval_seconds"],
                       f"{ev['prompts']} prompts at {ev['prompts_per_s']} prompts/s, {ev['max_new_tokens']} new tokens, "
                       f"batch {ev['batch_size']}"))
    else:
        result.append((f"{BFCL_SINGLE_TURN_PROMPTS:,} single-turn prompts in <= {TARGETS['eval_seconds']:g}s (extrapolated)",
                       "-", None, "not measured"))
    test = state.get("test_gpu")
    result.append(("make test-gpu passes", (test or {}).get("closing_line") or "-",
                   test["ok"] if test and test.get("closing_line") else None, "" if test else "not run"))
    return result


def report_markdown(state, rows):
    env = state.get("env", {})
    packages = (state.get("install") or {}).get("packages_after") or env.get("packages", {})
    lines = [f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), "
             + ", ".join(f"{k} {v}" for k, v in packages.items()
                         if k in ("transformers", "trl", "accelerate", "peft", "datasets", "liger-kernel") and v)
             + (f"; bf16 8192^3 matmul {env['bf16_matmul_tflops']} TFLOP/s" if env.get("bf16_matmul_tflops") else ""), ""]
    if not env.get("cuda_available"):
        lines += ["CPU rehearsal: the targets are the GPU's; here they only show that every number is computed "
                  "(MFU against a measured CPU matmul rate, memory as peak RSS).", ""]
    lines += ["| target | value | verdict | detail |", "|---|---|---|---|"]
    for name, value, verdict, detail in targets(state, rows):
        lines.append(f"| {name} | {value} | {'PASS' if verdict else 'not measured' if verdict is None else 'FAIL'} | {detail} |")
    lines += ["", "| stage | status | seconds (cap) | call |", "|---|---|---:|---:|"]
    for name, stage in state.get("stages", {}).items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} ({stage.get('cap_s')}) | {stage.get('call')} |")
    measured = ([state["train"]] if state.get("train") else []) + rows
    if measured:
        reference = next((r for r in rows if r.get("setting") == "trl_defaults" and r.get("status") == "ok"), None)
        lines += ["", "| row | status | batch x max_length | checkpointing | real tokens/s | vs trl_defaults | MFU % | "
                      "peak GiB | estimate GiB (err %) | loss first -> last |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in measured:
            if r.get("status") != "ok":
                lines.append(f"| {r['setting']} | {r['status'][:120]} | | | | | | | | |")
                continue
            speed = r["real_tokens_per_second_per_device"]
            losses = r.get("losses") or [r.get("loss_first"), r.get("loss_last")]
            lines.append(
                f"| {r['setting']} | ok | {r['batch_size']} x {r['max_length']} | {r['activation_checkpointing']} | {fmt(speed, 0)} | "
                f"{fmt(speed / reference['real_tokens_per_second_per_device'], 2) + 'x' if reference else '-'} | "
                f"{fmt(r.get('mfu_percent'), 1)} | {fmt(r.get('peak_memory_gib'), 2)} | {fmt(r.get('estimated_peak_gib'), 2)} "
                f"({fmt(r.get('estimate_error_percent'), 1)}) | {fmt(losses[0], 3)} -> {fmt(losses[-1], 3)} |")
    train = state.get("train")
    if train:
        lines += ["", f"Train checks: {train['checks']}" + (f"; checkpoint {train['checkpoint']}" if train.get("checkpoint") else "")]
    if state.get("eval"):
        lines += ["", f"Eval: {state['eval']}"]
    if state.get("install"):
        lines += ["", "Install: " + ", ".join(f"{p['wheel']} {p['action']} ({p['why']})" for p in state["install"]["plan"])]
    return "\n".join(lines) + "\n"


def load_rows(runs_path):
    return bench_rows(json.loads(Path(runs_path).read_text())) if Path(runs_path).is_file() else []


def cmd_report(args):
    state = read_state()
    text = report_markdown(state, load_rows(state_dir() / STAGE_FILES["bench"]))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


CARRY_LIMIT = 64 * 2**20  # the working tree that travels to the device machine, carried paths included


def travelling_bytes(repo, carry):
    """Bytes of what a device call sends: tracked and untracked-not-ignored files (links as links), plus carry."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = {Path(repo) / name for name in listed if name}
    for path in carry:
        path = Path(repo) / path
        files |= {p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()} if path.is_dir() else {path}
    return sum(p.lstat().st_size for p in files if p.is_symlink() or p.exists())


def cmd_check_carry(args):
    """Before the device call: will the tree plus the carried paths fit 64 MiB, in at most 8 paths?"""
    total = travelling_bytes(REPO, args.paths)
    print(f"check-carry: {total:,} bytes ({total / 2**20:.1f} MiB) would travel with carry {args.paths}; "
          f"limit {CARRY_LIMIT / 2**20:.0f} MiB in at most 8 paths")
    missing = [p for p in args.paths if not (REPO / p).exists()]
    if total > CARRY_LIMIT or len(args.paths) > 8 or missing:
        sys.exit(f"check-carry: does not fit{f' (missing: {missing})' if missing else ''}")


def device_slug(device):
    match = re.search(r"\b(h100|h200|a100|l4|t4|b200)\b", (device or "").lower())
    return match[1] if match else re.sub(r"[^a-z0-9]+", "-", (device or "unknown").lower()).strip("-")[:20]


def cmd_collect(args):
    """Here, after a lease: the returned files into benchmarks/<device>-<model>/, every number recomputed from them."""
    source = Path(args.files_at)
    state = read_state(source / OUT_FILES["state"])
    if (source / OUT_FILES["train"]).is_file() and state.get("prep"):
        summary = json.loads((source / OUT_FILES["train"]).read_text())
        train = train_metrics(summary, state["prep"]["data"], (state.get("train") or {}).get("peak_tflops")
                              or peak_tflops_of(state.get("env", {}).get("device", "")), args.warmup_steps)
        if (state.get("train") or {}).get("checkpoint"):
            train["checkpoint"] = state["train"]["checkpoint"]
            train["checks"]["checkpoint_loads"] = train["checkpoint"]["ok"]
        state["train"] = train
    if (source / OUT_FILES["eval"]).is_file():
        state["eval"] = eval_metrics(json.loads((source / OUT_FILES["eval"]).read_text()))
    if (source / OUT_FILES["test-gpu"]).is_file():
        state["test_gpu"] = test_gpu_result((source / OUT_FILES["test-gpu"]).read_text(errors="replace"))
    rows = load_rows(source / OUT_FILES["bench"])
    model = (state.get("prep") or {}).get("model", "qwen2.5-3b")
    dest = Path(args.dest) if args.dest else REPO / "benchmarks" / f"{device_slug(state.get('env', {}).get('device'))}-{model}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES.values():
        if (source / name).is_file() and name != OUT_FILES["state"]:
            shutil.copyfile(source / name, dest / name)
    (dest / OUT_FILES["state"]).write_text(json.dumps(state, indent=1, default=str) + "\n")
    text = report_markdown(state, rows)
    (dest / "lease.md").write_text(f"# GPU lease results ({', '.join(c['started'] for c in state.get('calls', []))})\n\n"
                                   "Written by `python benchmarks/lease.py collect`; see benchmarks/LEASE.md.\n\n" + text)
    if state.get("test_gpu", {}).get("closing_line"):
        (dest / "test-gpu.txt").write_text(f"make test-gpu PY=python3 on {state.get('env', {}).get('device')}\n"
                                           f"{state['test_gpu']['closing_line']}\n")
    print(text)
    print(f"collect: wrote {dest}")


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start")
    p.add_argument("--incoming", default=str(REPO / "runs" / "lease-in"))
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--device", default="gpu")
    p.add_argument("--stages", default="")
    p.add_argument("--cap-scale", type=float, default=1.0)
    p = sub.add_parser("pending")
    p.add_argument("name")
    p = sub.add_parser("stage")
    p.add_argument("name")
    p.add_argument("status")
    p.add_argument("seconds", type=int)
    p.add_argument("cap", type=int)
    p = sub.add_parser("get")
    p.add_argument("key")
    sub.add_parser("env")
    p = sub.add_parser("install")
    p.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"))
    p.add_argument("--target", default="/tmp/lease-site")
    p = sub.add_parser("prep")
    p.add_argument("--model", default="qwen2.5-3b")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--assets", default=str(REPO / "runs" / "lease" / "assets"))
    p = sub.add_parser("train-check")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--no-load", dest="load", action="store_false")
    p = sub.add_parser("bench")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    sub.add_parser("eval-check")
    sub.add_parser("test-record")
    p = sub.add_parser("report")
    p.add_argument("--markdown")
    p = sub.add_parser("check-carry")
    p.add_argument("paths", nargs="*", default=["wheelhouse"])
    p = sub.add_parser("collect")
    p.add_argument("files_at")
    p.add_argument("--dest")
    p.add_argument("--warmup-steps", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "bench" and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    {"start": cmd_start, "pending": cmd_pending, "stage": cmd_stage, "get": cmd_get, "env": cmd_env,
     "install": cmd_install, "prep": cmd_prep, "train-check": cmd_train_check, "bench": cmd_bench,
     "eval-check": cmd_eval_check, "test-record": cmd_test_record, "report": cmd_report,
     "check-carry": cmd_check_carry, "collect": cmd_collect}[args.command](args)


if __name__ == "__main__":
    main()
