"""benchmarks/lease.sh and benchmarks/lease.py (issue 22): the pieces of the GPU lease that a CPU can check. The whole
script is rehearsed on CPU by hand (benchmarks/LEASE.md); these tests keep its arithmetic, its parsing, its plan and
the device-call command in LEASE.md honest."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO

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


def test_train_metrics_on_a_gpu_summary_use_the_recipe_settings_and_estimate_memory():
    """The train stage's numbers from a run_summary.json as train_sft.py writes it on a GPU (values made up)."""
    import bench_fsdp
    import estimate_memory

    config = estimate_memory.ARCHITECTURES["qwen2.5-3b"]
    settings = {"per_device_train_batch_size": 16, "max_length": 4096, "packing": False, "padding_free": False,
                "train_sampling_strategy": "group_by_length", "activation_checkpointing": True,
                "gradient_accumulation_steps": 4, "dtype": "bfloat16", "bf16": True, "attn_implementation": "sdpa",
                "max_steps": 8}
    summary = {"settings": settings, "model_config": config, "attention_span": 473.7, "num_processes": 1, "global_step": 8,
               "peak_memory_per_rank": [{"peak_allocated_gb": 47.0, "peak_reserved_gb": 52.0}],
               "distributed_type": "DistributedType.FSDP", "fsdp_version": 2,
               "sharding": {"parameter_dtypes": ["torch.float32"], "compute_dtype": "torch.bfloat16"},
               "log_history": [{"step": s, "num_tokens": 28000 * s, "loss": 12.0 - 0.5 * s, "tokens_per_second_per_device": 20000.0}
                               for s in range(1, 9)]}
    lengths = [197 + (i * 37) % 673 for i in range(1000)]
    metrics = lease.train_metrics(summary, {"lengths": lengths, "assistant_token_fraction": 0.11}, 989.0, 2)
    assert metrics["steps_measured"] == 6 and metrics["real_tokens_per_second_per_device"] == pytest.approx(20000.0)
    flops = estimate_memory.flops_per_token(config, 473.7)
    assert metrics["mfu_percent"] == pytest.approx(100 * 20000 * flops / 989e12)
    expected = estimate_memory.estimate(config, estimate_memory.Setup(
        world_size=1, activation_checkpointing=True, batch_size=16, seq_len=max(lengths), loss_fraction=0.11,
        gradient_accumulation_steps=4))["peak"]  # length-grouped batches: the longest rows together
    assert metrics["estimated_peak_gb"] == pytest.approx(expected / 1e9)
    assert metrics["peak_memory_gb"] == pytest.approx(47.0 * 2**30 / 1e9) == bench_fsdp.peak_memory(summary)[0]
    assert all(metrics["checks"].values()), metrics["checks"]
    summary["sharding"]["parameter_dtypes"] = ["torch.bfloat16"]
    assert not lease.train_metrics(summary, {"lengths": lengths, "assistant_token_fraction": 0.11}, 989.0, 2)["checks"]["fp32_masters"]


def test_bench_rows_are_sized_for_the_device_by_estimate_memory():
    import estimate_memory

    lengths = [197 + (i * 37) % 673 for i in range(1000)]  # 197-869 tokens, like the lease's 1,000 rows
    config = estimate_memory.load_config("qwen2.5-3b")
    h200, h100 = (lease.bench_settings(estimate_memory.GPUS_GB[g], {"lengths": lengths, "assistant_token_fraction": 0.11},
                                       config) for g in ("h200", "h100"))
    assert h200[0][0] == "trl_defaults" and h200[0][2] == "liger" and h200[0][-1] == "xlam_recipe"
    rows = {name: int(re.search(r"_(\d+)$", name)[1]) if re.search(r"_(\d+)$", name) else 8 for name in h200[0][1:4:2]}
    h100_rows = {name: int(re.search(r"_(\d+)$", name)[1]) if re.search(r"_(\d+)$", name) else 8 for name in h100[0][1:4:2]}
    assert sorted(rows.values()) > sorted(h100_rows.values())  # more memory, larger batches
    for setting in h200[1]:
        assert setting.needs == "flex" and setting.recipe["padding_free"] and setting.recipe["max_length"] is None
    assert [s.recipe.get("activation_checkpointing", False) for s in h200[1]] == [False, True]


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
