"""sweep.py and step_profile.py: a real sweep of the tiny model (2-process FSDP2 on CPU), killed and started again;
the results table, the plots and the profile it leaves; the cost arithmetic and the sweep-file rules without launches.

One sweep serves most assertions (module-scoped): a baseline and three points, of which one fails (its data file is
missing), killed while the second point starts and then run again to the end.
"""

import csv
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from conftest import PYTHON, REPO, run

import sweep
from fcsft import (
    bfcl_data,
    memory_estimate,
    metrics,
    step_profile,
    study_report,
    sweeps,
)
from fcsft import recipe as fcsft_recipe
from fcsft.errors import UserError


def kill_tree(pid):
    """SIGKILL a process and every descendant (torchrun's workers run in sessions of their own): a crash, not a stop."""
    parent = psutil.Process(pid)
    procs = parent.children(recursive=True) + [parent]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def shortest_bfcl_entries(out):
    """BFCL's own format with the official category names (so the leaderboard's aggregates apply), one entry each:
    the one with the shortest prompt, because the tiny model's generation time grows with the longest prompt."""

    (out / "possible_answer").mkdir(parents=True)
    for category in bfcl_data.NON_LIVE + bfcl_data.LIVE:
        entries, answers = bfcl_data.load_category(bfcl_data.package_data_dir(), category)
        i = min(range(len(entries)), key=lambda i: len(json.dumps(entries[i])))
        (out / f"BFCL_v4_{category}.json").write_text(json.dumps(entries[i]) + "\n")
        if answers:
            (out / "possible_answer" / f"BFCL_v4_{category}.json").write_text(json.dumps(answers[i]) + "\n")
    return out


@pytest.fixture(scope="module")
def finished_sweep(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  report_to=["none"], max_samples=80, max_steps=4, per_device_train_batch_size=2, max_length=512,
                  logging_steps=1, eval_split_size=8, eval_strategy="steps", eval_steps=4)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    points = [{"name": "lr_high", "learning_rate": 3.0e-3}, {"name": "lr_low", "learning_rate": 1.0e-3},
              {"name": "missing_data", "dataset_name": str(tmp / "missing.jsonl")}]
    data = shortest_bfcl_entries(tmp / "bfcl_data")
    spec = {"recipe": str(tmp / "recipe.yaml"), "accelerate_config": "accelerate_configs/cpu_fsdp_full.yaml",
            "output_dir": str(tmp / "out"), "overrides": {"profile_steps": "2-3"}, "points": points, "baseline": True,
            "bfcl": {"categories": ["all"], "args": ["--data-dir", str(data), "--max-new-tokens", "4"]}}
    sweep_file = tmp / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [PYTHON, "sweep.py", sweep_file, "--progress-seconds", "1"]

    # First run: killed (the sweep and all its children, SIGKILL) as soon as the second trained point starts
    with open(tmp / "first_run.log", "w") as log:
        proc = subprocess.Popen([str(c) for c in command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    started = tmp / "out" / "lr_low" / "point.json"
    deadline = time.time() + 400
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    survivors = kill_tree(proc.pid)
    assert not survivors, f"processes survived the kill: {survivors}"
    assert started.exists(), (tmp / "first_run.log").read_text()[-3000:]
    killed = {name: json.loads((tmp / "out" / name / "point.json").read_text()) for name in ("baseline", "lr_high", "lr_low")}

    second = run(command, check=False, timeout=600)
    return {"dir": tmp / "out", "sweep_file": sweep_file, "killed": killed, "second": second, "tmp": tmp}


def point(finished_sweep, name):
    return json.loads((finished_sweep["dir"] / name / "point.json").read_text())


def test_restart_runs_only_what_was_missing(finished_sweep):
    killed, out = finished_sweep["killed"], finished_sweep["second"].stdout
    assert killed["baseline"]["status"] == killed["lr_high"]["status"] == "done"
    assert killed["lr_low"]["status"] == "running"  # killed mid-point
    assert "[1/4] baseline: done on" in out and "[2/4] lr_high: done on" in out and out.count(", skipped\n") == 2
    assert "[3/4] lr_low: running before (interrupted); running it again" in out
    assert point(finished_sweep, "lr_high") == killed["lr_high"]  # untouched by the second run
    assert point(finished_sweep, "lr_low")["status"] == "done" and point(finished_sweep, "lr_low")["attempts"] == 2
    assert (finished_sweep["dir"] / "lr_high" / "train.log").read_text().count("\n$ ") == 1  # trained once
    assert "[3/4] lr_low train:" in out  # progress: point k of n and the log tail


def test_failed_point_is_recorded_and_the_others_run(finished_sweep):
    failed = point(finished_sweep, "missing_data")
    assert failed["status"] == "failed"
    assert failed["error"] == f"train exited 1: train_sft.py: dataset_name file not found: {finished_sweep['tmp'] / 'missing.jsonl'}"
    second = finished_sweep["second"]
    assert second.returncode == 1  # the sweep went on, then said so
    assert "3 of 4 point(s) done; failed: missing_data" in second.stdout


def test_results_table_and_plots_have_every_column(finished_sweep):
    out = finished_sweep["dir"]
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["baseline", "lr_high", "lr_low", "missing_data"]
    for name in ("lr_high", "lr_low"):
        empty = [c for c in study_report.COLUMNS if rows[name][c] == ""]
        # the sweep's BFCL data is single-turn: no Multi-Turn; the leaderboard's Overall counts it (and agentic) 0
        assert empty == ["bfcl_multi_turn"], f"{name}: empty columns {empty}"
        assert rows[name]["bfcl_overall_leaderboard_parts"] == "Non-Live+Live+Irrelevance"
        # (10 non-live + 10 live + 10 irrelevance) / 100 = 0.3 x their mean, the single-turn overall
        assert float(rows[name]["bfcl_overall_leaderboard"]) == pytest.approx(0.3 * float(rows[name]["bfcl_overall"]))
        r = rows[name]
        # lr_low was killed as it started, and may say "(2 attempts: ...)"
        assert r["status"].startswith("done") and r["devices"] == "2" and r["device"].startswith("cpu")
        assert r["settings"] == f"learning_rate={'0.003' if name == 'lr_high' else '0.001'}"  # only what differs
        assert 0 < float(r["mfu_percent"]) < 100 and 0.1 < float(r["peak_memory_gib_per_gpu"]) < 20
        assert float(r["eval_loss"]) > 0 and float(r["train_loss"]) > 0
        train_command_seconds = point(finished_sweep, name)["seconds"]["train"]  # launch to exit: the node's time
        assert r["train_time_measured"] == "train command, launch to exit"
        assert float(r["gpu_hours"]) == pytest.approx(2 * train_command_seconds / 3600)
        assert float(r["cost_usd"]) == pytest.approx(float(r["gpu_hours"]) * 23 / 8)
        assert float(r["bfcl_overall"]) == pytest.approx(
            (float(r["bfcl_non_live"]) + float(r["bfcl_live"]) + float(r["bfcl_irrelevance"])) / 3)
        gain = float(r["points_over_baseline"])
        assert gain == pytest.approx(float(r["bfcl_overall"]) - float(rows["baseline"]["bfcl_overall"]))
        assert r["usd_per_point"] == "no gain" if gain <= 0 else float(r["usd_per_point"]) == pytest.approx(float(r["cost_usd"]) / gain)
    base = rows["baseline"]
    assert base["cost_usd"] == "0.0" and base["bfcl_irrelevance"] != "" and base["settings"].startswith("model=")
    assert rows["missing_data"]["status"].startswith("failed: train exited")
    table = (out / "results.md").read_text()
    assert "| lr_high | learning_rate=0.003 |" in table and "failed: train exited" in table
    for plot in ("score_vs_cost.png", "score_vs_memory.png", "speed_vs_memory.png"):
        assert 5_000 < (out / plot).stat().st_size < 300_000, plot


def test_profile_steps_write_a_trace_and_the_breakdown(finished_sweep):
    train = finished_sweep["dir"] / "lr_high" / "train"
    traces = sorted((train / "profile").glob("rank*.pt.trace.json"))
    assert [t.name for t in traces] == ["rank0.pt.trace.json", "rank1.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]  # Chrome trace format: Perfetto, chrome://tracing
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= names  # steps 2 and 3 (profiler steps count from 0 at step 1)
    assert "gloo:all_gather" in names and "c10d::_reduce_scatter_base_" in names  # FSDP2's collectives over gloo
    breakdown = json.loads((train / "profile" / "breakdown.json").read_text())
    assert breakdown["profile_steps"] == "2-3" and len(breakdown["per_rank"]) == 2
    for rank in breakdown["per_rank"]:
        assert rank["steps"] == 2 and rank["step_ms"] > 0
        assert rank["compute"] + rank["exposed_comm"] + rank["idle"] == pytest.approx(100, abs=0.05)
        assert rank["all_gather"] > 0 and rank["reduce_scatter"] > 0 and rank["compute"] > 10
    assert "share of step time" in (finished_sweep["dir"] / "lr_high" / "train.log").read_text()


def test_report_combines_run_folders(finished_sweep, tmp_path):
    out = finished_sweep["dir"]
    report = tmp_path / "report"
    assert sweep.main(["report", str(out / "lr_low"), str(out / "baseline"), str(out / "lr_high" / "train"),
                       str(out / "lr_high" / "bfcl"), "--output", str(report), "--price-per-gpu-hour", "10",
                       "--peak-tflops", "0.1"]) == 0
    with open(report / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["lr_low", "baseline", "train", "bfcl"]  # a plain train_sft.py output dir is a run too
    plain = rows["train"]
    # eval_bfcl.py's folder of a trained model is that model's run (its training cost), not an untrained baseline
    assert rows["bfcl"]["cost_usd"] == plain["cost_usd"] and rows["bfcl"]["bfcl_overall"] != ""
    assert plain["bfcl_overall"] == "" and plain["train_time_measured"] == "training loop (run_summary.json)"
    summary = json.loads((out / "lr_high" / "train" / "run_summary.json").read_text())
    assert float(plain["cost_usd"]) == pytest.approx(2 * summary["train_seconds"] / 3600 * 10)
    flops = memory_estimate.flops_per_token(summary["model_config"], summary["attention_span"])
    assert float(plain["mfu_percent"]) == pytest.approx(100 * float(plain["real_tokens_per_s_per_gpu"]) * flops / 0.1e12)
    assert float(plain["train_loss"]) == [log["loss"] for log in summary["log_history"] if "loss" in log][-1]


def test_a_folder_of_another_sweep_is_refused(finished_sweep, tmp_path):
    spec = yaml.safe_load(finished_sweep["sweep_file"].read_text())
    spec["points"].append({"name": "lr_mid", "learning_rate": 2.0e-3})
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError) as err:
        sweep.main([str(changed)])
    assert "holds the runs of another sweep" in str(err.value) and "lr_mid" in str(err.value)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("someone else's")
    with pytest.raises(UserError) as err:
        sweep.main([str(changed), "--output-dir", str(tmp_path / "busy")])
    assert "holds no sweep.json" in str(err.value)


# --- no launches ---------------------------------------------------------------------------------------------------


def test_cost_arithmetic_by_hand(tmp_path):
    assert metrics.DEFAULT_PRICE_PER_GPU_HOUR == 2.875  # the plan: $23 per hour for 8 GPUs
    # 8 GPUs for 30 minutes = 4 GPU-hours = $11.50; +5 points -> $2.30 per point
    assert study_report.cost_columns(4.0, 5.0, 2.875) == pytest.approx((11.5, 2.3))
    assert study_report.cost_columns(4.0, -1.0, 2.875) == pytest.approx((11.5, None)) and study_report.cost_columns(4.0, None, 2.875)[1] is None

    # The same through report_rows, from run folders written by hand
    def bfcl(non_live, live, irrelevance):
        aggregates = {"Non-Live AST": {"accuracy": non_live}, "Live AST": {"accuracy": live}, "Irrelevance": {"accuracy": irrelevance}}
        return {"categories": {}, "aggregates": aggregates, "generation": {"model": "Qwen/Qwen2.5-3B-Instruct"}}

    (tmp_path / "base" / "bfcl").mkdir(parents=True)
    (tmp_path / "base" / "bfcl" / "summary.json").write_text(json.dumps(bfcl(0.75, 0.65, 0.55)))  # overall 65
    (tmp_path / "sft" / "train").mkdir(parents=True)
    (tmp_path / "sft" / "bfcl").mkdir()
    (tmp_path / "sft" / "bfcl" / "summary.json").write_text(json.dumps(bfcl(0.80, 0.70, 0.60)))  # overall 70: +5
    logs = [{"step": 5, "num_tokens": 1000.0, "loss": 2.0},
            {"step": 10, "num_tokens": 81000.0, "tokens_per_second_per_device": 1000.0, "loss": 1.5}, {"step": 10, "eval_loss": 1.7}]
    (tmp_path / "sft" / "train" / "run_summary.json").write_text(json.dumps({
        "num_processes": 8, "train_seconds": 1800.0, "device": "NVIDIA H100 80GB HBM3", "log_history": logs,
        "model_config": memory_estimate.ARCHITECTURES["qwen2.5-3b"], "attention_span": 600.0,
        "peak_memory_per_rank": [{"peak_allocated_gb": 40.0, "peak_reserved_gb": 44.0}] * 8,
        "settings": {"model_name_or_path": "Qwen/Qwen2.5-3B-Instruct", "learning_rate": 2e-5}}))
    base, sft = study_report.report_rows([tmp_path / "base", tmp_path / "sft"], price_per_gpu_hour=2.875)
    assert base["baseline"] and base["cost_usd"] == 0 and base["bfcl_overall"] == pytest.approx(65)
    assert sft["gpu_hours"] == pytest.approx(4.0) and sft["cost_usd"] == pytest.approx(11.5)
    assert sft["points_over_baseline"] == pytest.approx(5.0) and sft["usd_per_point"] == pytest.approx(2.3)
    # 80,000 real tokens in 80,000 / (1,000 x 8) = 10 s over 8 GPUs: 1,000 tokens/s per GPU (the first log is warm-up)
    assert sft["real_tokens_per_s_per_gpu"] == pytest.approx(1000.0)
    # 6 x 3,085,938,688 + 12 x 36 x 2048 x 600 = 19,046,473,728 FLOPs per token against 989 TFLOP/s (H100 bf16)
    assert sft["mfu_percent"] == pytest.approx(100 * 1000 * 19_046_473_728 / 989e12)
    assert sft["peak_memory_gib_per_gpu"] == pytest.approx(40.0)
    assert (sft["train_loss"], sft["eval_loss"]) == (1.5, 1.7)


def test_report_multi_turn_and_leaderboard_overall_columns(tmp_path):
    """A run scored on every single-turn and multi-turn category at 50%: Multi-Turn 50, and the leaderboard's
    Overall 0.5 x (10 + 10 + 10 + 30) / 100 = 30, agentic (not run) counting 0; the parts run are listed."""
    from fcsft import bfcl_data, bfcl_report

    scores = {c: {"accuracy": 0.5, "total": 10} for c in bfcl_data.NON_LIVE + bfcl_data.LIVE + bfcl_data.MULTI_TURN}
    (tmp_path / "full" / "bfcl").mkdir(parents=True)
    (tmp_path / "full" / "bfcl" / "summary.json").write_text(json.dumps(
        {"categories": scores, "aggregates": bfcl_report.aggregate_scores(scores), "generation": {"model": "m"}}))
    (row,) = study_report.report_rows([tmp_path / "full"], price_per_gpu_hour=2.875)
    assert row["bfcl_overall"] == pytest.approx(50) and row["bfcl_multi_turn"] == pytest.approx(50)
    assert row["bfcl_overall_leaderboard"] == pytest.approx(30)
    assert row["bfcl_overall_leaderboard_parts"] == "Non-Live+Live+Irrelevance+Multi-Turn"
    study_report.write_report([tmp_path / "full"], tmp_path / "report", 2.875)
    assert "| multi-turn | leaderboard overall |" in (tmp_path / "report" / "results.md").read_text()


def test_grid_one_at_a_time_and_points(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl", "learning_rate": 2e-5, "bf16": True}))
    base = {"recipe": str(recipe), "accelerate_config": "accelerate_configs/cpu_fsdp_full.yaml", "bfcl": {"categories": ["simple_python"]}}

    def load(**spec):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({**base, **spec}, sort_keys=False))
        return sweeps.load_sweep(tmp_path / "s.yaml")

    grid = load(grid={"learning_rate": [1e-5, 5e-5], "accelerate_config": ["accelerate_configs/cpu_fsdp_full.yaml",
                                                                           "accelerate_configs/cpu_fsdp_shard_grad_op.yaml"]})
    assert [p.name for p in grid.points] == ["learning_rate=1e-05,accelerate_config=cpu_fsdp_full",
                                             "learning_rate=1e-05,accelerate_config=cpu_fsdp_shard_grad_op",
                                             "learning_rate=5e-05,accelerate_config=cpu_fsdp_full",
                                             "learning_rate=5e-05,accelerate_config=cpu_fsdp_shard_grad_op"]
    assert grid.points[1].accelerate_config == "accelerate_configs/cpu_fsdp_shard_grad_op.yaml"
    assert grid.output_dir.as_posix() == "runs/sweeps/s"

    one = load(one_at_a_time={"learning_rate": [1e-5, 2e-5], "precision": {
        "bf16": {"bf16": True}, "fp32": {"bf16": False, "accelerate_flags": {"mixed_precision": "no"}}}}, baseline=True)
    assert [p.name for p in one.points] == ["baseline", "recipe", "learning_rate=1e-05", "precision=fp32"]  # 2e-5, bf16: the recipe's
    assert one.points[0].baseline_model == "m" and one.points[1].labels == {"learning_rate": "2e-05", "precision": "bf16"}
    assert one.points[3].accelerate_flags == {"mixed_precision": "no"} and one.points[3].overrides == {"bf16": False}
    train = sweeps.train_command(one, one.points[3], tmp_path / "run")
    assert train[train.index("--mixed_precision") + 1] == "no" and train.index("--mixed_precision") < train.index("train_sft.py")
    assert train[train.index("--bf16") + 1] == "false" and train[-2:] == ["--output_dir", str(tmp_path / "run" / "train")]

    listed = load(points=[{"name": "a", "learning_rate": 1e-5}, {"max_length": None}])
    assert [p.name for p in listed.points] == ["a", "max_length=None"]
    assert sweeps.flag_values(None) == ["None"] and sweeps.flag_values(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


def test_a_rerun_resumes_training_and_skips_finished_stages(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl"}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "recipe": str(recipe), "accelerate_config": "accelerate_configs/cpu_fsdp_full.yaml",
        "points": [{"name": "a", "learning_rate": 1e-5}], "bfcl": {"categories": ["simple_python"]}}))
    loaded = sweeps.load_sweep(tmp_path / "s.yaml", output_dir=tmp_path / "out")
    run_dir = tmp_path / "out" / "a"
    (run_dir / "train" / "checkpoint-8").mkdir(parents=True)
    (run_dir / "train" / "checkpoint-8" / "trainer_state.json").write_text("{}")  # a complete checkpoint
    (run_dir / "bfcl").mkdir()
    (run_dir / "bfcl" / "BFCL_v4_simple_python_result.json").write_text("")  # results of a model that no longer exists
    (run_dir / "point.json").write_text(json.dumps({"status": "running", "attempts": 1, "stages": {}}))  # killed
    commands = []
    monkeypatch.setattr(sweeps, "run_logged", lambda command, *args: commands.append(command) or 0)

    record = sweeps.run_point(loaded, loaded.points[0], 1, 1, progress_seconds=1)
    assert commands[0][-2:] == ["--resume_from_checkpoint", "true"] and "eval_bfcl.py" in commands[1]
    assert not (run_dir / "bfcl").exists()
    assert record["status"] == "done" and record["attempts"] == 2 and record["stages"] == {"train": "done", "eval": "done"}

    # the evaluation failed after training had finished: the next attempt evaluates only
    (run_dir / "point.json").write_text(json.dumps({**record, "status": "failed", "stages": {"train": "done"}}))
    commands.clear()
    assert sweeps.run_point(loaded, loaded.points[0], 1, 1, progress_seconds=1)["status"] == "done"
    assert len(commands) == 1 and "eval_bfcl.py" in commands[0]


@pytest.mark.parametrize("spec, message", [
    ({"gird": {"learning_rate": [1e-5]}}, "did you mean 'grid'"),
    ({"grid": {"learning_rat": [1e-5]}}, "unknown recipe key 'learning_rat'"),
    ({"grid": {"x": [1]}, "points": [{"learning_rate": 1e-5}]}, "use one of grid, one_at_a_time and points"),
    ({"overrides": {"save_final_model": False}}, "no model to score"),
    ({"overrides": {"output_dir": "elsewhere"}}, "`output_dir` is set by the sweep"),
    ({"overrides": {"profile_steps": "15-10"}}, "profile_steps"),
    ({"points": [{"name": "a"}, {"name": "a"}]}, "two points are named 'a'"),
    ({"accelerate_config": "accelerate_configs/nope.yaml"}, "accelerate config not found"),
    ({"bfcl": {"categories": ["simple_pyhton"]}}, "unknown category 'simple_pyhton'"),
])
def test_sweep_file_mistakes_stop_before_anything_runs(spec, message, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset_name": "d.jsonl"}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "accelerate_config": "accelerate_configs/cpu_fsdp_full.yaml", **spec}))
    with pytest.raises(UserError) as err:
        sweep.main([str(path), "--dry-run"])
    assert message in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_validate_and_dry_run(name, capsys):
    """Every sweep file names real recipe keys, files and BFCL categories, says what it answers, and prints its commands."""
    path = REPO / "sweeps" / name
    assert path.read_text().startswith("# ")  # what the sweep answers
    assert sweep.main([str(path.relative_to(REPO)), "--dry-run", "--output-dir", "/nonexistent/dry-run"]) == 0
    out = capsys.readouterr().out
    loaded = sweeps.load_sweep(path.relative_to(REPO))
    assert out.count("would run") == len(loaded.points)
    for p in loaded.points:
        if not p.baseline_model:
            assert f"train_sft.py {loaded.recipe}" in out.split(f"] {p.name} (")[1].split("\n[")[0]
    expected = {"phase1_baseline_batch.yaml": 5, "phase2_full_finetune.yaml": 1, "phase2_fsdp_strategies.yaml": 4,
                "phase3_hyperparameters.yaml": 9, "phase4_lora_ranks.yaml": 4, "demo_cpu.yaml": 3}
    assert len(loaded.points) == expected[name]


def test_wandb_sweep_runs_the_same_points(monkeypatch, capsys):
    assert sweep.main(["sweeps/phase3_hyperparameters.yaml", "--wandb-sweep"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    names = [p.name for p in sweeps.load_sweep("sweeps/phase3_hyperparameters.yaml").points]
    assert config["parameters"]["point"]["values"] == names and config["method"] == "grid"
    assert config["command"][-2:] == ["sweeps/phase3_hyperparameters.yaml", "${args}"]  # -> sweep.py FILE --point=NAME

    logged = {}

    class StandInRun:
        summary = logged

        def finish(self):
            logged["finished"] = True

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = lambda **kwargs: logged.update(init=kwargs) or StandInRun()
    sweeps.log_to_wandb({"run": "x", "bfcl_overall": 70.0, "cost_usd": 11.5, "usd_per_point": None})
    assert logged == {"init": {"resume": "allow"}, "sweep/bfcl_overall": 70.0, "sweep/cost_usd": 11.5, "finished": True}


# --- step_profile.py -----------------------------------------------------------------------------------------------


def test_breakdown_by_hand():
    # CPU: one 100 us step; training-thread ops 0-40 and 50-80; gloo all-gather 30-60 and all-reduce 85-95 elsewhere
    events = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 40, "pid": 1, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 50, "dur": 30, "pid": 1, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "c10d::_allgather_base_", "ts": 29, "dur": 1, "pid": 1, "tid": 1},
              {"ph": "X", "cat": "user_annotation", "name": "gloo:all_gather", "ts": 30, "dur": 30, "pid": 1, "tid": 2},
              {"ph": "X", "cat": "user_annotation", "name": "gloo:all_reduce", "ts": 85, "dur": 10, "pid": 1, "tid": 3}]
    got = step_profile.breakdown(events)
    # compute 40 + 30 = 70 (the c10d launch only hands work to gloo); all-gather 30, all-reduce 10; not under compute:
    # 40-50 and 85-95 = 20 exposed; nothing runs in 80-85 and 95-100 = 10 idle
    assert got["compute"] == 70 and got["all_gather"] == 30 and got["reduce_scatter"] == 10
    assert got["exposed_comm"] == 20 and got["idle"] == 10 and got["step_ms"] == 0.1
    # GPU: the device's kernels decide; NCCL kernels are communication. Compute 10-60; all-gather 0-20 (10 exposed),
    # reduce-scatter 70-90 (all exposed); idle 60-70 and 90-100
    gpu = [{"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 100, "pid": 0, "tid": 7},
           {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm", "ts": 10, "dur": 50, "pid": 0, "tid": 7},
           {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL", "ts": 0, "dur": 20, "pid": 0, "tid": 8},
           {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", "ts": 70, "dur": 20, "pid": 0, "tid": 8}]
    got = step_profile.breakdown(gpu)
    assert (got["compute"], got["all_gather"], got["reduce_scatter"], got["exposed_comm"], got["idle"]) == (50, 20, 20, 30, 20)


def test_profile_steps_are_checked_when_the_recipe_is_read(demo_recipe):

    assert step_profile.parse_steps("10-15") == (10, 15) and step_profile.parse_steps(12) == (12, 12)
    for bad in ("15-10", "0-3", "ten"):
        with pytest.raises(UserError) as err:
            fcsft_recipe.parse_recipe([str(demo_recipe()), "--profile_steps", bad])
        assert "profile_steps" in str(err.value)
