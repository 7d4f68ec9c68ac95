"""bench_fsdp.py: the one-command CPU benchmark end to end (tiny model, two settings), and its arithmetic."""

import argparse
import csv
import json
import math
import time

import pytest
from conftest import PYTHON, run

from fcsft import bench, metrics


def test_smoke_benchmark_writes_sane_csv_table_and_plots(assets, tmp_path):
    results = tmp_path / "results"
    started = time.perf_counter()
    run([PYTHON, "bench_fsdp.py", "--settings", "smoke", "--rows", "100", "--warmup-steps", "1", "--steps", "2",
         "--assets", assets, "--results", results, "--work-dir", tmp_path / "work"], timeout=600)
    elapsed = time.perf_counter() - started
    assert elapsed < 180, f"the CPU benchmark took {elapsed:.0f}s"

    with open(results / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_COLUMNS
        rows = list(reader)
    data = json.loads((results / "data.json").read_text())
    assert [r["setting"] for r in rows] == ["padded", "group_by_length"]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert int(r["steps_measured"]) == 2 and float(r["step_seconds"]) > 0
        tokens = float(r["real_tokens_per_step_per_device"])
        # real (non-padding) tokens of 4 rows: between 4 of the shortest and 4 of the longest rows
        assert 4 * data["min"] <= tokens <= 4 * data["max"]
        assert float(r["real_tokens_per_second_per_device"]) == pytest.approx(tokens / float(r["step_seconds"]), rel=1e-6)
        assert 0 < float(r["mfu_percent"]) < 100
        assert 0.1 < float(r["peak_memory_gib"]) < 20 and float(r["estimated_peak_gib"]) > 0
        assert abs(float(r["estimate_error_percent"])) < 60
        assert math.isfinite(float(r["loss_first"])) and float(r["loss_first"]) > 0
    table = (results / "bench.md").read_text()
    assert "| padded | full_shard | 4 x 2048 |" in table and "Command: `python bench_fsdp.py --settings smoke" in table
    for plot in ("throughput.png", "mfu.png", "memory.png"):
        assert 1_000 < (results / plot).stat().st_size < 200_000


def test_settings_that_need_a_gpu_are_skipped_with_a_reason():
    ctx = {"args": argparse.Namespace(num_processes=2), "lengths": [300, 700]}
    for name, reason in (("liger", "Triton"), ("qlora", "bitsandbytes"), ("flash_attention_padding_free", "flash-attn")):
        setting = next(s for s in bench.CPU_SETTINGS if s.name == name)
        row = bench.run_setting(setting, ctx)
        assert row["status"].startswith("skipped: ") and reason in row["status"]


def test_padding_arithmetic():
    assert bench.padding_efficiency([500] * 50, batch_size=8, max_length=None) == 1.0
    # rows of 100 and 900 tokens, batches of 2: 1000 real tokens on average; padded to 200 (both short, p~1/4),
    # 1800 (both long, p~1/4) or 1800 (mixed, p~1/2) = 1400 on average
    assert bench.padding_efficiency([100, 900] * 50, batch_size=2, max_length=None) == pytest.approx(1000 / 1400, abs=0.02)
    knobs = {**bench.REFERENCE_KNOBS, "packing": True, "per_device_train_batch_size": 2, "max_length": 1024}
    assert bench.worst_micro_batch([300, 500], knobs, steps=3, ranks=2) == (2048, 1024)


def test_throughput_counts_only_steps_after_warmup():
    # step 1 has no rate; step 2 is warm-up; steps 3-4: 1000 and 3000 real tokens over 2 ranks at 250 and 500 tok/s/dev
    logs = [{"step": 1, "num_tokens": 800.0, "loss": 7.0}, {"step": 2, "num_tokens": 1800.0, "tokens_per_second_per_device": 10.0},
            {"step": 3, "num_tokens": 2800.0, "tokens_per_second_per_device": 250.0, "loss": 6.0},
            {"step": 4, "num_tokens": 5800.0, "tokens_per_second_per_device": 500.0, "loss": 5.0}]
    got = metrics.real_token_throughput({"num_processes": 2, "log_history": logs}, warmup_steps=2)
    # 4000 tokens in 2 s + 3 s = 5 s over 2 devices: 400 tokens/s/device, 1000 tokens per step per device
    assert got["steps_measured"] == 2 and got["step_seconds"] == pytest.approx(2.5)
    assert got["real_tokens_per_second_per_device"] == pytest.approx(400.0)
    assert got["real_tokens_per_step_per_device"] == pytest.approx(1000.0)
    assert (got["loss_first"], got["loss_last"]) == (7.0, 5.0)
