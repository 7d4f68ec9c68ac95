"""model_card.py: the card of a real run (conftest's LoRA run through 2-process FSDP2) with its BFCL table and
model-index metadata, written by model_card.py and by eval_bfcl.py --model-card; the cost arithmetic; the hub push
through the Dolly recipe's hub code against a recording stand-in client (tests/test_dolly_opt.py's)."""

import json
import shutil

import pytest
from conftest import FAKE_TOKEN, LAUNCH_ROWS, RecordingHub, correct_qwen_output
from huggingface_hub import ModelCard

import eval_bfcl
import model_card
from fcsft import metrics
from fcsft import model_card as fcsft_model_card
from fcsft.errors import UserError


@pytest.fixture
def model_folder(lora_fsdp_runs, tmp_path):
    """A copy of the LoRA run's output (the adapter, tokenizer, run_summary.json), without its checkpoints."""
    folder = tmp_path / "qwen-tiny-xlam-lora"
    shutil.copytree(lora_fsdp_runs["reference"], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    return folder


@pytest.fixture
def bfcl_results(assets, tmp_path):
    """eval_bfcl.py's output for the demo held-out split, scored without a model: demo_simple answered right, the
    other categories wrong."""
    heldout, out = assets / "bfcl_heldout", tmp_path / "bfcl"
    out.mkdir()
    for path in heldout.glob("BFCL_v4_*.json"):
        answer_file = heldout / "possible_answer" / path.name  # none for demo_irrelevance: "no call" is right there
        answers = [json.loads(line) for line in (answer_file if answer_file.exists() else path).read_text().splitlines()]
        rows = [{"id": a["id"], "result": correct_qwen_output(a) if "demo_simple" in path.name else "no call"}
                for a in answers]
        (out / path.name.replace(".json", "_result.json")).write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_bfcl.main(["score", "--result-dir", str(out), "--data-dir", str(heldout)])
    return out


def test_card_of_a_run_holds_base_data_recipe_hardware_time_and_the_bfcl_table(model_folder, bfcl_results):
    model_card.main([str(model_folder), "--bfcl", str(bfcl_results)])
    text = (model_folder / "README.md").read_text()
    run = json.loads((model_folder / "run_summary.json").read_text())
    assert f"`{run['model_name_or_path']}` fine-tuned for function calling" in text and "a LoRA adapter" in text
    source = run["data"]["sources"][0]  # rows read, malformed, BFCL duplicates, taken, transforms
    rows = LAUNCH_ROWS  # the run took max_samples of the 600
    assert f"| `{source['path']}` | xlam | {rows} | 0 | 0 | {rows} | " in text and f"Trained on {rows} rows; 0 held out" in text
    assert "| hardware | 2 x cpu" in text and "FSDP2 over mesh [2]" in text
    assert f"({run['train_seconds']:,.0f} s)" in text and "| cost | not applicable (a CPU run) |" in text
    assert "| optimizer steps | 12 " in text and "lora_r: 8" in text and "lora_alpha: 16" in text  # the recipe as run
    # the BFCL table, and the same numbers as model-index metadata the hub shows
    assert "## BFCL v4 results (qwen decoder)" in text and "| demo_simple | 100.00 | 10 / 10 |" in text
    card = ModelCard(text)
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert scores == {"overall (custom)": 40.0, "demo_simple": 100.0, "demo_multiple": 0.0, "demo_parallel": 0.0,
                      "demo_parallel_multiple": 0.0, "demo_irrelevance": 100.0}
    assert {r.dataset_type for r in card.data.eval_results} == {fcsft_model_card.BFCL_DATASET}


def test_eval_bfcl_writes_its_summary_into_the_card(model_folder, bfcl_results, assets):
    """eval_bfcl.py --model-card: a new evaluation replaces the card's BFCL section and model-index; the rest stays."""
    model_card.main([str(model_folder), "--bfcl", str(bfcl_results)])
    before = (model_folder / "README.md").read_text()
    # a second scoring of only demo_simple's first entries (a --limit run): the table says so, the hub gets no aggregate
    limited = bfcl_results.parent / "limited"
    limited.mkdir()
    rows = (bfcl_results / "BFCL_v4_demo_simple_result.json").read_text().splitlines()[:3]
    (limited / "BFCL_v4_demo_simple_result.json").write_text("\n".join(rows) + "\n")
    eval_bfcl.main(["score", "--result-dir", str(limited), "--data-dir", str(assets / "bfcl_heldout"),
                    "--model-card", str(model_folder / "README.md")])
    after = (model_folder / "README.md").read_text()
    assert after.count(fcsft_model_card.BFCL_START) == 1 and "| demo_simple | 100.00 | 3 / 3 (of 10) |" in after
    assert after.split(fcsft_model_card.BFCL_START)[0].split("---", 2)[2] == before.split(fcsft_model_card.BFCL_START)[0].split("---", 2)[2]
    assert ModelCard(after).data.eval_results is None  # nothing complete to show as a score


def test_cost_is_device_hours_times_the_price():
    run = {"model_name_or_path": "Qwen/Qwen2.5-3B-Instruct", "use_peft": False, "num_processes": 8,
           "device": "NVIDIA H100 80GB HBM3", "train_seconds": 5400.0, "global_step": 100, "fsdp_version": 2,
           "data": {"sources": [{"path": "Salesforce/xlam-function-calling-60k", "format": "xlam", "rows": 60000,
                                 "skipped": {}, "decontaminated": 0, "taken": 60000, "transforms": {}}]}}
    text = fcsft_model_card.run_card("runs/x", run, metrics.DEFAULT_PRICE_PER_GPU_HOUR)
    # 1.5 h x 8 GPUs = 12 GPU-hours at the plan's $23/hour for 8 GPUs = $34.50
    assert "| train time | 1h30m (5,400 s) |" in text and "| device-hours | 12.00 |" in text
    assert "| cost | $34.50 at $2.875 per GPU-hour |" in text
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen2.5-3B-Instruct" and card.data.datasets == ["Salesforce/xlam-function-calling-60k"]


def test_push_uploads_the_folder_with_the_token_from_the_environment_only(model_folder, bfcl_results, monkeypatch, capfd):
    hub = RecordingHub()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(fcsft_model_card, "make_hub_client", lambda token: hub if token == FAKE_TOKEN else None)
    model_card.main([str(model_folder), "--bfcl", str(bfcl_results), "--push", "tester/tiny-fc", "--revision", "v1"])
    assert [(name, {k: v for k, v in kw.items() if k not in ("files", "commit_message")}) for name, kw in hub.calls] == [
        ("whoami", {}),
        ("create_repo", {"repo_id": "tester/tiny-fc", "private": True, "exist_ok": True}),
        ("create_repo", {"repo_id": "tester/tiny-fc", "private": True, "exist_ok": True}),
        ("create_branch", {"repo_id": "tester/tiny-fc", "branch": "v1", "exist_ok": True}),
        ("upload_folder", {"repo_id": "tester/tiny-fc", "folder": str(model_folder), "revision": "v1"}),
    ]
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(hub.calls[-1][1]["files"])
    assert ModelCard((model_folder / "README.md").read_text()).data.model_name == "tester/tiny-fc"
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    assert not [p for p in model_folder.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]


def test_failed_push_keeps_the_folder_and_says_how_to_retry(model_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = RecordingHub(fail_on="upload_folder")
    monkeypatch.setattr(fcsft_model_card, "make_hub_client", lambda token: hub)
    with pytest.raises(UserError) as err:
        model_card.main([str(model_folder), "--push", "tester/tiny-fc"])
    message = str(err.value)
    assert f"pushing {model_folder} to tester/tiny-fc failed: ConnectionError" in message
    assert f"push it later with: hf upload tester/tiny-fc {model_folder}" in message
    assert FAKE_TOKEN not in message and (model_folder / "adapter_model.safetensors").is_file()
    assert (model_folder / "README.md").is_file()  # the card was written before the push

    # no token: stops before any hub call, the local card written all the same
    monkeypatch.delenv("HF_TOKEN")
    hub.calls.clear()
    with pytest.raises(UserError, match="--push tester/tiny-fc needs a write token in the HF_TOKEN environment"):
        model_card.main([str(model_folder), "--push", "tester/tiny-fc"])
    assert hub.calls == []


def test_a_merged_checkpoint_keeps_its_card_and_gains_the_results(tmp_path, bfcl_results):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# merged\n\n| input adapter | weight |\n")
    model_card.main([str(folder), "--bfcl", str(bfcl_results)])
    text = (folder / "README.md").read_text()
    assert "| input adapter | weight |" in text and "| demo_simple | 100.00 | 10 / 10 |" in text
    with pytest.raises(UserError, match="has neither run_summary.json"):
        model_card.main([str(tmp_path / "empty")])
