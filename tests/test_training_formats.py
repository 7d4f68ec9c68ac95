"""train_sft.py on training data as users have it (fcsft/data_formats.py behind `format:`): OpenAI-style multi-turn
conversations with tool results and string arguments, LLaMA-Factory ShareGPT rows, `auto`, the checks per reason,
every user turn decontaminated, --export_data, --show_examples on a multi-turn row, and a 2-process FSDP run."""

import json
import re
from types import SimpleNamespace

import pytest
import yaml
from conftest import ACCELERATE, PYTHON, REPO, run

from fcsft import recipe as fcsft_recipe
from fcsft import training_data
from fcsft.decontamination import BfclQuestions
from fcsft.errors import UserError

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
CITIES = ["Paris", "Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth", "Turin", "Bern", "Hanoi"] * 4


def call(call_id, name, arguments):
    """An OpenAI fine-tuning tool call: arguments as a JSON string, as OpenAI writes them."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def openai_row(i, city, second_question="And the time there?"):
    """Two calls, each answered by its tool result and a reply; row 0's first reply has weight 0 (shown, not trained)."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"What's the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": city, "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 10 + i})},
        {"role": "assistant", "content": f"It is {10 + i} degrees in {city}."},
        {"role": "user", "content": second_question},
        {"role": "assistant", "content": None, "tool_calls": [call("call_2", "get_time", {"city": city})]},
        {"role": "tool", "tool_call_id": "call_2", "content": f"{i % 12 + 1}:05"},
        {"role": "assistant", "content": f"It is {i % 12 + 1}:05 in {city}."},
    ]
    if i == 0:
        messages[4]["weight"] = 0
    return {"messages": messages, "tools": TOOLS}


def sharegpt_row(i, city):
    """LLaMA-Factory's layout: function_call / observation turns, `tools` as a JSON string of bare functions."""
    return {"conversations": [
        {"from": "human", "value": f"Time in {city} please"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"city": city}})},
        {"from": "observation", "value": f"{i % 12 + 1}:30"},
        {"from": "gpt", "value": f"In {city} it is {i % 12 + 1}:30."}],
        "system": "Answer briefly.", "tools": json.dumps([t["function"] for t in TOOLS])}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conversations")
    return {"openai": write_jsonl(folder / "openai.jsonl", [openai_row(i, c) for i, c in enumerate(CITIES)]),
            "sharegpt": write_jsonl(folder / "sharegpt.jsonl", [sharegpt_row(i, c) for i, c in enumerate(CITIES)])}


def write_recipe(assets, folder, **overrides):
    """recipes/demo_cpu.yaml on the session's tiny model, with overrides."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), output_dir=str(folder / "out"), report_to=["none"],
                  decontaminate=False)
    recipe.pop("dataset_name")
    recipe.update(overrides)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def mixture(assets, conversations):
    return [{"path": str(assets / "xlam_sample" / "train.jsonl"), "format": "xlam"},
            {"path": str(conversations["openai"]), "format": "auto"},
            {"path": str(conversations["sharegpt"]), "format": "auto"}]


# --- --export_data: the rows the trainer tokenizes, no model ---------------------------------------------------------


def test_export_data_writes_the_converted_mixture_without_a_model(assets, conversations, tmp_path):
    recipe = write_recipe(assets, tmp_path, datasets=mixture(assets, conversations), function_masking_fraction=0.5,
                          model_name_or_path=str(tmp_path / "no-such-model"))  # nothing loads it
    out = tmp_path / "rows.jsonl"
    proc = run([PYTHON, "train_sft.py", recipe, "--export_data", out])
    assert f"{conversations['openai']} (openai, auto): 40 rows, 0 skipped, 0 decontaminated, 40 taken" in proc.stdout
    assert f"{conversations['sharegpt']} (sharegpt, auto): 40 rows, 0 skipped, 0 decontaminated, 40 taken" in proc.stdout
    assert f"wrote 680 rows to {out}" in proc.stdout
    assert f"{conversations['openai']} (openai, detected by format: auto)" in proc.stderr  # the log says what auto chose
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 680 and all(set(row) == {"messages", "tools"} for row in rows)
    conversational = [row for row in rows if any(m["role"] == "tool" for m in row["messages"])]
    assert len(conversational) == 80
    masked = 0
    for row in conversational:
        names = {t["function"]["name"] for t in row["tools"]}
        calls = [c for m in row["messages"] for c in m.get("tool_calls") or []]
        for c in calls:  # arguments decoded to objects; masked names the same in the tools and in every turn
            assert isinstance(c["function"]["arguments"], dict) and c["function"]["name"] in names
            properties = next(t for t in row["tools"] if t["function"]["name"] == c["function"]["name"])["function"]["parameters"]["properties"]
            assert set(c["function"]["arguments"]) <= set(properties)
        results = [m["name"] for m in row["messages"] if m["role"] == "tool"]
        assert results == [c["function"]["name"] for c in calls]  # each result named after the call it answers
        masked += not names & {"get_weather", "get_time"}
    assert masked == 40  # half of each source's rows with tools


# --- the checks, auto, decontamination, in-process ---------------------------------------------------------------


def build(path, **overrides):
    args = fcsft_recipe.ScriptArguments(**{"dataset_name": str(path), "dataset_format": "auto", "decontaminate": False,
                                            **overrides})
    return training_data.build_datasets(args, 42)


def test_checks_are_counted_by_reason_with_the_first_offending_row(tmp_path, caplog):
    good = [openai_row(i, c) for i, c in enumerate(CITIES[:10])]
    bad_arguments = openai_row(20, "Rome")
    bad_arguments["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Rome"'  # cut off
    unknown_tool = openai_row(21, "Nice")
    unknown_tool["messages"][6]["tool_calls"][0]["function"]["name"] = "get_date"
    orphan = openai_row(22, "Riga")
    orphan["messages"].insert(1, {"role": "tool", "content": "21 degrees"})
    untrained = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", good + [bad_arguments, unknown_tool, orphan, untrained, bad_arguments])
    train, _, report = build(path, max_malformed_fraction=0.5)
    stats = report["sources"][0]
    assert len(train) == 10 and stats["format"] == "openai" and stats["detected"]
    assert dict(stats["skipped"]) == {"bad_arguments": 2, "unknown_tool": 1, "orphan_tool_result": 1, "no_trained_turn": 1}
    assert stats["first_bad"]["bad_arguments"].startswith("row 10: ") and "get_date" in stats["first_bad"]["unknown_tool"]
    assert re.search(r"bad_arguments\s+2  \(first: row 10", caplog.text)
    with pytest.raises(UserError, match=r"5 of 15 rows of .*mixed.jsonl are malformed.*\(read as openai; first bad_arguments: row 10"):
        build(path, max_malformed_fraction=0.1)


def test_formats_are_named_when_wrong(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(UserError, match=r"cannot tell the data format from the columns \['question', 'reply'\]"):
        build(path)
    with pytest.raises(UserError, match=r"dataset_format 'chatml' in .* is not one of \('auto', 'openai'"):
        training_data.source_configs(fcsft_recipe.ScriptArguments(dataset_name="x.jsonl", dataset_format="chatml"))
    with pytest.raises(UserError, match="mixes conversational .* and prompt/completion datasets"):
        training_data.source_configs(fcsft_recipe.ScriptArguments(
            datasets=[{"path": "a.jsonl", "format": "sharegpt"}, {"path": "b.jsonl", "format": "dolly"}]))


def test_decontamination_checks_every_user_turn(tmp_path):
    question = next(text for _, text in BfclQuestions().texts if len(text.split()) > 20)
    rows = [openai_row(i, c) for i, c in enumerate(CITIES[:10])]
    rows[3] = openai_row(3, "Oslo", second_question=question)  # the copied question is the second user turn
    train, _, report = build(write_jsonl(tmp_path / "contaminated.jsonl", rows), decontaminate=True)
    assert report["sources"][0]["decontaminated"] == 1 and len(train) == 9
    assert report["sources"][0]["decontaminated_example"].startswith(repr(question[:100]))


def test_weight_zero_needs_the_assistant_only_loss(assets):
    """Without assistant_only_loss the whole text is trained, so weight 0 would mean nothing: stop before the model."""
    model_args = SimpleNamespace(model_name_or_path=str(assets / "tiny-qwen2"), model_revision=None)
    with pytest.raises(UserError, match="1 assistant turns have weight 0 .* only assistant_only_loss: true honours"):
        training_data.weight_zero_tokenizer(model_args, SimpleNamespace(assistant_only_loss=False), {"untrained_turns": 1})
    no_weights = training_data.weight_zero_tokenizer(model_args, SimpleNamespace(assistant_only_loss=False), {"untrained_turns": 0})
    assert no_weights is None  # the trainer loads the tokenizer itself, as before


# --- what the model is trained on ------------------------------------------------------------------------------------


def expected_trained_spans(row):
    """The assistant turns as Qwen2.5's template renders them, weight-0 turns left out: exactly what carries loss."""
    spans = []
    for message in row["messages"]:
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        text = "\n" + message["content"] if message["content"] else ""
        for c in message.get("tool_calls") or []:
            arguments = json.loads(c["function"]["arguments"])
            text += '\n<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (c["function"]["name"], json.dumps(arguments))
        spans.append(text + "<|im_end|>\n")
    return spans


def test_every_assistant_turn_of_a_conversation_is_trained_and_nothing_else(assets, conversations, tmp_path):
    """--show_examples on multi-turn rows: the trained spans are the calls and the replies (not the user turns, not the
    tool results, not the weight-0 reply of row 0)."""
    recipe = write_recipe(assets, tmp_path, dataset_name=str(conversations["openai"]), dataset_format="openai")
    proc = run([PYTHON, "train_sft.py", recipe, "--show_examples", "40"])
    examples = proc.stdout.split("=== example ")[1:]
    rows = {f"It is {10 + i} degrees in {c}.": openai_row(i, c) for i, c in enumerate(CITIES)}
    assert len(examples) == 40
    for text in examples:
        row = rows[re.search(r"It is \d+ degrees in \w+\.", text).group(0)]
        assert re.findall(r"⟦(.*?)⟧", text, re.S) == expected_trained_spans(row)
    assert sum("⟦\nIt is 10 degrees in Paris." in text for text in examples) == 0  # weight 0: shown, not trained
    assert sum("It is 10 degrees in Paris." in text for text in examples) == 1


# --- a 2-process FSDP run on a multi-turn mixture ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(assets, conversations, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multiturn_fsdp")
    recipe = write_recipe(assets, folder, datasets=mixture(assets, conversations), max_samples=80, num_train_epochs=1,
                          per_device_train_batch_size=2, max_length=512, logging_steps=1, function_masking_fraction=0.5)
    proc = run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / "cpu_fsdp_full.yaml", "train_sft.py", recipe])
    return proc, folder / "out"


def chat_template(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return config.get("chat_template") or (folder / "chat_template.jinja").read_text()


def test_a_multi_turn_mixture_trains_under_fsdp_and_its_loss_falls(assets, fsdp_run):
    proc, out = fsdp_run
    summary = json.loads((out / "run_summary.json").read_text())
    sources = summary["data"]["sources"]
    assert [(s["format"], s["taken"]) for s in sources] == [("xlam", 80), ("openai", 40), ("sharegpt", 40)]
    assert summary["data"]["untrained_turns"] == 1 and "1 assistant turns have weight 0" in proc.stderr
    losses = [log["loss"] for log in summary["log_history"] if "loss" in log]
    assert summary["global_step"] == 40 and len(losses) == 40  # 160 rows / (2 rows x 2 processes) per step
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    # weight 0 trained through a training chat template; the saved tokenizer has the model's own template back
    assert chat_template(out) == chat_template(assets / "tiny-qwen2") and "endgeneration" not in chat_template(out)
