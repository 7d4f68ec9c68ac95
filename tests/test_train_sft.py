"""train_sft.py without FSDP: recipe parsing, data conversion, malformed rows, and the loss mask token by token."""

import json
import re

import pytest
from conftest import PYTHON, REPO, run

from fcsft import chat_formats
from fcsft import recipe as fcsft_recipe

# --- recipes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe, monkeypatch):
    """Every shipped recipe names only real keys (the parser rejects unknown ones)."""

    # bf16 and QLoRA's bitsandbytes/CUDA are checked against the machine at parse time; the keys are what this test
    # checks (tests/test_lora_qlora.py tests those checks).
    monkeypatch.setattr(fcsft_recipe, "launch_environment", lambda: dict(
        fsdp=False, mixed_precision="no", bitsandbytes_installed=True, cuda_available=True))
    script_args, training_args, model_args = fcsft_recipe.parse_recipe([str(REPO / "recipes" / recipe), "--bf16", "false"])
    assert (script_args.dataset_name or script_args.datasets) and model_args.model_name_or_path
    assert training_args.output_dir.startswith("runs/")


def test_unknown_recipe_key_names_key_and_file(demo_recipe):
    recipe = demo_recipe(learning_rat=1e-3)
    proc = run([PYTHON, "train_sft.py", recipe, "--show_examples", "1"], check=False)
    assert proc.returncode != 0
    assert f"unknown key 'learning_rat' in {recipe}" in proc.stderr
    assert "did you mean 'learning_rate'" in proc.stderr
    assert "Loading weights" not in proc.stderr  # failed before any model was loaded


def test_unknown_flag_and_missing_files(demo_recipe, tmp_path):
    proc = run([PYTHON, "train_sft.py", demo_recipe(), "--num_epochs", "2"], check=False)
    assert proc.returncode != 0 and "unknown command-line flag '--num_epochs'" in proc.stderr
    proc = run([PYTHON, "train_sft.py", tmp_path / "nope.yaml"], check=False)
    assert proc.returncode != 0 and f"recipe file not found: {tmp_path / 'nope.yaml'}" in proc.stderr
    proc = run([PYTHON, "train_sft.py", demo_recipe(dataset_name=str(tmp_path / "missing.jsonl"))], check=False)
    assert proc.returncode != 0 and f"dataset_name file not found: {tmp_path / 'missing.jsonl'}" in proc.stderr


def test_command_line_overrides_recipe(demo_recipe):

    _, training_args, _ = fcsft_recipe.parse_recipe([str(demo_recipe()), "--learning_rate", "0.5", "--max_steps", "3"])
    assert training_args.learning_rate == 0.5 and training_args.max_steps == 3


# --- xLAM conversion -----------------------------------------------------------------------------------------------


def test_python_types_to_json_schema():
    assert chat_formats.python_type_to_schema("str") == {"type": "string"}
    assert chat_formats.python_type_to_schema("float") == {"type": "number"}
    assert chat_formats.python_type_to_schema("List[int]") == {"type": "array", "items": {"type": "integer"}}
    assert chat_formats.python_type_to_schema("Dict[str, Any]") == {"type": "object", "additionalProperties": {"type": "string"}}
    assert chat_formats.python_type_to_schema("List[Dict[str, int]]") == {
        "type": "array", "items": {"type": "object", "additionalProperties": {"type": "integer"}}}
    assert chat_formats.python_type_to_schema("Optional[bool]") == {"type": "boolean"}
    assert chat_formats.python_type_to_schema("Tuple[float, float]") == {"type": "array", "items": {"type": "number"}}


def test_required_is_neither_optional_nor_defaulted():
    tool = {"name": "f", "description": "d", "parameters": {
        "a": {"type": "str", "description": "x"},
        "b": {"type": "int, optional", "description": "y"},
        "c": {"type": "int", "description": "z", "default": 3},
        "d": {"type": "Optional[str]", "description": "w"},
    }}
    schema = chat_formats.xlam_tool_to_schema(tool)["function"]["parameters"]
    assert schema["required"] == ["a"]
    assert schema["properties"]["b"] == {"type": "integer", "description": "y"}
    assert schema["properties"]["c"]["default"] == 3


def test_xlam_row_to_messages():
    row = {"query": "weather in Oslo?", "tools": json.dumps([{"name": "get_weather", "description": "w",
           "parameters": {"city": {"type": "str", "description": "c"}}}]),
           "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])}
    out = chat_formats.xlam_to_messages(row)
    assert out["messages"][0] == {"role": "user", "content": "weather in Oslo?"}
    assert out["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert out["tools"][0]["function"]["parameters"]["required"] == ["city"]


@pytest.mark.parametrize("row, reason", [
    ({"query": "q", "tools": "[{bad json", "answers": "[]"}, "bad_json_tools"),
    ({"query": "q", "answers": "[]"}, "missing_tools"),
    ({"tools": "[]", "answers": "[]"}, "missing_query"),
    ({"query": "q", "tools": '[{"name": "f", "parameters": {}}]', "answers": '[{"name": "g", "arguments": {}}]'}, "unknown_tool"),
    ({"query": "q", "tools": '[{"name": "f", "parameters": {}}]', "answers": '[{"name": "f", "arguments": [1]}]'}, "bad_answer_shape"),
])
def test_malformed_xlam_rows_have_reasons(row, reason):
    with pytest.raises(chat_formats.MalformedRow) as err:
        chat_formats.xlam_to_messages(row)
    assert err.value.reason == reason


# --- the real command on tiny inputs ---------------------------------------------------------------------------------


def _mixed_dataset(assets, tmp_path, n_bad):
    rows = [json.loads(line) for line in (assets / "xlam_sample" / "train.jsonl").read_text().splitlines()[:40]]
    for row in rows[:n_bad]:
        row["answers"] = json.dumps([{"name": "not_listed", "arguments": {}}])
    rows[-1]["tools"] = "{truncated"
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_malformed_rows_are_counted_and_threshold_fails(assets, demo_recipe, tmp_path):
    data = _mixed_dataset(assets, tmp_path, n_bad=3)
    proc = run([PYTHON, "train_sft.py", demo_recipe(dataset_name=str(data), max_malformed_fraction=0.2), "--show_examples", "1"])
    assert re.search(r"skipped 4 of 40 rows", proc.stderr)
    assert re.search(r"unknown_tool\s+3", proc.stderr) and re.search(r"bad_json_tools\s+1", proc.stderr)
    proc = run([PYTHON, "train_sft.py", demo_recipe(dataset_name=str(data), max_malformed_fraction=0.05), "--show_examples", "1"], check=False)
    assert proc.returncode != 0
    assert f"4 of 40 rows of {data} are malformed, more than max_malformed_fraction=0.05" in proc.stderr


def test_loss_mask_is_exactly_the_assistant_turn(assets, demo_recipe):
    """--show_examples marks the tokens with labels != -100; they must be exactly the rendered tool calls + <|im_end|>."""
    proc = run([PYTHON, "train_sft.py", demo_recipe(irrelevance_fraction=0.0), "--show_examples", "12"])
    examples = proc.stdout.split("=== example ")[1:]
    assert len(examples) == 12
    rows = [json.loads(line) for line in (assets / "xlam_sample" / "train.jsonl").read_text().splitlines()]
    def expected_reply(row):
        answers = json.loads(row["answers"])
        if not answers:  # the sample's "no tool fits" rows: a plain reply
            return "\n" + chat_formats.NO_TOOL_FITS_REPLY + "<|im_end|>\n"
        return "".join('\n<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (a["name"], json.dumps(a["arguments"]))
                       for a in answers) + "<|im_end|>\n"

    replies = {}  # a request can appear twice: once with its tool listed, once (no call) without
    for row in rows:
        replies.setdefault(row["query"], []).append(expected_reply(row))
    for text in examples:
        assert text.count("⟦") == 1 and text.count("⟧") == 1, text  # one contiguous trained span
        prompt, trained = text.split("⟦")[0], text.split("⟦")[1].split("⟧")[0]
        query = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", prompt, re.S).group(1)
        assert prompt.endswith("<|im_start|>assistant")  # everything before the reply carries no loss
        assert trained in replies[query]
        n_tokens, n_trained = map(int, re.match(r"\d+: (\d+) tokens, (\d+) trained", text).groups())
        assert 0 < n_trained < n_tokens


def test_single_process_training_logs_to_wandb_offline(demo_recipe, assets, tmp_path):
    """No account, no network: W&B logs offline; the summary reports real-token throughput and peak memory, and the
    rows the trainer cut or dropped for max_length, per source."""
    import os

    env = {**os.environ, "WANDB_DIR": str(tmp_path)}
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    lines = (assets / "xlam_sample" / "train.jsonl").read_text().splitlines(keepends=True)
    halves = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    halves[0].write_text("".join(lines[:300]))
    halves[1].write_text("".join(lines[300:]))
    recipe = demo_recipe(report_to=["wandb"], dataset_name=None, max_length=200,
                         datasets=[{"path": str(h), "format": "xlam"} for h in halves])
    proc = run([PYTHON, "train_sft.py", recipe, "--max_steps", "3", "--logging_steps", "1",
                "--per_device_train_batch_size", "2"], env=env)
    length = json.loads((tmp_path / "out" / "run_summary.json").read_text())["data"]["length"]
    assert set(length["per_source"]) == {str(h) for h in halves} and length["dropped_for_length"] > 0
    assert length["dropped_for_length"] == sum(s["dropped_for_length"] for s in length["per_source"].values())
    assert length["rows_given"] - length["rows_kept"] == length["dropped_for_length"]
    for half in halves:
        assert f"data: {half}: max_length 200: " in proc.stderr
    assert "logging offline" in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DistributedType.NO" and summary["num_processes"] == 1
    logs = [log for log in summary["log_history"] if "loss" in log]
    assert logs[-1]["tokens_per_second_per_device"] > 0 and logs[-1]["peak_rss_gib"] > 0.1
