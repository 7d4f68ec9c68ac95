"""Throughput, MFU and peak memory per training setting, measured through train_sft.py itself.

    python bench_fsdp.py --repeats 3                       # CPU: tiny model, every setting x 3 -> benchmarks/cpu-tiny
    python bench_fsdp.py --settings smoke                  # two settings in about a minute (tests/test_bench.py)
    python bench_fsdp.py --model qwen2.5-3b --results benchmarks/h100x8-qwen2.5-3b   # GPU preset on all GPUs of the node
    MALLOC_MMAP_THRESHOLD_=65536 python bench_fsdp.py ...  # CPU: RSS follows live tensors (for the memory column)

Each setting is one `accelerate launch ... train_sft.py RECIPE` with a generated recipe and accelerate config; the run's
run_summary.json (written by train_sft.py's RunReportCallback) gives real-token throughput per step and peak memory.
The first --warmup-steps steps are excluded. Writes to --results: bench.csv, bench.md, throughput.png, mfu.png,
memory.png and data.json (the length distribution of the benchmark data).

Model: `tiny` (demo_assets/tiny-qwen2) or a real architecture from fcsft.memory_estimate.ARCHITECTURES, written to disk as
config.json + random weights (throughput and memory do not depend on the weight values), with the tiny demo tokenizer.
Data: xLAM-schema rows built from the repo's tool library with 1-8 tools listed per row (make_demo_assets.py's sample
lists 1-4), rendered through Qwen2.5's chat template with tools; --dataset takes a real xlam-function-calling-60k file.
MFU: 6N + 12*L*d*s FLOPs per real token (s: the token-weighted mean row length) against --peak-tflops per device.
"""

import argparse
import json
from pathlib import Path

from fcsft import memory_estimate
from fcsft.bench import (
    PRESETS,
    REPO,
    benchmark_data,
    choose_settings,
    describe_device,
    ensure_demo_assets,
    load_runs,
    peak_flops,
    random_init_model_dir,
    results_header,
    run_round_robin,
    runtime_rss_gib,
    write_markdown,
    write_plots,
)
from fcsft.errors import exit_on_user_error


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help=f"tiny or one of {list(memory_estimate.ARCHITECTURES)}")
    parser.add_argument("--settings", default=None, help=f"a preset {list(PRESETS)} (default: gpu1 on one GPU, gpu on several, else cpu) "
                        "or comma-separated setting names")
    parser.add_argument("--num-processes", type=int, default=None, help="default: all GPUs, or 2 on CPU")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps excluded from the timing (default 3 CPU, 5 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 8 CPU, 20 GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak; default: H100/H200 989 (bf16 dense), CPU: measured fp32 matmul")
    parser.add_argument("--dataset", type=Path, default=None, help="an xlam-function-calling-60k .json/.jsonl instead of the built rows")
    parser.add_argument("--rows", type=int, default=2000, help="rows of built benchmark data")
    parser.add_argument("--assets", type=Path, default=REPO / "demo_assets", help="make_demo_assets.py output (built if missing)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer for a real-architecture model (default: the tiny one)")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/<cpu|gpu name>-<model>")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench", help="recipes, configs, logs of each run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting, round-robin; the median run is reported")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --results/runs.json and add only "
                        "the missing ones (an interrupted benchmark, or more settings into the same table); refused "
                        "when they were made with other --steps, --warmup-steps, --rows, --model, --dataset or processes")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    return parser.parse_args()


def main():
    import torch

    args = parse_args()
    on_gpu = torch.cuda.is_available()
    args.num_processes = args.num_processes or (torch.cuda.device_count() if on_gpu else 2)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if on_gpu else 3)
    args.steps = args.steps or (20 if on_gpu else 8)
    settings = choose_settings(args.settings, on_gpu, args.num_processes)
    device = describe_device(on_gpu, args.num_processes)
    args.results = args.results or REPO / "benchmarks" / f"{'gpu' if on_gpu else 'cpu'}-{args.model}"
    args.results.mkdir(parents=True, exist_ok=True)
    work = args.work_dir / args.results.name
    work.mkdir(parents=True, exist_ok=True)
    identity = {"model": args.model, "dataset": str(args.dataset) if args.dataset else None, "rows": args.rows,
                "warmup_steps": args.warmup_steps, "steps": args.steps, "num_processes": args.num_processes}
    runs_path = args.results / "runs.json"
    runs = load_runs(runs_path, args.resume, identity)  # checked before minutes of data preparation

    # Model, data, lengths, peak FLOP/s
    assets = ensure_demo_assets(args.assets)
    tokenizer_dir = args.tokenizer or assets / "tiny-qwen2"
    model_dir = assets / "tiny-qwen2" if args.model == "tiny" else random_init_model_dir(args.model, tokenizer_dir, args.work_dir / "models")
    config = memory_estimate.load_config(model_dir)
    data_path, lengths, data = benchmark_data(args, work, tokenizer_dir)
    print(f"bench: data {json.dumps(data)}", flush=True)
    peak, peak_note = peak_flops(args.peak_tflops, on_gpu, device)

    # Every setting through train_sft.py, round-robin; then the table and plots
    ctx = {"args": args, "on_gpu": on_gpu, "model_dir": model_dir, "config": config, "family": config["model_type"],
           "data_path": data_path, "lengths": lengths, "data": data, "peak_tflops": peak, "work": work,
           "base_recipe": REPO / "recipes" / ("xlam.yaml" if on_gpu else "demo_cpu.yaml"),
           "runtime_rss_gib": 0.0 if on_gpu else runtime_rss_gib()}
    rows = run_round_robin(settings, ctx, runs, runs_path, identity, args.repeats)
    write_markdown(rows, results_header(args, device, config, data, peak_note), args.results / "bench.md")
    write_plots(rows, args.results, f"{args.model} on {device}")
    print(f"bench: wrote {args.results}/bench.csv, bench.md and plots", flush=True)


if __name__ == "__main__":
    with exit_on_user_error("bench_fsdp.py"):
        main()
