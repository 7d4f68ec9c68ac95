"""The project plan's study, runnable: a grid of training runs, each scored on BFCL, in one results table.

    python sweep.py sweeps/phase3_hyperparameters.yaml            # run a sweep, or continue an interrupted one
    python sweep.py sweeps/phase3_hyperparameters.yaml --dry-run  # validate it and print every command
    python sweep.py sweeps/phase3_hyperparameters.yaml --point learning_rate=1e-05   # one point (another node)
    python sweep.py sweeps/phase3_hyperparameters.yaml --wandb-sweep > wandb_sweep.yaml  # the same grid for W&B
    python sweep.py report runs/sweeps/phase1 runs/sweeps/phase3 --output runs/report    # one table for any runs

A sweep file (YAML):

    recipe: recipes/xlam.yaml                           # the base recipe
    accelerate_config: accelerate_configs/fsdp_full.yaml
    accelerate_flags: {num_processes: 8}                # optional `accelerate launch --key value` flags
    output_dir: runs/sweeps/phase3                      # default: runs/sweeps/<sweep file name>
    overrides: {num_train_epochs: 1}                    # recipe keys set on every trained point
    grid:                                               # every combination of the axes; or `one_at_a_time:` (each
      learning_rate: [1.0e-5, 2.0e-5]                   # axis varied alone around the recipe), or `points:` (a list)
      precision:                                        # an axis of named bundles of settings
        bf16: {bf16: true, dtype: bfloat16, accelerate_flags: {mixed_precision: bf16}}
        fp32: {bf16: false, dtype: float32, accelerate_flags: {mixed_precision: "no"}}
    baseline: true                                      # also score the base model, untrained: a point like any other;
                                                        # or the folder of a baseline another sweep scored
    bfcl:
      categories: [all]                                 # eval_bfcl.py --categories
      args: [--batch-size, "32"]                        # more eval_bfcl.py flags
      launcher: accelerate launch --multi_gpu --num_processes 8   # default: python
      score_trained: true                               # false: trained points measure speed and memory only

Each point runs, in its own folder OUTPUT/<point>/, the real commands
`accelerate launch --config_file CONFIG train_sft.py RECIPE --output_dir OUTPUT/<point>/train --key value ...` and
`eval_bfcl.py --model OUTPUT/<point>/train --output-dir OUTPUT/<point>/bfcl ...`, logs to train.log / eval.log and
records its status in point.json; the results table (results.md, results.csv, PNG plots) is rewritten after every
point. A failed point is recorded with its error and the sweep goes on. Started again, a sweep skips finished points,
retries failed or interrupted ones (a training run resumes from its last complete checkpoint), and refuses a folder
that holds another sweep (other recipe, grid, configs or BFCL settings) or anything else.
"""

import argparse
import csv
import datetime
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

import bench_fsdp
import estimate_memory
import step_profile

REPO = Path(__file__).resolve().parent
SWEEP_KEYS = ("recipe", "accelerate_config", "accelerate_flags", "output_dir", "overrides", "grid", "one_at_a_time",
              "points", "baseline", "bfcl")
BFCL_KEYS = ("categories", "args", "launcher", "score_trained")
DEFAULT_PRICE_PER_GPU_HOUR = 23 / 8  # the project plan: $23 per hour for a node of 8 GPUs


@dataclass
class Point:
    name: str
    labels: dict = field(default_factory=dict)         # axis -> value label, as the table shows it
    overrides: dict = field(default_factory=dict)      # recipe keys passed to train_sft.py as --key value
    accelerate_config: str | None = None
    accelerate_flags: dict = field(default_factory=dict)
    baseline_model: str | None = None                  # set for a baseline: the model scored without training


@dataclass
class Sweep:
    path: Path
    recipe: str
    recipe_values: dict
    output_dir: Path
    points: list
    categories: list
    eval_args: list
    eval_launcher: list
    score_trained: bool
    baseline_dir: str | None = None  # a baseline scored elsewhere (e.g. by phase 1), shown as this sweep's reference


# ----------------------------------------------------------------------------------------------------------------
# Sweep file -> points
# ----------------------------------------------------------------------------------------------------------------


def fail(where, message):
    sys.exit(f"sweep.py: {where}: {message}")


def value_label(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def axis_choices(axis, values, where):
    """[(label, bundle)] for one axis: a list of values of a recipe key (or of accelerate_config), or a mapping
    label -> bundle of settings."""
    if isinstance(values, dict) and values:
        for label, bundle in values.items():
            if not isinstance(bundle, dict):
                fail(where, f"axis '{axis}': '{label}' must map to settings (key: value), not {bundle!r}")
        return [(str(label), dict(bundle)) for label, bundle in values.items()]
    if not isinstance(values, list) or not values:
        fail(where, f"axis '{axis}' needs a list of values or a mapping label -> settings")
    if axis == "accelerate_config":
        return [(Path(v).stem, {"accelerate_config": v}) for v in values]
    return [(value_label(v), {axis: v}) for v in values]


def safe_name(text):
    """A point's folder name: letters, digits and ._=,+- as they are, anything else as _."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(text))


def folder_name(labels):
    return safe_name(",".join(f"{axis}={label}" for axis, label in labels) or "recipe")


def expand_points(spec, recipe_values, where):
    """The trained points of a sweep file, in order: grid (every combination), one_at_a_time (the recipe, then each
    axis value alone; values equal to the recipe's are not run twice) or an explicit list."""
    modes = [m for m in ("grid", "one_at_a_time", "points") if m in spec]
    if len(modes) > 1:
        fail(where, f"use one of grid, one_at_a_time and points, not {' and '.join(modes)}")
    overrides = spec.get("overrides") or {}
    config, flags = spec.get("accelerate_config"), spec.get("accelerate_flags") or {}
    for key, value in (("overrides", overrides), ("accelerate_flags", flags)):
        if not isinstance(value, dict):
            fail(where, f"{key} must map keys to values, not {value!r}")

    def point(labels, bundle, name=None):
        bundle = dict(bundle)
        own_flags = bundle.pop("accelerate_flags", None) or {}
        if not isinstance(own_flags, dict):
            fail(where, f"accelerate_flags must map flag names to values, not {own_flags!r}")
        return Point(name=name or folder_name(labels), labels=dict(labels),
                     accelerate_config=bundle.pop("accelerate_config", config),
                     accelerate_flags={**flags, **own_flags}, overrides={**overrides, **bundle})

    if "points" in spec:
        if not isinstance(spec["points"], list) or not spec["points"]:
            fail(where, "points must be a list of mappings (recipe keys, and optionally name, accelerate_config)")
        points = []
        for entry in spec["points"]:
            if not isinstance(entry, dict):
                fail(where, f"each entry of points must be a mapping, not {entry!r}")
            bundle = {k: v for k, v in entry.items() if k != "name"}
            labels = [(k, Path(v).stem if k == "accelerate_config" else value_label(v))
                      for k, v in bundle.items() if k != "accelerate_flags"]
            points.append(point(labels, bundle, entry.get("name") and safe_name(entry["name"])))
        return points
    mode = modes[0] if modes else None
    axes = spec.get(mode) or {}
    if mode and (not isinstance(axes, dict) or not axes):
        fail(where, f"{mode} must map axis names to values")
    choices = {axis: axis_choices(axis, values, where) for axis, values in axes.items()}
    if mode == "grid":
        points = []
        for combination in itertools.product(*choices.values()):
            labels = [(axis, label) for axis, (label, _) in zip(choices, combination)]
            bundle = {k: v for _, b in combination for k, v in b.items()}
            points.append(point(labels, bundle))
        return points
    center = point([], {})
    points = [center]
    effective = {**recipe_values, **overrides}
    for axis, options in choices.items():
        for label, bundle in options:
            candidate = point([(axis, label)], bundle)
            same_launch = (candidate.accelerate_config, candidate.accelerate_flags) == (config, flags)
            if same_launch and all(k in effective and effective[k] == v for k, v in candidate.overrides.items()):
                center.labels.setdefault(axis, label)  # this value is the recipe's own: the center point is it
                continue
            points.append(candidate)
    return points


def load_sweep(path, output_dir=None):
    """Read and validate a sweep file: every key, every recipe key of every point, the files it names and the BFCL
    categories, so that nothing fails for a typo after hours of training."""
    import train_sft

    path = Path(path)
    if not path.is_file():
        sys.exit(f"sweep.py: sweep file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    if not isinstance(spec, dict):
        fail(where, "a sweep file is a mapping (recipe:, accelerate_config:, grid: ...)")
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        fail(where, f"unknown key(s) {unknown}; a sweep file has {list(SWEEP_KEYS)}"
             + train_sft.did_you_mean(unknown, SWEEP_KEYS))
    for key in ("recipe", "accelerate_config"):
        if not spec.get(key):
            fail(where, f"missing `{key}`")
    recipe = spec["recipe"]
    if not Path(recipe).is_file():
        fail(where, f"recipe file not found: {recipe}")
    recipe_values = yaml.safe_load(Path(recipe).read_text()) or {}
    bfcl = spec.get("bfcl") or {}
    unknown = [k for k in bfcl if k not in BFCL_KEYS]
    if unknown:
        fail(where, f"unknown key(s) {unknown} under bfcl; it has {list(BFCL_KEYS)}" + train_sft.did_you_mean(unknown, BFCL_KEYS))

    points = expand_points(spec, recipe_values, where)
    known = train_sft.recipe_keys()
    problems = [f"point '{p.name}': unknown recipe key '{k}'" + train_sft.did_you_mean([k], known)
                for p in points for k in p.overrides if k not in known]
    problems += [f"point '{p.name}': `output_dir` is set by the sweep (OUTPUT/<point>/train)" for p in points if "output_dir" in p.overrides]
    problems += [f"point '{p.name}': accelerate config not found: {p.accelerate_config}"
                 for p in points if not Path(p.accelerate_config).is_file()]
    score_trained = bfcl.get("score_trained", True)
    for p in points:
        settings = {**recipe_values, **p.overrides}
        if score_trained and settings.get("save_final_model") is False:
            problems.append(f"point '{p.name}': save_final_model is false, so there is no model to score "
                            "(set bfcl: {score_trained: false} for speed and memory points)")
        if settings.get("profile_steps") is not None:
            try:
                step_profile.parse_steps(settings["profile_steps"])
            except ValueError as err:
                problems.append(f"point '{p.name}': {err}")
    names = [p.name for p in points]
    problems += [f"two points are named '{n}'" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        fail(where, "\n  " + "\n  ".join(problems))

    baseline = spec.get("baseline", False)
    if not isinstance(baseline, (bool, str)):
        fail(where, f"baseline must be true, false or the folder of a scored baseline, not {baseline!r}")
    if baseline is True:  # one baseline per base model the points train
        models = list(dict.fromkeys(str({**recipe_values, **p.overrides}.get("model_name_or_path")) for p in points))
        baselines = [Point(name="baseline" if len(models) == 1 else folder_name([("baseline", Path(m).name)]),
                           labels={"baseline": Path(m).name}, baseline_model=m) for m in models]
        points = baselines + points
    categories = bfcl.get("categories") or ["all"]
    categories = categories if isinstance(categories, list) else [categories]
    eval_args = [str(a) for a in bfcl.get("args") or []]
    check_categories(categories, eval_args, where)
    launcher = shlex.split(bfcl["launcher"]) if bfcl.get("launcher") else ["python"]
    out = Path(output_dir or spec.get("output_dir") or Path("runs") / "sweeps" / path.stem)
    return Sweep(path=path, recipe=recipe, recipe_values=recipe_values, output_dir=out, points=points,
                 categories=categories, eval_args=eval_args, eval_launcher=launcher, score_trained=score_trained,
                 baseline_dir=baseline if isinstance(baseline, str) else None)


def check_categories(categories, eval_args, where):
    """The BFCL categories exist where eval_bfcl.py will look (its --data-dir, else the bfcl-eval package)."""
    import eval_bfcl

    data_dir = eval_args[eval_args.index("--data-dir") + 1] if "--data-dir" in eval_args else None
    try:
        eval_bfcl.resolve_categories(categories, Path(data_dir) if data_dir else eval_bfcl.package_data_dir())
    except SystemExit as err:
        fail(where, f"bfcl categories: {err}")


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def program(name):
    """`python` and the stack's console scripts from the interpreter running the sweep (an unactivated venv works)."""
    if name == "python":
        return sys.executable
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def script(name):
    return os.path.relpath(REPO / name)


def flag_values(value):
    """A recipe value as train_sft.py's command-line parser reads it."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if value is None:
        return ["None"]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def train_command(sweep, point, run_dir):
    flags = [x for k, v in point.accelerate_flags.items() for x in (f"--{k}", *flag_values(v))]
    config = yaml.safe_load(Path(point.accelerate_config).read_text()) or {}
    if "main_process_port" not in config and "main_process_port" not in point.accelerate_flags:
        flags += ["--main_process_port", str(bench_fsdp.free_port())]  # sweeps side by side on one node
    overrides = {"run_name": f"{sweep.output_dir.name}/{point.name}", **point.overrides, "output_dir": str(run_dir / "train")}
    args = [x for k, v in overrides.items() for x in (f"--{k}", *flag_values(v))]
    return [program("accelerate"), "launch", "--config_file", point.accelerate_config, *flags,
            script("train_sft.py"), sweep.recipe, *args]


def eval_command(sweep, point, run_dir):
    model = point.baseline_model or str(run_dir / "train")
    launcher = [program(sweep.eval_launcher[0]), *sweep.eval_launcher[1:]]
    return [*launcher, script("eval_bfcl.py"), "--model", model, "--categories", *sweep.categories,
            "--output-dir", str(run_dir / "bfcl"), *sweep.eval_args]


def stages(sweep, point, run_dir):
    """[(stage, command)] of a point: train (unless a baseline), then eval (unless a trained point is not scored)."""
    out = [] if point.baseline_model else [("train", train_command(sweep, point, run_dir))]
    if point.baseline_model or sweep.score_trained:
        out.append(("eval", eval_command(sweep, point, run_dir)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running: one folder per point, point.json as the record, progress from the log tail
# ----------------------------------------------------------------------------------------------------------------


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def identity(sweep):
    """What makes two runs of a sweep the same sweep: the recipe and configs (by content), every point, BFCL settings."""
    configs = sorted({p.accelerate_config for p in sweep.points if p.accelerate_config})
    return {"recipe": sweep.recipe, "recipe_sha256": sha(sweep.recipe),
            "accelerate_configs": {c: sha(c) for c in configs},
            "points": [asdict(p) for p in sweep.points], "baseline_dir": sweep.baseline_dir,
            "bfcl": {"categories": sweep.categories, "args": sweep.eval_args, "score_trained": sweep.score_trained}}


def differences(old, new):
    out = []
    for key in ("recipe", "recipe_sha256", "accelerate_configs", "baseline_dir", "bfcl"):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)} -> now {new.get(key)}")
    old_points = {p["name"]: p for p in old.get("points", [])}
    new_points = {p["name"]: p for p in new["points"]}
    if set(old_points) - set(new_points):
        out.append(f"points no longer in the sweep: {sorted(set(old_points) - set(new_points))}")
    if set(new_points) - set(old_points):
        out.append(f"points not in the sweep that ran here: {sorted(set(new_points) - set(old_points))}")
    out += [f"point '{n}' has other settings: {old_points[n]} -> now {new_points[n]}"
            for n in new_points if n in old_points and old_points[n] != new_points[n]]
    return out


def claim_folder(sweep):
    """Create the sweep folder, or check that it holds this very sweep. Never mixes another sweep's runs in."""
    out, mine = sweep.output_dir, identity(sweep)
    record = out / "sweep.json"
    if record.is_file():
        theirs = json.loads(record.read_text())
        diff = differences(theirs, mine)
        if diff:
            sys.exit(f"sweep.py: {out} holds the runs of another sweep ({theirs.get('sweep_file')}):\n  " + "\n  ".join(diff)
                     + f"\nUse another output_dir (or --output-dir), or delete {out} to start this sweep over.")
        return
    if out.exists() and any(out.iterdir()):
        sys.exit(f"sweep.py: {out} is not empty and holds no sweep.json: refusing to mix this sweep into it; "
                 "use another output_dir (or --output-dir)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, {"sweep_file": str(sweep.path), "created": now(), **mine})


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_json(path, data):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def log_tail(path, limit=160):
    """The last non-empty line of a log (progress bars redraw with \\r: the newest redraw)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1][:limit] if lines else ""


ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?([\w.]*(Error|Exception)|\w+\.py): ")  # "ValueError: ...", "train_sft.py: ..."


def error_summary(path):
    """What a failed command's log says went wrong: its last error lines (the scripts' own messages, exceptions such
    as torch.OutOfMemoryError, not torchrun's ChildFailedError banner), else its last lines."""
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip() and not re.search(r"\d+%\|", line)]
    errors = [line for line in lines if ERROR_LINE.match(line) and "ChildFailedError" not in line]
    return " | ".join(list(dict.fromkeys(errors))[-2:] or lines[-6:])[-600:]


def run_logged(command, log_path, prefix, progress_seconds):
    """Run a command with its output in log_path, printing its newest log line every progress_seconds. Ctrl-C or
    SIGTERM stops the command's whole process group (accelerate then stops its workers) before the sweep exits."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"TOKENIZERS_PARALLELISM": "false", **os.environ})
    shown, last_print = "", time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(min(1.0, progress_seconds))
            tail = log_tail(log_path)
            if tail != shown and time.monotonic() - last_print >= progress_seconds:
                print(f"{prefix} {tail}", flush=True)
                shown, last_print = tail, time.monotonic()
    except BaseException:
        stop_group(proc)
        raise
    return proc.returncode


def stop_group(proc, grace=30):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_point(sweep, point, k, n, progress_seconds):
    """Run one point's stages into its folder; returns its record (status done or failed)."""
    run_dir = sweep.output_dir / point.name
    record_path = run_dir / "point.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    tag = f"[{k}/{n}] {point.name}"
    if record.get("status") == "done":
        print(f"{tag}: done on {record.get('finished')}, skipped", flush=True)
        return record
    if record:
        print(f"{tag}: {record.get('status')} before ({record.get('error') or 'interrupted'}); running it again", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**asdict(point), "status": "running", "attempts": record.get("attempts", 0) + 1, "started": now(),
              "stages": record.get("stages", {}), "seconds": record.get("seconds", {}), "commands": {}}
    for stage, command in stages(sweep, point, run_dir):
        if record["stages"].get(stage) == "done":
            print(f"{tag}: {stage} finished in an earlier attempt", flush=True)
            continue
        if stage == "train":
            if any((run_dir / "train").glob("checkpoint-*/trainer_state.json")):
                command += ["--resume_from_checkpoint", "true"]
                print(f"{tag}: resuming training from the last complete checkpoint in {run_dir / 'train'}", flush=True)
            shutil.rmtree(run_dir / "bfcl", ignore_errors=True)  # scores of an earlier model, if any
        record["commands"][stage] = shlex.join(command)
        write_json(record_path, record)
        log_path = run_dir / f"{stage}.log"
        print(f"{tag}: {stage} (log: {log_path})", flush=True)
        started = time.monotonic()
        rc = run_logged(command, log_path, f"{tag} {stage}:", progress_seconds)
        record.setdefault("seconds", {})[stage] = round(time.monotonic() - started, 1)
        if rc != 0:
            record.update(status="failed", finished=now(), error=f"{stage} exited {rc}: {error_summary(log_path)}")
            write_json(record_path, record)
            print(f"{tag}: FAILED ({record['error'][-300:]})\n{tag}: see {log_path}", flush=True)
            return record
        record["stages"][stage] = "done"
        write_json(record_path, record)
    record.update(status="done", finished=now(), error=None)
    write_json(record_path, record)
    print(f"{tag}: done in {sum(record['seconds'].values()) if record.get('seconds') else 0:.0f}s", flush=True)
    return record


def log_to_wandb(row):
    """Under a W&B sweep agent, put the point's BFCL score and cost on the agent's run, so the W&B sweep can
    compare points by them (training already logged its curves to that run through report_to: wandb)."""
    import wandb

    run = wandb.init(resume="allow")
    run.summary.update({f"sweep/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
    run.finish()


def run_sweep(sweep, args):
    chosen = sweep.points
    if args.point:
        names = [p.name for p in sweep.points]
        unknown = [n for n in args.point if n not in names]
        if unknown:
            sys.exit(f"sweep.py: {sweep.path} has no point {unknown}; its points: {names}")
        chosen = [p for p in sweep.points if p.name in args.point]
    if args.dry_run:
        theirs = read_json(sweep.output_dir / "sweep.json")
        diff = differences(theirs, identity(sweep)) if theirs else []
        if diff:
            print(f"warning: {sweep.output_dir} holds the runs of another sweep; a real run would stop:\n  " + "\n  ".join(diff))
        for k, point in enumerate(chosen, 1):
            run_dir = sweep.output_dir / point.name
            record = run_dir / "point.json"
            status = json.loads(record.read_text()).get("status") if record.is_file() else "pending"
            print(f"[{k}/{len(chosen)}] {point.name} ({status}: {'would skip' if status == 'done' else 'would run'})")
            for stage, command in stages(sweep, point, run_dir):
                print(f"  {stage}: {shlex.join(command)}")
        return 0
    claim_folder(sweep)
    print(f"sweep: {len(chosen)} point(s) of {sweep.path} into {sweep.output_dir}", flush=True)
    failed = []
    for k, point in enumerate(chosen, 1):
        record = run_point(sweep, point, k, len(chosen), args.progress_seconds)
        if record["status"] != "done":
            failed.append(point.name)
        try:  # a table that cannot be written must not stop hours of training; `sweep.py report` writes it later
            rows = write_report(sweep_runs(sweep.output_dir), sweep.output_dir, args.price_per_gpu_hour, args.peak_tflops,
                                baseline=sweep.baseline_dir, title=f"Sweep {sweep.path} ({sweep.output_dir})")
        except (Exception, SystemExit) as err:
            print(f"sweep: the results table was not written ({type(err).__name__}: {err}); the runs go on", flush=True)
            continue
        if os.environ.get("WANDB_SWEEP_ID") and record["status"] == "done":
            log_to_wandb(next(r for r in rows if r["run"] == point.name))
    print(f"sweep: {len(chosen) - len(failed)} of {len(chosen)} point(s) done"
          + (f"; failed: {', '.join(failed)} (errors in their point.json and the table)" if failed else "")
          + f"; results in {sweep.output_dir / 'results.md'}", flush=True)
    return 1 if failed else 0


def wandb_sweep_config(sweep):
    """A W&B sweep over this sweep's points: each W&B run is `sweep.py SWEEP --point NAME`."""
    config = {
        "name": sweep.output_dir.name,
        "program": script("sweep.py"),
        "method": "grid",
        "metric": {"name": "sweep/bfcl_overall", "goal": "maximize"},
        "parameters": {"point": {"values": [p.name for p in sweep.points]}},
        "command": ["${env}", "${interpreter}", "${program}", str(sweep.path), "${args}"],
    }
    return (f"# W&B sweep over the {len(sweep.points)} points of {sweep.path}: `wandb sweep FILE`, then "
            "`wandb agent ENTITY/PROJECT/SWEEP_ID` on each node\n" + yaml.safe_dump(config, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Report: one table for any set of run folders
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = ["run", "status", "settings", "devices", "train_seconds", "train_time_measured", "gpu_hours", "real_tokens_per_s_per_gpu", "mfu_percent",
           "peak_memory_gb_per_gpu", "train_loss", "eval_loss", "bfcl_non_live", "bfcl_live", "bfcl_irrelevance",
           "bfcl_overall", "points_over_baseline", "cost_usd", "usd_per_point", "compute_percent",
           "exposed_comm_percent", "idle_percent", "device", "peak_tflops", "run_dir"]
SETTINGS_NOT_COMPARED = {"output_dir", "logging_dir", "run_name"}  # differ by construction


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def sweep_runs(sweep_dir):
    """The folders of a sweep's points that have run (in sweep order), after the baseline it refers to if that exists."""
    record = read_json(Path(sweep_dir) / "sweep.json")
    reference = [Path(record["baseline_dir"])] if record.get("baseline_dir") and Path(record["baseline_dir"]).is_dir() else []
    if record.get("baseline_dir") and not reference:
        print(f"sweep.py: baseline folder {record['baseline_dir']} not found (yet): no points over baseline", file=sys.stderr)
    return reference + [Path(sweep_dir) / p["name"] for p in record["points"] if (Path(sweep_dir) / p["name"] / "point.json").is_file()]


def expand_run_dirs(dirs):
    """Sweep folders become their points' folders (in sweep order); other folders stand for one run each."""
    out = []
    for d in map(Path, dirs):
        if not d.is_dir():
            sys.exit(f"sweep.py report: not a folder: {d}")
        out += sweep_runs(d) if (d / "sweep.json").is_file() else [d]
    return list({d.resolve(): d for d in out}.values())  # a baseline two sweeps share appears once


def load_run(run_dir):
    """What a run folder holds: point.json (sweep.py), run_summary.json (train_sft.py's output_dir) and BFCL
    summary.json (eval_bfcl.py's output dir), directly or in train/ and bfcl/."""
    run_dir = Path(run_dir)
    run = {"dir": run_dir, "point": read_json(run_dir / "point.json"),
           "train": next((s for s in (read_json(run_dir / "run_summary.json"), read_json(run_dir / "train" / "run_summary.json")) if s), None),
           "bfcl": next((s for s in (read_json(run_dir / "bfcl" / "summary.json"), read_json(run_dir / "summary.json"))
                         if s and "categories" in s), None)}
    if run["bfcl"] and not run["train"]:  # eval_bfcl.py's folder of a trained model: that model's training is the run's
        scored = (run["bfcl"].get("generation") or {}).get("model")
        run["train"] = read_json(Path(scored) / "run_summary.json") if scored else None
    train_dir = run_dir / "train" if (run_dir / "train" / "run_summary.json").is_file() else run_dir
    run["profile"] = read_json(train_dir / "profile" / "breakdown.json")
    if not (run["point"] or run["train"] or run["bfcl"]):
        sys.exit(f"sweep.py report: {run_dir} holds no point.json (sweep.py), run_summary.json (train_sft.py) or BFCL "
                 "summary.json (eval_bfcl.py), neither directly nor in train/ or bfcl/")
    return run


def bfcl_scores(summary):
    """(non-live, live, irrelevance, overall) in percent. Overall (single-turn) is the leaderboard's v4 Overall
    restricted to its single-turn parts: those weigh 10/10/10 (Non-Live AST, Live AST, Irrelevance), so their
    unweighted mean. A custom data set (no official categories) has only its own `overall (custom)`."""
    if not summary:
        return None, None, None, None
    aggregates = summary.get("aggregates") or {}
    pick = lambda name: (aggregates.get(name) or {}).get("accuracy")  # noqa: E731
    parts = [pick("Non-Live AST"), pick("Live AST"), pick("Irrelevance")]
    if all(p is not None for p in parts):
        overall = sum(parts) / 3
    else:
        overall = pick("overall (custom)") if not any(p is not None for p in parts) else None
    percent = lambda x: None if x is None else 100 * x  # noqa: E731
    return (*map(percent, parts), percent(overall))


def trained_settings(summary):
    settings = dict(summary.get("settings") or {})
    settings.update(summary.get("launch") or {})
    return {k: v for k, v in settings.items() if k not in SETTINGS_NOT_COMPARED}


def differing(runs):
    """Per run, the settings whose values are not the same on every trained run ("key=value; ...")."""
    settings = [trained_settings(r["train"]) if r["train"] else None for r in runs]
    trained = [s for s in settings if s is not None]
    keys = sorted({k for s in trained for k in s})
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in trained}) > 1]
    out = []
    for run, s in zip(runs, settings):
        if s is None:
            model = ((run["bfcl"] or {}).get("generation") or {}).get("model") or (run["point"] or {}).get("baseline_model")
            out.append(f"model={model} (no training)" if model else "")
        else:
            out.append("; ".join(f"{k}={value_label(s.get(k))}" for k in differ))
    return out


def cost_columns(gpu_hours, points_over_baseline, price_per_gpu_hour):
    """Cost of the training and the cost of each BFCL point it gained (None when it gained nothing)."""
    cost = gpu_hours * price_per_gpu_hour
    per_point = cost / points_over_baseline if points_over_baseline and points_over_baseline > 0 else None
    return cost, per_point


def peak_tflops_of(device, override, cache={}):
    """Peak FLOP/s per device for MFU: --peak-tflops, else the datasheet (bench_fsdp.GPU_PEAK_TFLOPS), else on CPU the
    best 1-thread fp32 matmul measured on this machine now (as bench_fsdp.py does)."""
    if override:
        return override
    if str(device or "").startswith("cpu"):  # "cpu" or train_sft.py's "cpu (<machine>)"; None in older summaries
        if "cpu" not in cache:
            cache["cpu"] = bench_fsdp.measured_cpu_peak_tflops(threads=1)
        return cache["cpu"]
    return next((v for k, v in bench_fsdp.GPU_PEAK_TFLOPS.items() if k in str(device)), None)


def report_rows(run_dirs, price_per_gpu_hour, peak_tflops=None, baseline=None):
    runs = [load_run(d) for d in run_dirs]
    settings = differing(runs)
    rows = []
    for run, setting in zip(runs, settings):
        point, train = run["point"] or {}, run["train"]
        status = point.get("status") or "done"
        if status == "failed":
            status = f"failed: {point.get('error')}"
        row = {"run": point.get("name") or run["dir"].name, "status": status, "settings": setting, "run_dir": str(run["dir"]),
               "baseline": not train and (bool(point.get("baseline_model")) or bool(run["bfcl"]))}
        if train:
            # The node time of the training command (launch, loading, saving included) where the sweep timed it
            wall = (point.get("seconds") or {}).get("train")
            seconds = wall or train["train_seconds"]
            hours = seconds / 3600
            speed = bench_fsdp.measure(train, warmup_steps=0)
            tokens_per_s = speed["real_tokens_per_second_per_device"]
            if not tokens_per_s:  # fewer than two logs: the whole run's average
                last = max((log["num_tokens"] for log in train["log_history"] if "num_tokens" in log), default=0)
                tokens_per_s = last / train["train_seconds"] / train["num_processes"] if train["train_seconds"] else None
            mfu = None
            peak = peak_tflops_of(train.get("device"), peak_tflops)
            row.update(device=train.get("device"), peak_tflops=peak)
            if train.get("model_config") and train.get("attention_span") and peak and tokens_per_s:
                flops = estimate_memory.flops_per_token(train["model_config"], train["attention_span"])
                mfu = 100 * tokens_per_s * flops / (peak * 1e12)
            train_losses = [log["loss"] for log in train["log_history"] if "loss" in log]
            eval_losses = [log["eval_loss"] for log in train["log_history"] if "eval_loss" in log]
            row.update(devices=train["num_processes"], train_seconds=seconds, gpu_hours=hours * train["num_processes"],
                       train_time_measured="train command, launch to exit" if wall else "training loop (run_summary.json)",
                       real_tokens_per_s_per_gpu=tokens_per_s, mfu_percent=mfu,
                       peak_memory_gb_per_gpu=bench_fsdp.peak_memory(train)[0],
                       train_loss=train_losses[-1] if train_losses else None,
                       eval_loss=eval_losses[-1] if eval_losses else None)
        elif row["baseline"]:
            row.update(gpu_hours=0.0)
        row["bfcl_non_live"], row["bfcl_live"], row["bfcl_irrelevance"], row["bfcl_overall"] = bfcl_scores(run["bfcl"])
        ranks = [b for b in ((run["profile"] or {}).get("per_rank") or []) if "error" not in b]
        if ranks:  # the mean over ranks
            for column, key in (("compute_percent", "compute"), ("exposed_comm_percent", "exposed_comm"), ("idle_percent", "idle")):
                row[column] = sum(b[key] for b in ranks) / len(ranks)
        row["model"] = (train or {}).get("settings", {}).get("model_name_or_path") or point.get("baseline_model") \
            or ((run["bfcl"] or {}).get("generation") or {}).get("model")
        rows.append(row)

    for row in rows:
        base = pick_baseline(row, rows, baseline)
        if base is not None and row["bfcl_overall"] is not None and base["bfcl_overall"] is not None:
            row["points_over_baseline"] = row["bfcl_overall"] - base["bfcl_overall"]
        if row.get("gpu_hours") is not None:
            row["cost_usd"], row["usd_per_point"] = cost_columns(row["gpu_hours"], row.get("points_over_baseline"), price_per_gpu_hour)
    return rows


def pick_baseline(row, rows, baseline_dir):
    """The untrained run a row is compared with: --baseline, else the only baseline, else the one of the same model."""
    if baseline_dir:
        return next((r for r in rows if Path(r["run_dir"]).resolve() == Path(baseline_dir).resolve()), None)
    candidates = [r for r in rows if r["baseline"]]
    if len(candidates) == 1:
        return candidates[0]
    return next((r for r in candidates if r["model"] == row["model"]), None)


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def fmt_cell(row, column):
    value = row.get(column)
    if column == "usd_per_point" and value is None and not row["baseline"] and row.get("cost_usd") is not None \
            and row.get("points_over_baseline") is not None:
        return "no gain"
    if value is None or value == "":
        return "—"
    if column == "train_seconds":
        return duration(value)
    digits = {"gpu_hours": 3, "real_tokens_per_s_per_gpu": 0, "mfu_percent": 2, "peak_memory_gb_per_gpu": 2,
              "train_loss": 3, "eval_loss": 3, "cost_usd": 2, "usd_per_point": 2}.get(column, 1)
    if column == "points_over_baseline":
        return f"{value:+.2f}"
    return bench_fsdp.fmt(float(value), digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


MARKDOWN_COLUMNS = [("run", "run"), ("settings", "settings that differ"), ("train_seconds", "train time"),
                    ("gpu_hours", "GPU x h"), ("real_tokens_per_s_per_gpu", "real tok/s/GPU"), ("mfu_percent", "MFU %"),
                    ("peak_memory_gb_per_gpu", "peak GB/GPU"), ("train_loss", "train loss"), ("eval_loss", "eval loss"),
                    ("bfcl_non_live", "non-live"), ("bfcl_live", "live"), ("bfcl_irrelevance", "irrelevance"),
                    ("bfcl_overall", "overall"), ("points_over_baseline", "pts vs base"), ("cost_usd", "cost $"),
                    ("usd_per_point", "$/pt"), ("exposed_comm_percent", "exposed comm %"), ("status", "status")]


def write_report(run_dirs, output_dir, price_per_gpu_hour, peak_tflops=None, baseline=None, title="Runs"):
    rows = report_rows(run_dirs, price_per_gpu_hour, peak_tflops, baseline)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{c: "no gain" if fmt_cell(r, c) == "no gain" else "" if r.get(c) is None else r[c] for c in COLUMNS}
                          for r in rows])
    lines = [f"# {title}", "",
             f"Cost: GPU x hours of training (a sweep point's train command from launch to exit, else the training loop of "
             f"run_summary.json) at ${price_per_gpu_hour:.3f} per GPU-hour; $/pt: cost per BFCL point gained over "
             "the untrained baseline. BFCL in %, single-turn only: overall is the mean of non-live (AST), live (AST) "
             "and irrelevance, the leaderboard's v4 Overall restricted to its single-turn parts (equal weights). "
             "Real tok/s/GPU: non-padding tokens, warm-up log excluded; MFU: (6N + 12·L·d·s) FLOPs per real token "
             "against the device's peak; peak GB/GPU: the largest rank's peak (GPU: allocated; CPU: RSS); "
             "exposed comm %: share of profiled step time in collectives not hidden by compute (profile_steps).", "",
             "| " + " | ".join(h for _, h in MARKDOWN_COLUMNS) + " |",
             "|" + "|".join("---" if c in ("run", "settings", "status") else "---:" for c, _ in MARKDOWN_COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt_cell(row, c).replace("|", "/") for c, _ in MARKDOWN_COLUMNS) + " |")
    peaks = {r["device"]: r["peak_tflops"] for r in rows if r.get("peak_tflops")}
    lines += ["", "MFU against: " + ", ".join(f"{device} {peak:.4g} TFLOP/s" for device, peak in peaks.items())
              + (" (CPU: the best 1-thread fp32 matmul measured when this table was written, so it moves with the load)"
                 if "cpu" in peaks and not peak_tflops else "")] if peaks else []
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    write_plots(rows, output_dir)
    return rows


def write_plots(rows, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["baseline"] and r["bfcl_overall"] is not None), None)
    trained = [r for r in rows if r.get("devices")]
    plots = (("score_vs_cost.png", "cost_usd", "training cost ($)", "bfcl_overall", "BFCL overall, single-turn (%)", rows),
             ("score_vs_memory.png", "peak_memory_gb_per_gpu", "peak memory per GPU (GB)", "bfcl_overall",
              "BFCL overall, single-turn (%)", trained),
             ("speed_vs_memory.png", "peak_memory_gb_per_gpu", "peak memory per GPU (GB)", "real_tokens_per_s_per_gpu",
              "real tokens/s per GPU", trained))
    for file, x_key, x_label, y_key, y_label, candidates in plots:
        points = [r for r in candidates if r.get(x_key) is not None and r.get(y_key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=80)
        ax.scatter([r[x_key] for r in points], [r[y_key] for r in points], color="tab:blue")
        for i, r in enumerate(sorted(points, key=lambda r: r[x_key])):  # neighbours' labels alternate above and below
            ax.annotate(r["run"], (r[x_key], r[y_key]), fontsize=7, xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
        ax.margins(x=0.2, y=0.15)
        if y_key == "bfcl_overall" and base is not None and base not in points:
            ax.axhline(base["bfcl_overall"], color="grey", linestyle="--", linewidth=1, label=f"{base['run']} (untrained)")
            ax.legend(fontsize=7)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        fig.tight_layout()
        fig.savefig(output_dir / file)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="sweep.py report", description="One results table for any set of run folders.")
        parser.add_argument("run_dirs", nargs="+", help="sweep folders (all their points), point folders, train_sft.py "
                            "output dirs or eval_bfcl.py output dirs")
        parser.add_argument("--output", type=Path, default=Path("runs/report"), help="where results.md/.csv and plots go")
        parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR,
                            help="default: the plan's $23 per hour for 8 GPUs = $2.875")
        parser.add_argument("--peak-tflops", type=float, help="peak per device for MFU (default: datasheet bf16 for known "
                            "GPUs; CPU: a 1-thread fp32 matmul measured now)")
        parser.add_argument("--baseline", help="the untrained run to count points from (default: the only baseline, "
                            "or the one of the same model)")
        args = parser.parse_args(argv[1:])
        rows = write_report(expand_run_dirs(args.run_dirs), args.output, args.price_per_gpu_hour, args.peak_tflops,
                            args.baseline, title=f"Runs ({len(args.run_dirs)} folder(s))")
        print((args.output / "results.md").read_text())
        print(f"wrote {args.output}/results.md, results.csv and plots for {len(rows)} run(s)")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--dry-run", action="store_true", help="validate, print every point's commands, run nothing")
    parser.add_argument("--point", action="append", help="run only this point (repeatable): for several nodes or a W&B agent")
    parser.add_argument("--output-dir", help="the sweep folder (default: the file's output_dir)")
    parser.add_argument("--wandb-sweep", action="store_true", help="print a W&B sweep config over this sweep's points")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR)
    parser.add_argument("--peak-tflops", type=float, help="peak per device for MFU in the table")
    parser.add_argument("--progress-seconds", type=float, default=20.0, help="how often the current log line is shown")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep_file, args.output_dir)
    if args.wandb_sweep:
        print(wandb_sweep_config(sweep), end="")
        return 0
    return run_sweep(sweep, args)


if __name__ == "__main__":
    sys.exit(main())
