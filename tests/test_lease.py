"""benchmarks/lease.sh and benchmarks/lease.py (issue 22): the pieces of the GPU lease that a CPU can check. The whole
script is rehearsed on CPU by hand (benchmarks/LEASE.md); these tests keep its arithmetic, its parsing, its plan and
the device-call command in LEASE.md honest. lease.py is the helper under test; everything else comes from fcsft."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO
from fcsft import bench, memory_estimate, metrics

sys.path.insert(0, str(REPO / "benchmarks"))
import lease  # noqa: E402


def test_wheel_names_parse_to_project_and_version():
    assert lease.wheel_name_version("liger_kernel-0.8.5-py3-none-any.whl") == ("liger-kernel", "0.8.5")
    assert lease.wheel_name_version("/w/multiprocess-0.70.19-py312-none-any.whl") == ("multiprocess", "0.70.19")
    assert lease.wheel_name_version("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl") == ("bitsandbytes", "0.50.2")


def test_install_plan_installs_missing_and_other_versions_and_keeps_the_same():
    wheels = ["w/trl-1.16.0-py3-none-any.whl", "w/transformers-5.23.0-py3-none-any.whl", "w/peft-0.21.2-py3-none-any.whl"]
    plan = lease.install_plan(wheels, {"trl": None, "transformers": "5.17.0", "peft": "0.21.2"})
    assert [(w.split("/")[1].split("-")[0], action, why) for w, action, why in plan] == [
        ("peft", "keep", "has 0.21.2"), ("transformers", "install", "has 5.17.0"), ("trl", "install", "missing")]


@pytest.mark.parametrize("line, counts, ok", [
    ("8 skipped, 207 deselected, 14 warnings in 17.73s", {"skipped": 8, "deselected": 207, "warnings": 14}, True),
    ("========= 7 passed, 1 failed, 207 deselected in 200.10s (0:03:20) =========", {"passed": 7, "failed": 1, "deselected": 207}, False),
    ("==== 6 passed, 2 errors in 61.00s ====", {"passed": 6, "errors": 2}, False),
])
def test_pytest_closing_line_is_found_and_counted(line, counts, ok):
    result = lease.test_gpu_result(f"collected 215 items\n....\n{line}\n")
    assert result["closing_line"] == line.strip() and result["counts"] == counts and result["ok"] is ok


def test_a_log_without_closing_line_is_not_a_pass():
    assert lease.test_gpu_result("tests/test_gpu.py ..\nKilled\n") == {"closing_line": None, "counts": {}, "ok": False}


def test_eval_extrapolates_the_time_per_prompt_to_all_3641():
    generation = {"prompts_generated": 458, "wall_time_s": 45.8, "total_wall_time_s": 60.0, "prompts_per_s": 10.0,
                  "generated_tokens": 458 * 128, "generated_tokens_per_s": 1280.0, "max_new_tokens": 128, "batch_size": 64}
    metrics = lease.eval_metrics(generation)
    assert metrics["extrapolated_seconds"] == pytest.approx(364.1) and metrics["generated_tokens_per_prompt"] == 128


def test_the_bfcl_sample_keeps_every_nth_entry_with_its_answers(tmp_path):
    source = tmp_path / "src"
    (source / "possible_answer").mkdir(parents=True)
    for category, size in lease.BFCL_CATEGORIES.items():
        (source / f"BFCL_v4_{category}.json").write_text("".join(json.dumps({"id": f"{category}_{i}"}) + "\n" for i in range(size)))
        if "irrelevance" not in category:
            (source / "possible_answer" / f"BFCL_v4_{category}.json").write_text(
                "".join(json.dumps({"id": f"{category}_{i}", "ground_truth": []}) + "\n" for i in range(size)))
    counts, full = lease.write_bfcl_sample(source, tmp_path / "sample", 8)
    assert sum(full.values()) == lease.BFCL_SINGLE_TURN_PROMPTS and sum(counts.values()) == 458
    kept = lease.read_json_lines(tmp_path / "sample" / "BFCL_v4_live_multiple.json")
    answers = lease.read_json_lines(tmp_path / "sample" / "possible_answer" / "BFCL_v4_live_multiple.json")
    assert [e["id"] for e in kept] == [a["id"] for a in answers] == [f"live_multiple_{i}" for i in range(0, 1053, 8)]
    assert not (tmp_path / "sample" / "possible_answer" / "BFCL_v4_irrelevance.json").exists()


def test_train_metrics_on_a_gpu_summary_use_the_recipe_settings_and_the_package_metrics():
    """The train stage's numbers from a run_summary.json as train_sft.py writes it on a GPU (values made up): GiB, and
    MFU, throughput and peak memory as fcsft.metrics defines them."""
    config = memory_estimate.ARCHITECTURES["qwen2.5-3b"]
    settings = {"per_device_train_batch_size": 16, "max_length": 4096, "packing": False, "padding_free": False,
                "train_sampling_strategy": "group_by_length", "activation_checkpointing": True,
                "gradient_accumulation_steps": 4, "dtype": "bfloat16", "bf16": True, "attn_implementation": "sdpa",
                "max_steps": 8}
    summary = {"settings": settings, "model_config": config, "attention_span": 473.7, "num_processes": 1, "global_step": 8,
               "peak_memory_per_rank": [{"peak_allocated_gib": 47.0, "peak_reserved_gib": 52.0}],
               "distributed_type": "DistributedType.FSDP", "fsdp_version": 2,
               "sharding": {"parameter_dtypes": ["torch.float32"], "compute_dtype": "torch.bfloat16"},
               "log_history": [{"step": s, "num_tokens": 28000 * s, "loss": 12.0 - 0.5 * s, "tokens_per_second_per_device": 20000.0}
                               for s in range(1, 9)]}
    lengths = [197 + (i * 37) % 673 for i in range(1000)]
    result = lease.train_metrics(summary, {"lengths": lengths, "assistant_token_fraction": 0.11}, 989.0, 2)
    assert result["steps_measured"] == 6 and result["real_tokens_per_second_per_device"] == pytest.approx(20000.0)
    flops = memory_estimate.flops_per_token(config, 473.7)
    assert result["mfu_percent"] == pytest.approx(100 * 20000 * flops / 989e12)
    expected = memory_estimate.estimate(config, memory_estimate.Setup(
        world_size=1, activation_checkpointing=True, batch_size=16, seq_len=max(lengths), loss_fraction=0.11,
        gradient_accumulation_steps=4))["peak"]  # length-grouped batches: the longest rows together
    assert result["estimated_peak_gib"] == pytest.approx(expected / 2**30)
    assert result["peak_memory_gib"] == 47.0 == metrics.peak_memory_gib(summary)[0] and result["peak_reserved_gib"] == 52.0
    assert result["memory_measure"] == "max_memory_allocated"
    assert result["estimate_error_percent"] == pytest.approx(100 * (expected / 2**30 - 47.0) / 47.0)
    assert all(result["checks"].values()), result["checks"]
    summary["sharding"]["parameter_dtypes"] = ["torch.bfloat16"]
    assert not lease.train_metrics(summary, {"lengths": lengths, "assistant_token_fraction": 0.11}, 989.0, 2)["checks"]["fp32_masters"]


def test_bench_rows_are_sized_for_the_device_by_the_memory_estimate():
    """The sized rows are fcsft.bench.GPU1_SETTINGS' own: the largest that fits, smaller ones on smaller GPUs."""
    lengths = [197 + (i * 37) % 480 for i in range(990)] + [869] * 10  # mean 440, max 869: like the lease's rows
    data = {"lengths": lengths, "assistant_token_fraction": 0.11}
    config = memory_estimate.load_config("qwen2.5-3b")
    plans = {gpu: lease.bench_settings(metrics.GPUS[gpu]["usable_gib"], data, config) for gpu in ("h200", "h100", "a100-40")}
    assert plans["h200"][0] == ["trl_defaults", "padding_free_flex_batch_32", "liger", "checkpointing_batch_64", "xlam_recipe"]
    assert plans["h100"][0][1] == "padding_free_flex" and plans["h100"][0][3] == "checkpointing_batch_64"
    assert plans["a100-40"][0][1] == "padding_free_flex_batch_4" and plans["a100-40"][0][3] == "checkpointing_batch_16"
    for names, sized in plans.values():
        assert set(names) <= {s.name for s in bench.GPU1_SETTINGS}  # bench_fsdp.py --settings knows every one
    for gpu in ("h200", "h100"):
        for row in plans[gpu][1].values():
            assert row["estimated_peak_gib"] * lease.SAFETY <= metrics.GPUS[gpu]["usable_gib"]
    ladder = {s.name: s.recipe for s in bench.GPU1_SETTINGS if s.name in lease.BATCHES_NO_CHECKPOINTING + lease.BATCHES_CHECKPOINTING}
    for name, recipe in ladder.items():
        assert recipe["padding_free"] and recipe["max_length"] is None and recipe["attn_implementation"] == "flex_attention"
        assert bool(recipe.get("activation_checkpointing")) == (name in lease.BATCHES_CHECKPOINTING)


def test_lease_py_imports_no_script():
    """lease.py runs the scripts as commands and imports only fcsft and libraries (the project's rule for scripts)."""
    scripts = {p.stem for p in REPO.glob("*.py")}
    tree = ast.parse((REPO / "benchmarks" / "lease.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "fcsft" in imported and not imported & scripts, imported & scripts


def test_targets_need_measurements_and_compare_with_trl_defaults():
    assert all(verdict is None for _, _, verdict, _ in lease.targets({}, []))
    rows = [{"setting": "trl_defaults", "status": "ok", "real_tokens_per_second_per_device": 10000.0, "mfu_percent": 20.0,
             "estimate_error_percent": 4.0},
            {"setting": "padding_free_flex_batch_32", "status": "ok", "real_tokens_per_second_per_device": 25000.0,
             "mfu_percent": 48.0, "estimate_error_percent": -12.0},
            {"setting": "liger", "status": "failed (1): OOM"}]
    state = {"eval": {"extrapolated_seconds": 150.0, "prompts": 458, "prompts_per_s": 24.3, "max_new_tokens": 128,
                      "batch_size": 64},
             "test_gpu": {"closing_line": "8 passed in 200.00s", "ok": True}}
    verdicts = {name.split(" ")[0]: (value, verdict) for name, value, verdict, _ in lease.targets(state, rows)}
    assert verdicts["MFU"] == ("48.0%", True) and verdicts[">="] == ("2.50x", True)
    assert verdicts["estimate_memory.py"] == ("worst -12.0% (padding_free_flex_batch_32)", False)
    assert verdicts["3,641"] == ("150s", True) and verdicts["make"] == ("8 passed in 200.00s", True)


def test_the_lease_plan_is_consistent_and_the_device_call_fits_the_tool():
    script = (REPO / "benchmarks" / "lease.sh").read_text()
    assert subprocess.run(["bash", "-n", REPO / "benchmarks" / "lease.sh"]).returncode == 0
    caps = dict(re.findall(r"\[([a-z-]+)\]=(\d+)", script.split("declare -A CAP=")[1].split("\n")[0]))
    starts = dict(re.findall(r"\[([a-z-]+)\]=(\d+)", script.split("declare -A MIN=")[1].split("\n")[0]))
    header = {m[1]: (m[2], m[3]) for m in re.finditer(r"^# (\S+) +(\d+)s +(\d+)s", script, re.M)}
    assert header == {stage: (caps[stage], starts[stage]) for stage in caps}  # the header's plan is the one that runs
    assert len(lease.OUT_FILES) <= 8  # files that come back from one device call
    doc = (REPO / "benchmarks" / "LEASE.md").read_text()
    calls = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", doc, re.S)]
    assert len(calls) >= 2
    for call in calls:
        assert set(call) == {"command", "carry", "timeout_s"}
        assert len(call["command"]) <= 2000 and len(call["carry"]) <= 8 and 1 <= call["timeout_s"] <= 600
        budget = int(re.search(r"LEASE_BUDGET=(\d+)", call["command"])[1])
        assert budget + 30 <= call["timeout_s"]
    assert calls[0]["timeout_s"] <= 480  # the 8 minutes


def test_a_stage_runs_records_and_publishes_into_out(tmp_path):
    """The runner itself, with its cheapest stage: lease.json and lease.log land in OUT, and the report prints."""
    env = {**os.environ, "PY": PYTHON, "LEASE_DEVICE": "cpu", "LEASE_STATE": str(tmp_path / "state"),
           "OUT": str(tmp_path / "out"), "LEASE_IN": str(tmp_path / "in"), "LEASE_STAGES": "env", "LEASE_BUDGET": "120"}
    proc = subprocess.run(["bash", REPO / "benchmarks" / "lease.sh"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = json.loads((tmp_path / "out" / "lease.json").read_text())
    assert state["stages"]["env"]["status"] == "ok" and state["env"]["cuda_available"] is False
    assert "== env: ok" in (tmp_path / "out" / "lease.log").read_text() and "| target |" in proc.stdout
