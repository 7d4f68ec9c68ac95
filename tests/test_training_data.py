"""training_data.py: the data recipe (mixtures, irrelevance, function masking, extra tools, curriculum,
decontamination) on rows in the real xlam schema, and the recipe input errors, through train_sft.py's own commands."""

import json
import re

import pytest
import yaml
from conftest import ACCELERATE, PYTHON, REPO, run

from fcsft import chat_formats, decontamination, training_data
from fcsft import recipe as fcsft_recipe
from fcsft.errors import UserError


def sample_rows(assets, n=None):
    rows = [json.loads(line) for line in (assets / "xlam_sample" / "train.jsonl").read_text().splitlines()]
    return rows[:n] if n else rows


def script_args(**overrides):

    return fcsft_recipe.ScriptArguments(**{"decontaminate": False, **overrides})


def build(assets, seed=42, **overrides):
    args = script_args(dataset_name=str(assets / "xlam_sample" / "train.jsonl"), **overrides)
    return training_data.build_datasets(args, seed)


# --- the transforms, one row at a time ------------------------------------------------------------------------------


def test_irrelevance_removes_the_called_tools_and_answers_in_plain_text(assets):
    rows = [chat_formats.parse_xlam_row(r) for r in sample_rows(assets) if json.loads(r["answers"])]
    pool = list({t["name"]: t for r in rows for t in r["tools"]}.values())
    import random

    for row in rows[:40]:
        made = training_data.make_irrelevant(row, random.Random(0), pool)
        called = {c["name"] for c in row["answers"]}
        assert made["answers"] == [] and made["tools"] and not called & {t["name"] for t in made["tools"]}
        example = chat_formats.xlam_to_messages(made)
        assert example["messages"][1] == {"role": "assistant", "content": chat_formats.NO_TOOL_FITS_REPLY}
    only_called = next(r for r in rows if {t["name"] for t in r["tools"]} == {c["name"] for c in r["answers"]})
    assert training_data.make_irrelevant(only_called, random.Random(0), pool)["tools"]  # other rows' tools are listed instead


def test_masking_renames_consistently_and_the_answer_stays_valid(assets):
    import random

    for raw in sample_rows(assets, 60):
        row = chat_formats.parse_xlam_row(raw)
        masked = training_data.mask_names(row, random.Random(1))
        example = chat_formats.xlam_to_messages(masked)  # raises MalformedRow if an answer names an unlisted tool
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in example["tools"]}
        original = {t["name"]: t for t in row["tools"]}
        assert not set(schemas) & set(original) and len(schemas) == len(original)
        for before, after in zip(row["answers"], masked["answers"]):
            properties = schemas[after["name"]]["properties"]
            assert set(after["arguments"]) <= set(properties)  # every argument is a parameter of the masked tool
            assert sorted(after["arguments"].values(), key=str) == sorted(before["arguments"].values(), key=str)
            assert set(schemas[after["name"]]["required"]) <= set(after["arguments"])
            assert 5 <= len(after["name"]) <= 15 and all(4 <= len(p) <= 10 for p in properties)
        # the same tool gets the same new name in the list and in every call
        assert {c["name"] for c in masked["answers"]} <= set(schemas)
    assert training_data.mask_names(row, random.Random(1)) == training_data.mask_names(row, random.Random(1))


def test_extra_tools_add_distinct_tools_from_other_rows(assets):
    train, _, report = build(assets, extra_tools=3)
    for row in train.select(range(50)):
        names = [t["function"]["name"] for t in json.loads(row["tools"])]
        assert len(names) == len(set(names)) and len(names) >= 4
    assert report["sources"][0]["transforms"]["extra_tools"] == len(train)


def test_shares_are_exact_and_the_same_seed_gives_the_same_data(assets):
    train, _, report = build(assets, irrelevance_fraction=0.25, function_masking_fraction=0.5)
    rows = sample_rows(assets)
    with_calls = sum(1 for r in rows if json.loads(r["answers"]))
    transforms = report["sources"][0]["transforms"]
    assert transforms["irrelevance"] == round(0.25 * with_calls) and transforms["masked"] == round(0.5 * len(rows))
    assert transforms["no_call"] == len(rows) - with_calls > 0  # the sample's own xlam-irrelevance-style rows
    counted = sum("irrelevance" in t for t in train["transforms"])
    assert counted == transforms["irrelevance"]
    again, _, _ = build(assets, irrelevance_fraction=0.25, function_masking_fraction=0.5)
    other, _, _ = build(assets, seed=7, irrelevance_fraction=0.25, function_masking_fraction=0.5)
    assert again.to_list() == train.to_list() and other.to_list() != train.to_list()


def test_curriculum_puts_single_calls_among_few_tools_first(assets):
    train, _, _ = build(assets, curriculum=True)
    complexity = [(max(len(r["messages"][1].get("tool_calls") or []), 1), len(json.loads(r["tools"]))) for r in train]
    assert complexity == sorted(complexity) and complexity[0] == (1, 1) and complexity[-1][0] >= 2


def test_data_edge_cases_are_kept_or_named(assets, tmp_path):
    one_tool = tmp_path / "one_tool.jsonl"  # irrelevance needs another tool to list: with none, the row stays as it is
    one_tool.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(assets) if '"get_weather"' in r["tools"]
                                and len(json.loads(r["tools"])) == 1))
    train, _, report = training_data.build_datasets(script_args(dataset_name=str(one_tool), irrelevance_fraction=1.0), 42)
    assert len(train) > 0 and report["sources"][0]["transforms"]["irrelevance"] == 0
    # `columns` applies to local files too
    source = training_data.SourceConfig(path=str(assets / "xlam_sample" / "train.jsonl"), columns=["query", "answers"])
    assert training_data.load_source(source).column_names == ["query", "answers"]
    # a weighted source with no rows left would empty the whole mixture (TRL's rule): stop, naming it
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"query": "q", "tools": "[]", "answers": "[]"}) + "\n")
    args = script_args(datasets=[{"path": str(one_tool), "fraction": 0.5}, {"path": str(empty), "fraction": 0.5}],
                       max_malformed_fraction=1.0)
    with pytest.raises(UserError, match=f"no rows left of {empty}"):
        training_data.build_datasets(args, 42)


def test_curriculum_refuses_what_reorders_the_rows(demo_recipe):
    proc = run([PYTHON, "train_sft.py", demo_recipe(curriculum=True, packing=True), "--show_examples", "1"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "curriculum orders the rows simple to complex, but packing reorders them" in proc.stderr


def test_mixture_sizes_follow_trls_rule():
    # shares normalised to one; the total is the largest that oversamples no dataset
    assert training_data.mixture_sizes([100, 30], [0.8, 0.2]) == [100, 25]
    assert training_data.mixture_sizes([100, 10], [4, 1]) == [40, 10]
    assert training_data.mixture_sizes([100, 10], [None, None]) == [100, 10]


# --- decontamination against the installed BFCL v4 data -------------------------------------------------------------


def test_decontamination_drops_rows_made_from_bfcl_questions(assets, tmp_path):
    bfcl = decontamination.BfclQuestions()
    questions = [text for _, text in bfcl.texts if len(text.split()) > 20][:3] + \
                [text for _, text in bfcl.texts if 5 <= len(text.split()) < 8][:1]
    rows = sample_rows(assets, 40)
    copies = [dict(rows[0], query=questions[0]),                                       # verbatim
              dict(rows[1], query="Hi! " + questions[1].upper() + " Thanks a lot."),  # case, punctuation, words added
              dict(rows[2], query=questions[2].replace(" the ", " a ", 2)),          # a few words changed
              dict(rows[3], query="Quick one: " + questions[3] + " Please answer soon, it is for my homework.")]
    data = tmp_path / "contaminated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in copies + rows[4:]))
    train, _, report = training_data.build_datasets(script_args(dataset_name=str(data), decontaminate=True), 42)
    kept = {r["messages"][0]["content"] for r in train}
    assert report["sources"][0]["decontaminated"] == 4 and len(train) == 36
    assert not {c["query"] for c in copies} & kept and {r["query"] for r in rows[4:]} <= kept
    assert "~ BFCL" in report["sources"][0]["decontaminated_example"]


# --- the real commands --------------------------------------------------------------------------------------------


def test_irrelevance_examples_train_on_the_plain_reply_only(assets, demo_recipe):
    """--show_examples: the trained span of a "no tool fits" example is the reply and <|im_end|>, with no tool call;
    the header names the transforms."""
    proc = run([PYTHON, "train_sft.py", demo_recipe(irrelevance_fraction=1.0, function_masking_fraction=0.5, max_samples=40),
                "--show_examples", "40"])
    examples = proc.stdout.split("=== example ")[1:]
    irrelevant = [e for e in examples if re.match(r"\d+: \d+ tokens, \d+ trained; transforms: [a-z_,]*(irrelevance|no_call)", e)]
    assert len(irrelevant) == 40
    assert any("masked" in e.split("===")[0] for e in examples)
    for text in irrelevant:
        trained = text.split("⟦")[1].split("⟧")[0]
        assert trained == "\n" + chat_formats.NO_TOOL_FITS_REPLY + "<|im_end|>\n" and text.count("⟦") == 1  # as after a tool call


def test_a_two_format_mixture_trains_under_fsdp(assets, demo_recipe, tmp_path):
    """xlam rows + messages rows (0.75 / 0.25) through `accelerate launch` on 2 FSDP processes: rows taken per source
    in the log and in run_summary.json; decontamination off is warned about in both."""
    xlam = assets / "xlam_sample" / "train.jsonl"
    messages = tmp_path / "messages.jsonl"
    with open(messages, "w") as f:
        for row in sample_rows(assets, 100):
            example = chat_formats.xlam_to_messages(row)
            f.write(json.dumps({"messages": example["messages"], "tools": example["tools"]}) + "\n")
    recipe = yaml.safe_load(demo_recipe().read_text())
    recipe.pop("dataset_name")
    recipe.update(datasets=[{"path": str(xlam), "format": "xlam", "fraction": 0.75},
                            {"path": str(messages), "format": "messages", "fraction": 0.25}],
                  decontaminate=False, max_steps=2, per_device_train_batch_size=2, max_length=512, logging_steps=1)
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / "cpu_fsdp_full.yaml", "train_sft.py", path])
    assert f"data: {xlam} (xlam): 600 rows, 300 taken" in proc.stderr
    assert f"data: {messages} (messages): 100 rows, 100 taken" in proc.stderr
    assert "decontaminate is off" in proc.stderr
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert [s["taken"] for s in summary["data"]["sources"]] == [300, 100] and summary["data"]["decontaminate"] is False
    assert summary["data"]["train_rows"] == 400 and summary["global_step"] == 2
    card = (tmp_path / "out" / "README.md").read_text()  # TRL's card names the mixture's datasets, not None
    assert str(xlam) in card and str(messages) in card and "None" not in card.split("---")[1]


# --- input errors ---------------------------------------------------------------------------------------------------


def test_unloadable_dataset_is_one_line_naming_it(demo_recipe):
    proc = run([PYTHON, "train_sft.py", demo_recipe(dataset_name="someone/no-such-dataset"), "--show_examples", "1"],
               check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot load dataset 'someone/no-such-dataset' (split 'train'): the hub is unreachable" in proc.stderr


def test_unknown_keys_come_before_the_bf16_check_and_flags_must_match_exactly(demo_recipe, tmp_path):
    import torch

    recipe = yaml.safe_load(demo_recipe().read_text())
    recipe.pop("bf16")
    recipe["learning_rat"] = 1e-3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run([PYTHON, "train_sft.py", path, "--show_examples", "1"], check=False)
    assert proc.returncode != 0 and f"unknown key 'learning_rat' in {path}" in proc.stderr and "Traceback" not in proc.stderr
    del recipe["learning_rat"]
    path.write_text(yaml.safe_dump(recipe))
    proc = run([PYTHON, "train_sft.py", path, "--show_examples", "1"], check=False)
    if not torch.cuda.is_available():  # this CPU has no bf16 support as transformers counts it
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert f"bf16 is on (TRL's default; {path} does not set it)" in proc.stderr and "set `bf16: false`" in proc.stderr
    proc = run([PYTHON, "train_sft.py", demo_recipe(), "--learning_rat", "0.1", "--show_examples", "1"], check=False)
    assert proc.returncode != 0 and "unknown command-line flag '--learning_rat'" in proc.stderr


def test_mixture_keys_are_checked_before_loading(demo_recipe, tmp_path):
    recipe = yaml.safe_load(demo_recipe().read_text())
    recipe["datasets"] = [{"path": "a.jsonl", "fromat": "xlam"}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run([PYTHON, "train_sft.py", path, "--show_examples", "1"], check=False)
    assert proc.returncode != 0 and f"{path} sets both dataset_name and datasets" in proc.stderr
    recipe.pop("dataset_name")
    path.write_text(yaml.safe_dump(recipe))
    proc = run([PYTHON, "train_sft.py", path, "--show_examples", "1"], check=False)
    assert proc.returncode != 0 and "datasets[0]" in proc.stderr and "unknown: ['fromat']" in proc.stderr
