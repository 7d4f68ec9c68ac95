"""eval_bfcl.py end to end, through its command line: generation with the tiny demo model on real BFCL entries and
on the demo's held-out split, resuming an interrupted run, multi-process generation, scoring BFCL-layout result
folders without a model, compare, and the aggregate formulas against hand-computed numbers."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import correct_qwen_output, qwen_call
from conftest import run as run_command

from fcsft import bfcl_data, bfcl_generation, bfcl_report, metrics
from fcsft.bfcl_data import read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("bfcl_eval", reason="bfcl-eval is installed by `make setup`")
BFCL_DATA = Path(bfcl_data.package_data_dir())
FAST = ["--max-new-tokens", "6", "--batch-size", "4"]  # the random demo model never stops on its own


def run(*args, check=True, env_extra=None, python=(sys.executable,)):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return run_command([*python, *args], check=check, env=env)


@pytest.fixture(scope="session")
def bfcl_demo_assets(assets):
    """The tiny Qwen2 model and the held-out BFCL-format split: conftest's session build of make_demo_assets.py."""
    assert (assets / "tiny-qwen2" / "config.json").exists() and (assets / "bfcl_heldout").is_dir()
    return assets


def ids_of(path):
    return [row["id"] for row in read_jsonl(path)]


# --- Generation ---------------------------------------------------------------------------------------------------


def test_generate_and_score_real_bfcl_entries(bfcl_demo_assets, tmp_path):
    out = tmp_path / "run"
    proc = run("eval_bfcl.py", "--model", bfcl_demo_assets / "tiny-qwen2", "--categories", "simple_java", "multiple",
               "irrelevance", "live_relevance", "--limit", "3", "--output-dir", out, *FAST)
    for category in ("simple_java", "multiple", "irrelevance", "live_relevance"):
        rows = read_jsonl(out / f"BFCL_v4_{category}_result.json")
        expected_ids = [json.loads(line)["id"] for line in (BFCL_DATA / f"BFCL_v4_{category}.json").read_text().splitlines()[:3]]
        assert [r["id"] for r in rows] == expected_ids and all(isinstance(r["result"], str) for r in rows)
        scores = read_jsonl(out / f"BFCL_v4_{category}_score.json")
        assert [s["id"] for s in scores] == expected_ids
        assert all(isinstance(s["valid"], bool) and (s["valid"] or s["error_type"]) for s in scores)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["categories"]["multiple"]["expected"] == 200 and summary["categories"]["multiple"]["total"] == 3
    # Garbage text has no call: irrelevance passes, relevance and AST entries fail.
    assert summary["categories"]["irrelevance"]["accuracy"] == 1.0
    assert summary["categories"]["live_relevance"]["accuracy"] == 0.0
    assert "simple_python" in summary["not_run"] and "live_multiple" in summary["not_run"]
    assert summary["aggregates"]["Simple AST"]["status"].startswith("incomplete")
    assert summary["aggregates"]["Live AST"]["status"] == "not run"
    assert summary["aggregates"]["Relevance"]["accuracy"] == 0.0
    generation = summary["generation"]
    assert generation["prompts_generated"] == 12 and generation["device"] == f"1 x {metrics.device_name()}"
    assert generation["wall_time_s"] > 0 and generation["prompts_per_s"] > 0 and generation["generated_tokens_per_s"] > 0
    markdown = (out / "summary.md").read_text()
    assert "| simple_python | not run |" in markdown and "out of scope" in markdown and "out of scope" in proc.stdout


def test_prompt_mode_uses_bfcl_system_prompt_and_python_decoder(bfcl_demo_assets, tmp_path):
    out = tmp_path / "run"
    run("eval_bfcl.py", "--model", bfcl_demo_assets / "tiny-qwen2", "--categories", "simple_python", "--limit", "2",
        "--mode", "prompt", "--output-dir", out, *FAST)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoder"] == "python" and summary["generation"]["mode"] == "prompt"
    assert summary["categories"]["simple_python"]["total"] == 2


def test_demo_heldout_split_and_compare(bfcl_demo_assets, tmp_path):
    """The Makefile's demo flow: --data-dir with `all` = every category found there, then compare."""
    heldout = bfcl_demo_assets / "bfcl_heldout"
    before, after = tmp_path / "before", tmp_path / "after"
    run("eval_bfcl.py", "--model", bfcl_demo_assets / "tiny-qwen2", "--data-dir", heldout, "--categories", "all",
        "--output-dir", before, *FAST)
    demo_categories = sorted(p.name[len("BFCL_v4_"):-len(".json")] for p in heldout.glob("BFCL_v4_*.json"))
    summary = json.loads((before / "summary.json").read_text())
    assert sorted(summary["categories"]) == demo_categories and len(demo_categories) == 5
    assert all(s["total"] == s["expected"] for s in summary["categories"].values())
    assert summary["aggregates"]["overall (custom)"]["status"] == "ok"

    # "after": the same results with every demo_simple entry replaced by its correct answer, re-scored.
    after.mkdir()
    for path in before.glob("BFCL_v4_*_result.json"):
        (after / path.name).write_text(path.read_text())
    answers = read_jsonl(heldout / "possible_answer" / "BFCL_v4_demo_simple.json")
    rows = [{"id": a["id"], "result": correct_qwen_output(a)} for a in answers]
    (after / "BFCL_v4_demo_simple_result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (after / "generation.json").write_text((before / "generation.json").read_text())
    run("eval_bfcl.py", "score", "--result-dir", after)
    assert json.loads((after / "summary.json").read_text())["categories"]["demo_simple"]["accuracy"] == 1.0

    plot = tmp_path / "compare.png"
    table = run("eval_bfcl.py", "compare", before, after, "--plot", plot).stdout
    demo_simple_row = next(line for line in table.splitlines() if line.startswith("| demo_simple "))
    assert demo_simple_row.split("|")[2:5] == [" 0.00 ", " 100.00 ", " +100.00 "]
    assert "overall (custom)" in table and "simple_python" not in table and "out of scope" in table
    # Error analysis: every step of demo_simple went from 0 to 100%; the error types the correct answers removed.
    for step in ("decodes as calls", "right function(s)", "right arguments"):
        assert f"| demo_simple | {step} | 0.00 | 100.00 | +100.00 |" in table
    assert f"Prompt format: {before}: bfcl, {after}: bfcl" in table
    assert "| demo_simple | simple_function_checker:wrong_count | 10 | 0 |" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    # A run prompted through the chat template is not compared silently with a `bfcl` one.
    other = tmp_path / "chat_template"
    other.mkdir()
    for path in after.glob("BFCL_v4_*_result.json"):
        (other / path.name).write_text(path.read_text())
    generation = json.loads((after / "generation.json").read_text())
    (other / "generation.json").write_text(json.dumps({**generation, "prompt_format": "chat_template"}))
    run("eval_bfcl.py", "score", "--result-dir", other)
    proc = run("eval_bfcl.py", "compare", before, other, check=False)
    assert proc.returncode != 0 and "prompted differently" in proc.stderr and "chat_template" in proc.stderr
    assert f"{other}: chat_template" in run("eval_bfcl.py", "compare", before, other, "--mixed-formats").stdout


def test_interrupted_run_resumes_missing_ids_only(bfcl_demo_assets, tmp_path):
    out = tmp_path / "run"
    heldout = bfcl_demo_assets / "bfcl_heldout"
    args = ("eval_bfcl.py", "--model", bfcl_demo_assets / "tiny-qwen2", "--data-dir", heldout, "--categories", "all",
            "--limit", "4", "--output-dir", out, "--no-score", *FAST)
    run(*args)
    files = sorted(out.glob("BFCL_v4_*_result.json"))
    complete = {path: path.read_text().splitlines() for path in files}
    # Simulate a kill: one file lost its last two lines, one was cut mid-line, one got a duplicate appended.
    files[0].write_text("\n".join(complete[files[0]][:2]) + "\n")
    files[1].write_text("\n".join(complete[files[1]][:3]) + "\n" + complete[files[1]][3][:15])
    files[2].write_text("\n".join(complete[files[2]] + complete[files[2]][:1]) + "\n")
    proc = run(*args)
    assert "3 prompts to generate" in proc.stdout  # two lost + one truncated, nothing else
    assert json.loads((out / "generation.json").read_text())["prompts_generated"] == 3
    for path in files:
        lines = path.read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [json.loads(line)["id"] for line in complete[path]]
    assert files[0].read_text().splitlines()[:2] == complete[files[0]][:2]  # kept results are not regenerated
    assert files[2].read_text().splitlines() == complete[files[2]]
    assert "0 prompts to generate" in run(*args).stdout

    # Other generation settings (or retrained weights at the same path) never resume these results.
    proc = run(*args[:-len(FAST)], "--max-new-tokens", "5", "--batch-size", "4", check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert "20 prompts to generate" in run(*args[:-len(FAST)], "--max-new-tokens", "5", "--batch-size", "4", "--overwrite").stdout  # 5 x 4


def test_weights_fingerprint_follows_content_not_timestamps(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 3_000_000)
    before = bfcl_generation.weights_fingerprint(tmp_path)
    weights.write_bytes(b"\0" * 3_000_000)  # rebuilt identically: same fingerprint
    assert bfcl_generation.weights_fingerprint(tmp_path) == before
    weights.write_bytes(b"\0" * 2_999_999 + b"\1")  # retrained: different
    assert bfcl_generation.weights_fingerprint(tmp_path) != before
    assert bfcl_generation.weights_fingerprint("Qwen/Qwen2.5-3B-Instruct") is None  # hub ids are identified by name


def test_multi_process_generation_merges_rank_files(bfcl_demo_assets, tmp_path):
    out = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run("eval_bfcl.py", "--model", bfcl_demo_assets / "tiny-qwen2", "--data-dir", bfcl_demo_assets / "bfcl_heldout",
        "--categories", "demo_simple", "demo_parallel", "--limit", "3", "--output-dir", out, *FAST, python=accelerate)
    assert not list(out.glob("*.rank*.jsonl"))
    for category in ("demo_simple", "demo_parallel"):
        assert ids_of(out / f"BFCL_v4_{category}_result.json") == [f"{category}_{i}" for i in range(3)]
    generation = json.loads((out / "generation.json").read_text())
    assert generation["num_processes"] == 2 and generation["prompts_generated"] == 6


# --- Scoring without a model -------------------------------------------------------------------------------------


def test_score_bfcl_layout_without_model(tmp_path):
    """BFCL's own layout (result/<model>/<group>/...), right and wrong answers, garbage that must not crash."""
    answers = read_jsonl(BFCL_DATA / "possible_answer" / "BFCL_v4_simple_python.json")[:10]
    rows = []
    for i, answer in enumerate(answers):
        output = correct_qwen_output(answer)
        rows.append({"id": answer["id"], "result": output if i < 6 else output.replace('"name": "', '"name": "x_', 1)})
    rows[7]["result"] = 12345  # not even text
    rows[8]["result"] = "<tool_call>\n{broken json\n</tool_call> and prose"
    folder = tmp_path / "result" / "Qwen_Qwen2.5-3B-Instruct-FC" / "non_live"
    folder.mkdir(parents=True)
    (folder / "BFCL_v4_simple_python_result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "BFCL_v4_irrelevance_result.json").write_text(
        json.dumps({"id": "irrelevance_0", "result": "No function fits."}) + "\n"
        + json.dumps({"id": "irrelevance_1", "result": qwen_call("f", {})}) + "\n")
    out = tmp_path / "score"
    run("eval_bfcl.py", "score", "--result-dir", tmp_path / "result", "--output-dir", out, "--prompt-format", "bfcl")
    scores = read_jsonl(out / "BFCL_v4_simple_python_score.json")
    assert [s["valid"] for s in scores] == [True] * 6 + [False] * 4
    assert scores[6]["error_type"] == "simple_function_checker:wrong_func_name"
    assert scores[7]["error_type"] == "ast_decoder:decoder_failed"  # not a string
    assert scores[8]["error_type"] == "simple_function_checker:wrong_count"  # unparsable blocks are skipped
    assert all(s["error"] for s in scores[6:])
    summary = json.loads((out / "summary.json").read_text())
    # Decoded as calls: all but the non-text and the broken block (8/10); right function: the 6 correct ones.
    assert summary["categories"]["simple_python"] == {"accuracy": 0.6, "correct": 6, "total": 10, "expected": 400,
        "error_types": {"simple_function_checker:wrong_func_name": 2, "ast_decoder:decoder_failed": 1,
                        "simple_function_checker:wrong_count": 1},
        "rates": {"decodes_as_calls": 0.8, "right_functions": 0.6, "correct": 0.6}}
    assert [s["decodes_as_calls"] for s in scores] == [True] * 7 + [False, False, True]
    assert summary["categories"]["irrelevance"]["accuracy"] == 0.5
    assert summary["categories"]["irrelevance"]["rates"] == {"decodes_as_calls": 0.5, "right_functions": None, "correct": 0.5}
    assert summary["generation"] is None and summary["decoder"] == "qwen"
    assert summary["prompt_format"]["prompt_format"] == "bfcl"  # declared with --prompt-format for foreign files
    markdown = (out / "summary.md").read_text()
    assert "| simple_python | 80.00 | 60.00 | 60.00 | simple_function_checker:wrong_func_name 2, " in markdown
    assert "| irrelevance | 50.00 |  | 50.00 | irrelevance_error:decoder_success 1 |" in markdown


def test_clear_errors(tmp_path):
    (tmp_path / "BFCL_v4_simple_python_result.json").write_text('{"id": "simple_python_0", "result": "x"}\nnot json\n{"id": 1}\n')
    proc = run("eval_bfcl.py", "score", "--result-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "BFCL_v4_simple_python_result.json:2" in proc.stderr
    proc = run("eval_bfcl.py", "--model", "unused", "--categories", "web_search", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "out of scope" in proc.stderr and "paid search API" in proc.stderr


# --- Aggregation -----------------------------------------------------------------------------------------------------


def test_aggregates_match_hand_computed_numbers():
    s = lambda accuracy, total: {"accuracy": accuracy, "total": total}  # noqa: E731
    scores = {
        "simple_python": s(0.90, 400), "simple_java": s(0.60, 100), "simple_javascript": s(0.30, 50),
        "multiple": s(0.80, 200), "parallel": s(0.70, 200), "parallel_multiple": s(0.50, 200),
        "irrelevance": s(0.85, 240), "live_simple": s(0.75, 258), "live_multiple": s(0.65, 1053),
        "live_parallel": s(0.50, 16), "live_parallel_multiple": s(0.25, 24), "live_irrelevance": s(0.40, 884),
        "live_relevance": s(0.875, 16), "demo_simple": s(0.5, 10), "demo_parallel": s(0.1, 30),
    }
    agg = bfcl_report.aggregate_scores(scores)
    assert agg["Simple AST"]["accuracy"] == pytest.approx(0.60)  # (0.9 + 0.6 + 0.3) / 3
    assert agg["Non-Live AST"]["accuracy"] == pytest.approx(0.65)  # (0.6 + 0.8 + 0.7 + 0.5) / 4
    # (0.75*258 + 0.65*1053 + 0.5*16 + 0.25*24) / 1351 = 891.95 / 1351
    assert agg["Live AST"]["accuracy"] == pytest.approx(891.95 / 1351)
    assert agg["Irrelevance"]["accuracy"] == pytest.approx(0.625)  # (0.85 + 0.40) / 2
    assert agg["Relevance"]["accuracy"] == pytest.approx(0.875)
    assert agg["overall (custom)"]["accuracy"] == pytest.approx(0.3)  # (0.5 + 0.1) / 2, unweighted

    partial = bfcl_report.aggregate_scores({"simple_python": s(0.9, 400), "live_simple": s(0.5, 10)})
    assert partial["Simple AST"] == {**partial["Simple AST"], "accuracy": None, "status": "incomplete (missing simple_java, simple_javascript)"}
    assert partial["Non-Live AST"]["accuracy"] is None and partial["Irrelevance"]["status"] == "not run"
    assert partial["Live AST"]["status"].startswith("incomplete") and "overall (custom)" not in partial


# --- Error analysis ------------------------------------------------------------------------------------------------


def test_call_outcome_hand_worked_cases():
    """decodes as calls -> right function(s) -> right arguments, on cases worked out by hand."""
    from fcsft.bfcl_checker import call_outcome, score_bfcl_entry

    weather = {"name": "weather", "parameters": {"type": "dict", "required": ["city"],
                                                 "properties": {"city": {"type": "string"}}}}
    time_ = {"name": "time", "parameters": {"type": "dict", "required": ["zone"],
                                            "properties": {"zone": {"type": "string"}}}}
    entry = {"function": [weather, time_]}
    parallel_truth = [{"weather": {"city": ["Oslo"]}}, {"time": {"zone": ["CET"]}}]

    def outcome(output, category, truth):
        verdict = score_bfcl_entry(entry, output, category, ground_truth=truth)
        result = call_outcome(verdict, category, truth)
        return result["decodes_as_calls"], result["right_functions"], result["correct"], verdict.get("error_type")

    oslo, cet = qwen_call("weather", {"city": "Oslo"}), qwen_call("time", {"zone": "CET"})
    simple_truth = [{"weather": {"city": ["Oslo"]}}]
    assert outcome(oslo, "simple_python", simple_truth) == (True, True, True, None)
    assert outcome(qwen_call("weather", {"city": "Bergen"}), "simple_python", simple_truth) == \
        (True, True, False, "value_error:string")
    assert outcome(cet, "simple_python", simple_truth) == (True, False, False, "simple_function_checker:wrong_func_name")
    assert outcome("It is sunny.", "simple_python", simple_truth) == (False, False, False, "simple_function_checker:wrong_count")
    assert outcome("<tool_call>\n[1]\n</tool_call>", "simple_python", simple_truth) == \
        (False, False, False, "ast_decoder:decoder_failed")
    # Parallel: the same functions in another order are the right ones; one missing is not.
    assert outcome(cet + "\n" + oslo, "parallel", parallel_truth) == (True, True, True, None)
    assert outcome(qwen_call("time", {"zone": "UTC"}) + "\n" + oslo, "parallel", parallel_truth) == \
        (True, True, False, "parallel_function_checker_no_order:cannot_find_match")
    assert outcome(oslo, "parallel", parallel_truth) == \
        (True, False, False, "parallel_function_checker_no_order:wrong_count")
    assert outcome(oslo + "\n" + oslo, "parallel", parallel_truth) == \
        (True, False, False, "parallel_function_checker_no_order:cannot_find_match")
    # Relevance categories: no function step; a decoded call is the mistake in irrelevance.
    assert outcome(oslo, "irrelevance", None) == (True, None, False, "irrelevance_error:decoder_success")
    assert outcome("None of these fit.", "live_relevance", None) == (False, None, False, "relevance_error:decoder_failed")
