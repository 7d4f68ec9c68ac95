"""The study's sweeps: a sweep file (sweep.py documents its keys) -> checked points -> the real commands of each point
(`accelerate launch ... train_sft.py RECIPE --key value ...`, then `eval_bfcl.py ...`), run one point at a time into
its own folder with point.json as its record, resumable and never mixed with another sweep's runs.
"""

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fcsft.bfcl_data import package_data_dir, resolve_categories
from fcsft.distributed import free_port
from fcsft.errors import UserError, did_you_mean
from fcsft.recipe import recipe_keys
from fcsft.step_profile import parse_steps
from fcsft.study_report import read_json, sweep_runs, value_label, write_report

REPO = Path(__file__).resolve().parent.parent  # where the scripts are
SWEEP_KEYS = ("recipe", "accelerate_config", "accelerate_flags", "output_dir", "overrides", "grid", "one_at_a_time",
              "points", "baseline", "bfcl")


BFCL_KEYS = ("categories", "args", "launcher", "score_trained")


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
    raise UserError(f"{where}: {message}")


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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    spec = read_yaml(path)
    where = str(path)
    if not isinstance(spec, dict):
        fail(where, "a sweep file is a mapping (recipe:, accelerate_config:, grid: ...)")
    unknown = [k for k in spec if k not in SWEEP_KEYS]
    if unknown:
        fail(where, f"unknown key(s) {unknown}; a sweep file has {list(SWEEP_KEYS)}"
             + did_you_mean(unknown, SWEEP_KEYS))
    for key in ("recipe", "accelerate_config"):
        if not spec.get(key):
            fail(where, f"missing `{key}`")
    recipe = spec["recipe"]
    if not Path(recipe).is_file():
        fail(where, f"recipe file not found: {recipe}")
    recipe_values = read_yaml(Path(recipe))
    bfcl = spec.get("bfcl") or {}
    unknown = [k for k in bfcl if k not in BFCL_KEYS]
    if unknown:
        fail(where, f"unknown key(s) {unknown} under bfcl; it has {list(BFCL_KEYS)}" + did_you_mean(unknown, BFCL_KEYS))

    points = expand_points(spec, recipe_values, where)
    known = recipe_keys()
    problems = [f"point '{p.name}': unknown recipe key '{k}'" + did_you_mean([k], known)
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
                parse_steps(settings["profile_steps"])
            except UserError as err:
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
    check_eval_args(eval_args, where)
    launcher = shlex.split(bfcl["launcher"]) if bfcl.get("launcher") else ["python"]
    out = Path(output_dir or spec.get("output_dir") or Path("runs") / "sweeps" / path.stem)
    return Sweep(path=path, recipe=recipe, recipe_values=recipe_values, output_dir=out, points=points,
                 categories=categories, eval_args=eval_args, eval_launcher=launcher, score_trained=score_trained,
                 baseline_dir=baseline if isinstance(baseline, str) else None)


def read_yaml(path):
    """A YAML file's contents; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


SWEEP_SETS = ("--model", "--categories", "--output-dir")  # eval_bfcl.py flags the sweep gives itself


def check_eval_args(eval_args, where):
    """bfcl.args checked against eval_bfcl.py's own flags (its --help) before any training, so that a typo does not
    fail the first evaluation hours later (and a fixed file is not then a different sweep)."""
    given = [arg.split("=")[0] for arg in eval_args if arg.startswith("--")]
    if not given:
        return
    help_text = subprocess.run([sys.executable, script("eval_bfcl.py"), "--help"], capture_output=True, text=True,
                               cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    known = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)))
    if not known:
        return  # eval_bfcl.py could not even print its help: its own run will say why
    problems = [f"{flag} is set by the sweep itself" for flag in given if flag in SWEEP_SETS]
    problems += [f"eval_bfcl.py has no flag {flag}" + did_you_mean([flag], known) for flag in given
                 if flag not in known and sum(k.startswith(flag) for k in known) != 1]  # argparse takes unique prefixes
    if problems:
        fail(where, "bfcl.args: " + "; ".join(problems))


def check_categories(categories, eval_args, where):
    """The BFCL categories exist where eval_bfcl.py will look (its --data-dir, else the bfcl-eval package)."""
    data_dir = eval_args[eval_args.index("--data-dir") + 1] if "--data-dir" in eval_args else None
    try:
        resolve_categories(categories, Path(data_dir) if data_dir else package_data_dir())
    except UserError as err:
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
        flags += ["--main_process_port", str(free_port())]  # sweeps side by side on one node
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
            raise UserError(f"{out} holds the runs of another sweep ({theirs.get('sweep_file')}):\n  " + "\n  ".join(diff)
                     + f"\nUse another output_dir (or --output-dir), or delete {out} to start this sweep over.")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no sweep.json: refusing to mix this sweep into it; "
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
    if HELD_LOCK:  # a rerun must see this command alive even if the sweep itself is killed with SIGKILL
        write_json(HELD_LOCK["path"], {**HELD_LOCK["record"], "child_pid": proc.pid})
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


class SweepStopped(UserError):
    """SIGTERM, SIGHUP or Ctrl-C: the running command has been stopped; the sweep exits with one line."""


def stop_on_signals():
    """SIGTERM and SIGHUP (a batch system's stop, a closed terminal) become an exception as Ctrl-C does, so that
    run_logged stops the command's whole process group before the sweep exits: otherwise the sweep dies alone and its
    training runs on, and a rerun would train a second process into the same folder."""
    def stop(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # one stop at a time: stop_group is already waiting for the command
        raise SweepStopped(f"stopped by {signal.Signals(signum).name}; the running command was stopped too. Run the "
                           "same command again to continue (finished points are kept, a training resumes from its last "
                           "complete checkpoint)")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)


HELD_LOCK = {}  # the point lock this process holds: run_logged adds the running command's pid to it


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def point_lock(run_dir):
    """OUTPUT/<point>/point.lock while a sweep runs the point: its host, its pid and its command's pid. Another sweep
    (a rerun, another node's `--point`) is refused while either process lives; a lock whose processes are gone (a
    crashed or killed sweep) is taken over, so it never goes stale. A lock from another host cannot be checked: the
    message says how to remove it."""
    path = run_dir / "point.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "child_pid": None, "since": now()}
    holder = read_json(path) if path.is_file() else None
    if holder:
        pids = [p for p in (holder.get("pid"), holder.get("child_pid")) if p]
        if holder.get("host") != me["host"]:
            raise UserError(f"{path}: the point is being run by pid {holder.get('pid')} on {holder.get('host')} since "
                            f"{holder.get('since')}; if that run is gone, delete {path}")
        if any(process_alive(pid) for pid in pids):
            raise UserError(f"{path}: the point is being run by another process (sweep pid {holder.get('pid')}, command "
                            f"pid {holder.get('child_pid')}, since {holder.get('since')}): two trainings must never "
                            "share a folder; wait for it, or stop it first")
        print(f"{run_dir.name}: taking over the lock of a sweep that is gone (pid {holder.get('pid')})", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, me)
    HELD_LOCK.update(path=path, record=me)
    try:
        yield
    finally:
        HELD_LOCK.clear()
        path.unlink(missing_ok=True)


def run_point(sweep, point, k, n, progress_seconds):
    """Run one point's stages into its folder, holding its lock; returns its record (status done or failed)."""
    record = read_json(sweep.output_dir / point.name / "point.json")
    if record and record.get("status") == "done":  # skipped without a lock: nothing runs
        return run_point_stages(sweep, point, k, n, progress_seconds)
    with point_lock(sweep.output_dir / point.name):
        return run_point_stages(sweep, point, k, n, progress_seconds)


def add_attempt(record, stage, seconds, estimated=False):
    """One attempt's wall time of a stage: `seconds[stage]` is the sum over attempts, `attempt_seconds` each one."""
    record.pop("running", None)
    earlier = [record["seconds"][stage]] if stage in record.get("seconds", {}) else []  # a record from before attempts
    record.setdefault("attempt_seconds", {}).setdefault(stage, earlier).append(round(seconds, 1))
    record.setdefault("seconds", {})[stage] = round(sum(record["attempt_seconds"][stage]), 1)
    if estimated:
        record.setdefault("estimated_attempts", []).append(stage)


def add_killed_attempt(record, log_path):
    """An attempt whose sweep was killed outright (SIGKILL, a node lost) recorded no time: its stage ran from its start
    until its log was last written."""
    running = record.get("running")
    if running and Path(log_path).name == f"{running['stage']}.log" and Path(log_path).is_file():
        add_attempt(record, running["stage"], max(0.0, Path(log_path).stat().st_mtime - running["started_unix"]), True)


def run_point_stages(sweep, point, k, n, progress_seconds):
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
              "stages": record.get("stages", {}), "seconds": record.get("seconds", {}), "commands": {},
              **{key: record[key] for key in ("attempt_seconds", "running", "estimated_attempts") if key in record}}
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
        add_killed_attempt(record, log_path)
        started = time.monotonic()
        record["running"] = {"stage": stage, "started_unix": time.time()}
        write_json(record_path, record)
        try:
            rc = run_logged(command, log_path, f"{tag} {stage}:", progress_seconds)
        finally:  # stopped or not, the attempt's time counts: the table's time and cost cover every attempt
            add_attempt(record, stage, time.monotonic() - started)
            write_json(record_path, record)
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
            raise UserError(f"{sweep.path} has no point {unknown}; its points: {names}")
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
    stop_on_signals()
    print(f"sweep: {len(chosen)} point(s) of {sweep.path} into {sweep.output_dir}", flush=True)
    failed = []
    for k, point in enumerate(chosen, 1):
        record = run_point(sweep, point, k, len(chosen), args.progress_seconds)
        if record["status"] != "done":
            failed.append(point.name)
        try:  # a table that cannot be written must not stop hours of training; `sweep.py report` writes it later
            rows = write_report(sweep_runs(sweep.output_dir), sweep.output_dir, args.price_per_gpu_hour, args.peak_tflops,
                                baseline=sweep.baseline_dir, title=f"Sweep {sweep.path} ({sweep.output_dir})")
        except Exception as err:  # noqa: BLE001
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
