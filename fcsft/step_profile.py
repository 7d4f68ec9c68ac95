"""Step profiling for train_sft.py: a PyTorch profiler trace of chosen training steps, and where their time went.

    accelerate launch ... train_sft.py recipes/xlam.yaml --profile_steps 10-15
    python step_profile.py runs/qwen2.5-3b-xlam/profile/rank0.pt.trace.json   # the breakdown of any saved trace

With `profile_steps: A-B` in a recipe, every rank records optimizer steps A to B (one more step before them warms the
profiler up) with torch.profiler and writes `output_dir/profile/rank<N>.pt.trace.json`: open it in Perfetto
(ui.perfetto.dev) or chrome://tracing, or in TensorBoard with the torch-tb-profiler plugin
(`tensorboard --logdir output_dir/profile`). Rank 0 then prints, and writes to `output_dir/profile/breakdown.json`,
the share of step time each rank spent:

  compute         a GPU kernel other than a collective (GPU), or a torch op on the training thread (CPU) was running;
  all-gather      an all-gather ran (FSDP gathers the parameters of a layer before its forward and backward);
  reduce-scatter  a reduce-scatter or all-reduce ran (FSDP reduces gradients; gloo runs FSDP's reduce-scatter as an
                  all-reduce);
  exposed comm    a collective ran while no compute did: the communication FSDP failed to hide behind compute;
  idle            neither ran (CPU-side overhead, data loading, waiting for another rank).

compute + exposed comm + idle = 100%; all-gather and reduce-scatter overlap compute where FSDP prefetches. A step is
one whole training-loop iteration (from the end of the previous optimizer step to the end of this one), so data
loading and logging count.
"""

import json
import logging
import re
from pathlib import Path

from fcsft.errors import UserError

logger = logging.getLogger(__name__)

ALL_GATHER = re.compile(r"all_?gather", re.IGNORECASE)
REDUCE = re.compile(r"reduce_?scatter|all_?reduce", re.IGNORECASE)
COLLECTIVE = re.compile(r"nccl|gloo:|all_?gather|reduce_?scatter|all_?reduce|all_?to_?all|broadcast", re.IGNORECASE)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def parse_steps(text):
    """'10-15' -> (10, 15); '12' -> (12, 12). Optimizer steps, counted from 1 as in the Trainer's logs."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", str(text))
    if not match:
        raise UserError(f"profile_steps must look like '10-15' (first-last optimizer step) or '12', not {text!r}")
    first, last = int(match[1]), int(match[2] or match[1])
    if not 1 <= first <= last:
        raise UserError(f"profile_steps {text!r}: steps count from 1 and the first may not exceed the last")
    return first, last


# ----------------------------------------------------------------------------------------------------------------
# The breakdown: interval arithmetic over one rank's Chrome trace
# ----------------------------------------------------------------------------------------------------------------


def union(intervals):
    """Sorted, merged (start, end) intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(i) for i in merged]


def length(intervals):
    return sum(end - start for start, end in intervals)


def intersect(a, b):
    """Intersection of two merged interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def breakdown(trace_events):
    """Shares of profiled step time (percent) from the complete ('X') events of one rank's Chrome trace."""
    events = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    span = lambda e: (float(e["ts"]), float(e["ts"]) + float(e["dur"]))  # noqa: E731
    on_device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if on_device:  # GPU: kernels on the device timeline; the steps as the device saw them when kineto recorded that
        steps = [e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"].startswith("ProfilerStep#")] or \
                [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
        comm = [e for e in on_device if COLLECTIVE.search(e["name"])]
        compute = [e for e in on_device if not COLLECTIVE.search(e["name"])]
    else:  # CPU: torch ops on the training thread; gloo runs the collectives on its own threads
        steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
        main_thread = {(e["pid"], e["tid"]) for e in steps}
        host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
        comm = [e for e in host if e["name"].startswith("gloo:")]  # gloo's record of each collective, on its threads
        # c10d:: ops only hand a collective to gloo (or wait for it); FSDP's copy-in/copy-out around it is compute
        compute = [e for e in events if e.get("cat") == "cpu_op" and (e["pid"], e["tid"]) in main_thread
                   and not e["name"].startswith(("c10d::", "gloo:"))]
    if not steps:
        raise ValueError("no ProfilerStep# annotations in the trace: was it recorded with a profiler schedule?")
    window = union(span(e) for e in steps)
    total = length(window)
    compute_busy = intersect(union(span(e) for e in compute), window)
    comm_busy = intersect(union(span(e) for e in comm), window)
    busy = intersect(union(compute_busy + comm_busy), window)
    percent = lambda t: round(100 * t / total, 2) if total else 0.0  # noqa: E731
    return {
        "steps": len(steps),
        "step_ms": round(total / len(steps) / 1e3, 3),  # trace times are microseconds
        "compute": percent(length(compute_busy)),
        "all_gather": percent(length(intersect(union(span(e) for e in comm if ALL_GATHER.search(e["name"])), window))),
        "reduce_scatter": percent(length(intersect(union(span(e) for e in comm if REDUCE.search(e["name"])), window))),
        "exposed_comm": percent(length(busy) - length(compute_busy)),
        "idle": percent(total - length(busy)),
        "timeline": "device kernels" if on_device else "CPU ops (training thread) and gloo threads",
    }


def trace_breakdown(path):
    return breakdown(json.loads(Path(path).read_text())["traceEvents"])


def format_breakdown(per_rank):
    lines = ["| rank | step ms | compute % | all-gather % | reduce-scatter % | exposed comm % | idle % |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, b in enumerate(per_rank):
        lines.append(f"| {rank} | {b['step_ms']:.1f} | {b['compute']:.1f} | {b['all_gather']:.1f} | "
                     f"{b['reduce_scatter']:.1f} | {b['exposed_comm']:.1f} | {b['idle']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The Trainer callback
# ----------------------------------------------------------------------------------------------------------------


def make_profile_callback(accelerator, output_dir, steps_text):
    import torch
    from accelerate.utils import gather_object
    from transformers import TrainerCallback

    first, last = parse_steps(steps_text)
    profile_dir = Path(output_dir) / "profile"

    class StepProfileCallback(TrainerCallback):
        """Runs torch.profiler with a schedule over the whole training loop: one profiler step per optimizer step."""

        def __init__(self):
            self.profiler = None
            self.done = False

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step >= first:
                logger.warning("profile_steps %s: training starts after step %d (resumed); nothing is profiled", steps_text, first)
                self.done = True
                return
            # Profiler step k covers optimizer step global_step + k + 1. One warm-up step before `first` when there is one.
            warmup = 1 if first - state.global_step >= 2 else 0
            profile_dir.mkdir(parents=True, exist_ok=True)
            path = profile_dir / f"rank{accelerator.process_index}.pt.trace.json"
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(skip_first=first - 1 - state.global_step - warmup, wait=0,
                                                 warmup=warmup, active=last - first + 1, repeat=1),
                on_trace_ready=lambda prof: prof.export_chrome_trace(str(path)),
            )
            self.profiler.start()
            self.path = path

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or self.done:
                return
            self.profiler.step()  # after step `last` this writes the trace
            if state.global_step == last:
                self.finish(state)

        def on_train_end(self, args, state, control, **kwargs):
            if self.profiler is not None and not self.done:
                logger.warning("profile_steps %s: training ended at step %d; the trace covers the steps reached",
                               steps_text, state.global_step)
                self.finish(state)

        def finish(self, state):
            self.profiler.stop()
            self.done = True
            try:
                mine = trace_breakdown(self.path)
            except (OSError, ValueError) as err:  # e.g. stopped before any profiled step
                mine = {"error": str(err)}
            per_rank = gather_object([mine])  # every rank reaches this step end
            if accelerator.is_main_process:
                result = {"profile_steps": steps_text, "traces": sorted(p.name for p in profile_dir.glob("rank*.pt.trace.json")),
                          "per_rank": per_rank}
                (profile_dir / "breakdown.json").write_text(json.dumps(result, indent=1) + "\n")
                if all("error" not in b for b in per_rank):
                    logger.warning("profile: steps %s, share of step time (%s):\n%s", steps_text, per_rank[0]["timeline"],
                                   format_breakdown(per_rank))
                else:
                    logger.warning("profile: steps %s: no breakdown (%s)", steps_text, per_rank)

    return StepProfileCallback()
