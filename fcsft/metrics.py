"""What a run is measured in, defined once: the device name, peak memory, MFU against a peak FLOP/s, the price of a
GPU-hour, and how durations and shares are written.

Peak memory, everywhere in this project (run_summary.json, model cards, the study's table, the benchmarks): the
largest rank's peak, in GiB (2**30 bytes): torch.cuda.max_memory_allocated on a GPU (the tensors; the caching
allocator reserves more, about 10% in steady training), peak RSS of the process on CPU.

MFU: (6N + 12·L·d·s) FLOPs per real (non-padding) token, s the token-weighted mean row length, against the device's
peak dense bf16 FLOP/s (datasheet), or on CPU the best 1-thread fp32 matmul measured on the machine.
"""

import platform
import resource
import time

from fcsft.memory_estimate import GiB, flops_per_token

DEFAULT_PRICE_PER_GPU_HOUR = 23 / 8  # the project plan: $23 per hour for a node of 8 GPUs

# name as torch.cuda.get_device_name shows it -> dense bf16/fp16 tensor-core peak, usable memory (GiB)
GPUS = {
    "h100": {"match": "H100", "peak_tflops": 989.0, "usable_gib": 79.1},
    "h200": {"match": "H200", "peak_tflops": 989.0, "usable_gib": 139.8},
    "a100-80": {"match": "A100-SXM4-80GB", "peak_tflops": 312.0, "usable_gib": 79.1},
    "a100-40": {"match": "A100", "peak_tflops": 312.0, "usable_gib": 39.4},
    "l4": {"match": "L4", "peak_tflops": 121.0, "usable_gib": 22.0},
    "t4": {"match": "T4", "peak_tflops": 65.0, "usable_gib": 14.6},
}


def device_name():
    """The device a process computes on: the GPU's name, or "cpu (<machine>)"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def is_cpu(device):
    return str(device or "").startswith("cpu")


def gpu_spec(device):
    """The GPUS entry whose name occurs in a device name, or None."""
    return next((spec for spec in GPUS.values() if spec["match"] in str(device)), None)


def peak_memory_now():
    """This process's peak so far, in GiB: {"peak_allocated_gib", "peak_reserved_gib"} on a GPU, {"peak_rss_gib"} on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}  # ru_maxrss: KiB on Linux


def peak_memory_gib(summary):
    """(peak GiB, what was measured) of a run_summary.json: the largest rank's peak allocated (GPU) or RSS (CPU).
    Summaries written before the units were named say `_gb` for the same GiB values."""
    ranks = summary.get("peak_memory_per_rank") or []
    for key in ("peak_allocated_gib", "peak_allocated_gb"):
        if ranks and key in ranks[0]:
            return max(r[key] for r in ranks), "max_memory_allocated"
    for key in ("peak_rss_gib", "peak_rss_gb"):
        if ranks and key in ranks[0]:
            return max(r[key] for r in ranks), "peak RSS"
    return None, None


def measured_cpu_peak_tflops(threads):
    """Best fp32 matmul rate of `threads` threads (the per-process share of a multi-process CPU launch)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = 0.0
    for _ in range(8):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - start))
    return best / 1e12


def peak_tflops_of(device, override=None, cache={}):
    """Peak FLOP/s per device for MFU: the override, else the datasheet for a known GPU, else on CPU the best 1-thread
    fp32 matmul measured on this machine now (once per process)."""
    if override:
        return override
    if is_cpu(device):
        if "cpu" not in cache:
            cache["cpu"] = measured_cpu_peak_tflops(threads=1)
        return cache["cpu"]
    spec = gpu_spec(device)
    return spec["peak_tflops"] if spec else None


def mfu_percent(tokens_per_second, config, attention_span, peak_tflops):
    """Model FLOPs utilisation in %, on real tokens per second per device."""
    if not (tokens_per_second and attention_span and peak_tflops):
        return None
    return 100 * tokens_per_second * flops_per_token(config, attention_span) / (peak_tflops * 1e12)


def real_token_throughput(summary, warmup_steps):
    """Real-token throughput over the steps after warm-up, from the logs of RunReportCallback (each log's rate covers
    the steps since the previous log, so any logging_steps works)."""
    logged = [log for log in summary["log_history"] if "num_tokens" in log]
    tokens, seconds, steps = 0.0, 0.0, 0
    for previous, log in zip(logged, logged[1:]):
        if "tokens_per_second_per_device" not in log or log["step"] <= warmup_steps:
            continue
        delta = log["num_tokens"] - previous["num_tokens"]
        tokens += delta
        seconds += delta / (log["tokens_per_second_per_device"] * summary["num_processes"])
        steps += log["step"] - previous["step"]
    losses = [log["loss"] for log in summary["log_history"] if "loss" in log]
    per_device = tokens / summary["num_processes"]
    return {"steps_measured": steps, "step_seconds": seconds / max(steps, 1),
            "real_tokens_per_step_per_device": per_device / max(steps, 1),
            "real_tokens_per_second_per_device": per_device / seconds if seconds else 0.0,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def attention_span(dataset, max_length):
    """Token-weighted mean length of the training rows (each packed row counted as its parts), capped at max_length:
    the tokens an average trained token attends over, the s of MFU's 6N + 12*L*d*s FLOPs per token."""
    import numpy as np
    import pyarrow.compute as pc

    column = "seq_lengths" if "seq_lengths" in dataset.column_names else "input_ids"
    values = dataset.with_format("arrow")[column]
    lengths = pc.list_flatten(values) if column == "seq_lengths" else pc.list_value_length(values)
    lengths = np.asarray(lengths, dtype=np.float64)
    if max_length:
        lengths = np.minimum(lengths, max_length)
    return round(float((lengths**2).sum() / lengths.sum()), 1) if lengths.sum() else None


def format_duration(seconds):
    """"42s", "3m05s", "1h02m"."""
    minutes, seconds = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_percent(share, digits=2):
    """A share (0.0-1.0) in percent, "not run" for None."""
    return "not run" if share is None else f"{100 * share:.{digits}f}"


def format_number(value, digits=1):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)
