"""eval_bfcl.py on BFCL multi-turn entries, end to end through its command line: the tiny demo model runs the official
multi-turn loop on a few short real entries; a killed run resumes over two processes with every id once; the result
files score like the official harness's own result files; summaries and compare show Multi-Turn and the leaderboard's
Overall. The loop, the checker and the aggregates are checked against the official code in test_bfcl_multi_turn.py."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run as run_command

from fcsft import bfcl_data
from fcsft.bfcl_data import read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("bfcl_eval", reason="bfcl-eval is installed by `make setup`")
BFCL_DATA = Path(bfcl_data.package_data_dir())
# Real entries with the shortest prompts (~5,400 tiny-tokenizer tokens, TradingBot only): base_105 has 2 turns,
# miss_func_105 3 (a held-out function added in turn 2), miss_param_105 3. Dataset order decides what --limit takes.
ENTRIES = {"multi_turn_base": [105, 132, 100], "multi_turn_miss_func": [105], "multi_turn_miss_param": [105],
           "multi_turn_long_context": [105]}
# The random demo model never stops on its own: 4 tokens a step (the official cap is 4096).
FAST = ["--multi-turn-step-tokens", "4", "--batch-size", "4"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(*args, check=True, python=(sys.executable,)):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return run_command([*python, *args], check=check, env=env)


def ids_of(path):
    return [row["id"] for row in read_jsonl(path)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A BFCL data folder holding a few real multi-turn entries (unchanged) with their answers and function docs."""
    out = tmp_path_factory.mktemp("multi_turn_data")
    (out / "possible_answer").mkdir()
    (out / "multi_turn_func_doc").symlink_to(BFCL_DATA / "multi_turn_func_doc")
    for category, numbers in ENTRIES.items():
        for folder in (BFCL_DATA, BFCL_DATA / "possible_answer"):
            rows = {row["id"]: row for row in read_jsonl(folder / f"BFCL_v4_{category}.json")}
            target = out / folder.relative_to(BFCL_DATA) / f"BFCL_v4_{category}.json"
            target.write_text("".join(json.dumps(rows[f"{category}_{n}"]) + "\n" for n in numbers))
    return out


@pytest.fixture(scope="module")
def model(assets, tmp_path_factory):
    """The tiny demo model with a 16k context (max_position_embeddings: rotary positions, no weights change), so
    that multi-turn prompts fit; at its 4k, every entry would end at once with the official overflow error."""
    out = tmp_path_factory.mktemp("tiny-qwen2-16k")
    for path in (assets / "tiny-qwen2").iterdir():
        shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    return out


@pytest.fixture(scope="module")
def runs(model, data_dir, tmp_path_factory):
    """One entry per category, killed while writing; then the rest over two processes; then nothing left."""
    out = tmp_path_factory.mktemp("multi_turn_run") / "tiny"
    args = ("eval_bfcl.py", "--model", model, "--data-dir", data_dir, "--categories", "multi_turn", "--output-dir", out,
            *FAST)
    first = run(*args, "--limit", "1")
    first_files = {path.name: path.read_text() for path in out.glob("BFCL_v4_*_result.json")}
    first_generation = json.loads((out / "generation.json").read_text())
    with open(out / "BFCL_v4_multi_turn_base_result.json", "a") as f:  # killed in the middle of writing a record
        f.write('{"id": "multi_turn_base_132", "result": [["<tool')
    second = run(*args, python=ACCELERATE)
    third = run(*args)
    return {"out": out, "first": first, "first_files": first_files, "first_generation": first_generation,
            "second": second, "third": third}


def test_tiny_model_runs_the_multi_turn_loop(runs, data_dir):
    assert "4 multi-turn entries to run over multi_turn_base, multi_turn_miss_func, multi_turn_miss_param, " \
           "multi_turn_long_context (0 already" in runs["first"].stdout
    turns = {row["id"]: len(row["question"]) for c in ENTRIES for row in read_jsonl(data_dir / f"BFCL_v4_{c}.json")}
    for name, text in runs["first_files"].items():
        (row,) = [json.loads(line) for line in text.splitlines()]
        # The official layout: per turn, the list of raw step outputs (a step without a call ends the turn)
        assert len(row["result"]) == turns[row["id"]] and all(turn and all(isinstance(step, str) for step in turn)
                                                            for turn in row["result"]), row
    stats = runs["first_generation"]["multi_turn"]
    assert stats["entries_generated"] == 4 and stats["entries_already_done"] == 0
    assert stats["steps"] >= 2 + 3 + 3 + 2 and stats["generated_tokens"] <= 4 * stats["steps"]
    assert stats["prompts_per_s"] > 0 and stats["generated_tokens_per_s"] > 0
    assert f"{stats['steps']} steps" in runs["first"].stdout


def test_killed_run_resumes_over_two_processes_with_every_id_once(runs):
    out = runs["out"]
    assert "2 multi-turn entries to run" in runs["second"].stdout and "(4 already in" in runs["second"].stdout
    assert not list(out.glob("*.rank*.jsonl"))
    for category, numbers in ENTRIES.items():
        assert ids_of(out / f"BFCL_v4_{category}_result.json") == [f"{category}_{n}" for n in numbers]
    base = (out / "BFCL_v4_multi_turn_base_result.json").read_text().splitlines()
    assert base[0] == runs["first_files"]["BFCL_v4_multi_turn_base_result.json"].splitlines()[0]  # not regenerated
    stats = json.loads((out / "generation.json").read_text())
    assert stats["num_processes"] == 2 and stats["multi_turn"]["entries_generated"] == 2
    assert stats["multi_turn"]["entries_already_done"] == 4
    assert "0 multi-turn entries to run" in runs["third"].stdout


def test_scores_summary_and_overall(runs):
    out = runs["out"]
    summary = json.loads((out / "summary.json").read_text())
    for category, numbers in ENTRIES.items():
        rows = read_jsonl(out / f"BFCL_v4_{category}_score.json")
        assert [r["id"] for r in rows] == [f"{category}_{n}" for n in numbers]
        assert all(isinstance(r["valid"], bool) and (r["valid"] or r["error_type"].startswith("multi_turn:"))
                   for r in rows)
        score = summary["categories"][category]
        assert score["total"] == score["expected"] == len(numbers)
        assert score["multi_turn"]["entries"] == len(numbers) and score["multi_turn"]["turns"] >= 2 * len(numbers)
    aggregates = summary["aggregates"]
    accuracies = [summary["categories"][c]["accuracy"] for c in ENTRIES]
    assert aggregates["Multi-Turn"]["accuracy"] == pytest.approx(sum(accuracies) / 4)
    overall = aggregates["Overall (leaderboard)"]
    assert overall["status"] == "partial" and overall["accuracy"] == pytest.approx(0.3 * sum(accuracies) / 4)
    assert "run: Multi-Turn; not run, counted 0: Non-Live, Live, Irrelevance, Agentic" in overall["formula"]
    markdown = (out / "summary.md").read_text()
    assert "| multi_turn_base | 3 |" in markdown and "Multi-turn error analysis" in markdown
    assert "| Overall (single-turn) | not run |" in markdown and "Agentic categories (web search, memory) are out of scope" in markdown


def test_official_layout_scores_the_same_and_compares(runs, data_dir, tmp_path):
    """Our result files moved into the official harness's layout (result/<model>/multi_turn/, with its extra keys)
    score the same through `eval_bfcl.py score`; compare shows both side by side."""
    folder = tmp_path / "result" / "tiny" / "multi_turn"
    folder.mkdir(parents=True)
    for path in runs["out"].glob("BFCL_v4_*_result.json"):
        rows = [{**row, "input_token_count": [], "output_token_count": [], "latency": []} for row in read_jsonl(path)]
        (folder / path.name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    scored = tmp_path / "scored"
    run("eval_bfcl.py", "score", "--result-dir", tmp_path / "result", "--output-dir", scored, "--data-dir", data_dir,
        "--prompt-format", "bfcl")
    for category in ENTRIES:
        ours = read_jsonl(runs["out"] / f"BFCL_v4_{category}_score.json")
        assert read_jsonl(scored / f"BFCL_v4_{category}_score.json") == ours
    table = run("eval_bfcl.py", "compare", runs["out"], scored).stdout
    assert "| multi_turn_base |" in table and "| **Multi-Turn** |" in table and "| **Overall (leaderboard)** |" in table
    assert "turns with a call" in table


def test_multi_turn_needs_the_qwen_fc_prompt(model, data_dir, tmp_path):
    proc = run("eval_bfcl.py", "--model", model, "--data-dir", data_dir, "--categories", "multi_turn_base",
               "--prompt-format", "chat_template", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "Qwen FC prompt" in proc.stderr
