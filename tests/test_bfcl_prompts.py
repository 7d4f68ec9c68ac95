"""The prompts eval_bfcl.py feeds a model: `--prompt-format bfcl` against the official harness's own prompt text for
all 3,641 single-turn entries, the `prompts` subcommand against what generation really feeds the model, and the
fallback for a family without an official prompt builder."""

import json
from collections import Counter
from pathlib import Path

import pytest
from bfcl_reference import load_official_bfcl
from conftest import PYTHON, run

import eval_bfcl
from fcsft import bfcl_data, bfcl_generation, bfcl_prompts
from fcsft.bfcl_data import read_jsonl
from fcsft.errors import UserError

bfcl_eval = pytest.importorskip("bfcl_eval", reason="bfcl-eval is installed by `make setup`")
DATA_DIR = Path(bfcl_eval.__path__[0]) / "data"
CATEGORIES = bfcl_data.NON_LIVE + bfcl_data.LIVE


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return load_official_bfcl(tmp_path_factory.mktemp("bfcl_project_root"))


def all_entries():
    return [(c, e) for c in CATEGORIES for e in read_jsonl(DATA_DIR / f"BFCL_v4_{c}.json")]


def test_bfcl_format_is_the_official_prompt_for_every_entry(official, assets, tmp_path):
    """The README's measurement. The prompts subcommand in the default `bfcl` format writes, for each of the 3,641
    single-turn entries, exactly the text the official harness sends its model server (QwenFCHandler, entries from
    bfcl_eval's load_dataset_entry); through the model's chat template (Qwen2.5's real template) not one is."""
    out = tmp_path / "prompts.jsonl"
    proc = run([PYTHON, "eval_bfcl.py", "prompts", "--model", assets / "tiny-qwen2", "--categories", "all",
                "--output", out])
    assert "wrote 3641 prompts (bfcl format, qwen family)" in proc.stdout
    rows = read_jsonl(out)
    expected = {}
    for category in CATEGORIES:
        expected.update(official.official_prompts("qwen_fc", category))
    assert len(rows) == len(expected) == 3641
    assert Counter(r["category"] for r in rows) == Counter(c for c, _ in all_entries())
    assert all(r["prompt_format"] == "bfcl" and r["num_tokens"] > 0 for r in rows)
    different = [r["id"] for r in rows if r["prompt"] != expected[r["id"]]]
    assert not different, f"{len(different)} of 3641 prompts differ from the official handler's, e.g. {different[:5]}"

    # The chat-template route, as before --prompt-format existed: 0 of 3,641 identical.
    tokenizer = bfcl_generation.load_tokenizer(assets / "tiny-qwen2")
    work = all_entries()
    chat = bfcl_generation.render_prompts(tokenizer, work, "fc", {"prompt_format": "chat_template", "bfcl_family": "qwen"})
    assert sum(text == expected[entry["id"]] for text, (_, entry) in zip(chat, work)) == 0


def test_prompt_mode_is_the_official_prompt_for_every_entry(official):
    """--mode prompt --prompt-format bfcl: QwenHandler's text (BFCL's system prompt, then the turns)."""
    different = []
    for category in CATEGORIES:
        expected = official.official_prompts("qwen", category)
        for entry in read_jsonl(DATA_DIR / f"BFCL_v4_{category}.json"):
            if bfcl_prompts.bfcl_prompt(entry, category, "prompt", "qwen") != expected[entry["id"]]:
                different.append(entry["id"])
    assert not different, f"{len(different)} prompt-mode prompts differ, e.g. {different[:5]}"


def test_prompts_subcommand_is_what_generation_feeds_the_model(assets, tmp_path, monkeypatch):
    """Token for token: the rows generate() receives (padding removed by the attention mask) are the prompts
    subcommand's prompts tokenized, and decode back to the same text; including an entry with a system turn."""
    import transformers

    fed = []
    original_generate = transformers.GenerationMixin.generate

    def recording_generate(self, input_ids=None, attention_mask=None, **kwargs):
        fed.extend(tuple(t for t, keep in zip(row, mask) if keep)
                   for row, mask in zip(input_ids.tolist(), attention_mask.tolist()))
        return original_generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", recording_generate)
    system_entry = next(i for i, line in enumerate((DATA_DIR / "BFCL_v4_live_multiple.json").read_text().splitlines())
                        if json.loads(line)["question"][0][0]["role"] == "system")
    args = ["--model", str(assets / "tiny-qwen2"), "--categories", "simple_javascript", "live_multiple", "irrelevance",
            "--limit", str(system_entry + 1)]
    eval_bfcl.main([*args, "--output-dir", str(tmp_path / "run"), "--max-new-tokens", "2", "--batch-size", "3",
                    "--no-score"])
    eval_bfcl.main(["prompts", *args, "--output", str(tmp_path / "prompts.jsonl")])

    rows = read_jsonl(tmp_path / "prompts.jsonl")
    tokenizer = bfcl_generation.load_tokenizer(assets / "tiny-qwen2")
    assert len(fed) == len(rows) == 3 * (system_entry + 1) and len(set(fed)) == len(fed)
    assert sorted(fed) == sorted(tuple(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert sorted(tokenizer.decode(ids) for ids in fed) == sorted(r["prompt"] for r in rows)
    assert sorted(len(ids) for ids in fed) == sorted(r["num_tokens"] for r in rows)
    assert any(r["prompt"].startswith("<|im_start|>system\n") and "\n\n# Tools" in r["prompt"] for r in rows)


def test_unknown_family_falls_back_to_the_chat_template_and_says_so(assets, tmp_path, monkeypatch, capsys, caplog):
    """A family without an official prompt builder: chat template, a warning, and the fallback recorded in
    generation.json and the summaries. Resuming is refused once the prompt format changes."""
    out = tmp_path / "run"
    args = ["--model", str(assets / "tiny-qwen2"), "--data-dir", str(assets / "bfcl_heldout"), "--categories",
            "demo_simple", "--limit", "2", "--max-new-tokens", "2", "--output-dir", str(out)]
    monkeypatch.setattr(bfcl_generation, "bfcl_family", lambda model_name, model_type: None)
    eval_bfcl.main(args)
    assert "no official BFCL prompt builder" in caplog.text  # logged as a warning (stderr)
    generation = json.loads((out / "generation.json").read_text())
    assert generation["prompt_format"] == "chat_template" and generation["prompt_format_requested"] == "bfcl"
    assert "no official BFCL prompt builder" in generation["prompt_format_fallback"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_format"]["prompt_format"] == "chat_template" and summary["prompt_format"]["fallback"]
    assert "not leaderboard-comparable" in (out / "summary.md").read_text()
    # The chat-template prompt was used: it carries Qwen2.5's default system message.
    rows = bfcl_generation.render_prompts(bfcl_generation.load_tokenizer(assets / "tiny-qwen2"), [("demo_simple", read_jsonl(
        assets / "bfcl_heldout" / "BFCL_v4_demo_simple.json")[0])], "fc", {"prompt_format": "chat_template"})
    assert "You are Qwen, created by Alibaba Cloud" in rows[0]

    eval_bfcl.main([*args, "--prompt-format", "chat_template"])  # the same prompts: resumed, nothing generated
    assert "0 prompts to generate" in capsys.readouterr().out
    monkeypatch.undo()  # the qwen family again: `bfcl` now means the official prompt, a different one
    with pytest.raises(UserError) as refused:
        eval_bfcl.main(args)
    assert "prompt_format: chat_template -> bfcl" in str(refused.value) and "--overwrite" in str(refused.value)


def test_family_detection():
    assert bfcl_prompts.bfcl_family("Qwen/Qwen2.5-3B-Instruct", "qwen2") == "qwen"
    assert bfcl_prompts.bfcl_family("runs/qwen2.5-3b-xlam", "qwen2") == "qwen"  # a local fine-tune: by architecture
    assert bfcl_prompts.bfcl_family("/abs/path/model", "qwen3") == "qwen"
    assert bfcl_prompts.bfcl_family("MadeAgents/Hammer2.1-3b", "qwen2") == "hammer"  # own official handler, none here yet
    assert bfcl_prompts.bfcl_family("Salesforce/xLAM-2-3b-fc-r", "qwen2") == "xlam"
    assert bfcl_prompts.bfcl_family("facebook/opt-1.3b", "opt") is None
    fallback = bfcl_generation.resolve_prompt_format("MadeAgents/Hammer2.1-3b", "qwen2", "bfcl", "fc")
    assert fallback["prompt_format"] == "chat_template" and "family hammer" in fallback["fallback"]
    assert bfcl_generation.resolve_prompt_format("Qwen/Qwen3-8B", "qwen3", "bfcl", "prompt")["prompt_format"] == "bfcl"
    assert bfcl_generation.resolve_prompt_format("Qwen/Qwen3-8B", "qwen3", "chat_template", "fc")["fallback"] is None
