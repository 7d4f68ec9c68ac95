"""Function-calling accuracy during training (train_sft.py's bfcl_eval_* keys), under real FSDP2 over 2 gloo
processes. One run serves every assertion: the BFCL split is answered at each evaluation, the metrics reach the log
history and TensorBoard, they equal what eval_bfcl.py gives on the checkpoint saved at that step, and a metric that
does not improve stops the run early (EarlyStoppingCallback) and brings back the best checkpoint
(load_best_model_at_end)."""

import json
import shutil

import pytest
import yaml
from conftest import ACCELERATE, LAUNCH_ROWS, REPO, run

import eval_bfcl
from fcsft.bfcl_data import read_jsonl
from fcsft.errors import UserError

STEPS = [2, 4]  # evaluations (and sharded checkpoints) every 2 steps; early stopping ends the run at step 4
BFCL_KEYS = ["--bfcl_eval_categories", "demo_simple,demo_parallel,demo_multiple", "--bfcl_eval_limit", "3",
             "--bfcl_eval_max_new_tokens", "16", "--bfcl_eval_batch_size", "2"]  # 9 prompts: 5 and 4 per rank


@pytest.fixture(scope="module")
def bfcl_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("bfcl_train_eval")
    recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  output_dir=str(out / "run"), report_to=["tensorboard"])
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / "cpu_fsdp_full.yaml",
                "train_sft.py", out / "recipe.yaml", "--max_steps", "10", "--per_device_train_batch_size", "2",
                "--max_length", "512", "--logging_steps", "1", "--eval_split_size", "4", "--eval_strategy", "steps",
                "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                "--bfcl_eval_dir", assets / "bfcl_heldout", *BFCL_KEYS,
                # demo_simple stays at 0 for this random model: no improvement, so patience 1 stops at step 4
                "--metric_for_best_model", "eval_bfcl/demo_simple", "--load_best_model_at_end", "true",
                "--early_stopping_patience", "1", "--max_samples", LAUNCH_ROWS])
    return out / "run", proc


def eval_logs(output_dir):
    history = json.loads((output_dir / "run_summary.json").read_text())["log_history"]
    return {log["step"]: log for log in history if "eval_loss" in log}


def test_metrics_logged_at_each_evaluation(bfcl_run):
    output_dir, proc = bfcl_run
    assert "cpu_fsdp: no GPU and an FSDP launch config" in proc.stderr
    assert "bfcl eval: 9 prompts of" in proc.stderr and "(bfcl prompt format)" in proc.stderr
    logs = eval_logs(output_dir)
    assert sorted(logs) == STEPS
    for step, log in logs.items():
        for key in ("overall", "demo_simple", "demo_parallel", "demo_multiple", "decodes_as_calls", "right_functions"):
            assert 0 <= log[f"eval_bfcl/{key}"] <= 1, (step, key)
        assert log["eval_bfcl/overall"] == pytest.approx(
            sum(log[f"eval_bfcl/{c}"] for c in ("demo_simple", "demo_parallel", "demo_multiple")) / 3)
        folder = output_dir / "bfcl_eval" / f"step-{step}"
        assert json.loads((folder / "generation.json").read_text())["prompt_format"] == "bfcl"
        assert sorted(p.name for p in folder.glob("*_result.json")) == [
            "BFCL_v4_demo_multiple_result.json", "BFCL_v4_demo_parallel_result.json", "BFCL_v4_demo_simple_result.json"]
        assert "## Error analysis" in (folder / "summary.md").read_text()

    # Every tracker gets them: here TensorBoard (the Trainer's own TensorBoardCallback).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(output_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("eval/bfcl/overall")}
    assert scalars == pytest.approx({step: logs[step]["eval_bfcl/overall"] for step in STEPS})


@pytest.fixture(scope="module")
def merged(bfcl_run, tmp_path_factory):
    """Each checkpoint-N's sharded FSDP weights as a Hugging Face folder that eval_bfcl.py loads: what the README's
    `accelerate merge-weights` runs (accelerate's merge_fsdp_weights), plus the run's config and tokenizer files."""
    from accelerate.utils import merge_fsdp_weights

    output_dir, _ = bfcl_run
    folders = {}
    for step in STEPS:
        folders[step] = tmp_path_factory.mktemp(f"merged-{step}")
        merge_fsdp_weights(output_dir / f"checkpoint-{step}" / "pytorch_model_fsdp_0", folders[step])
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja"):
            shutil.copy(output_dir / name, folders[step] / name)
    return folders


def test_metric_equals_eval_bfcl_on_the_checkpoint_of_that_step(bfcl_run, merged, assets, tmp_path):
    output_dir, _ = bfcl_run
    logs = eval_logs(output_dir)
    for step in STEPS:
        out = tmp_path / f"eval-{step}"
        eval_bfcl.main(["--model", str(merged[step]), "--data-dir", str(assets / "bfcl_heldout"), "--categories",
                        "demo_simple", "demo_parallel", "demo_multiple", "--limit", "3", "--max-new-tokens", "16",
                        "--batch-size", "2", "--output-dir", str(out)])
        summary = json.loads((out / "summary.json").read_text())
        for category, score in summary["categories"].items():
            assert logs[step][f"eval_bfcl/{category}"] == score["accuracy"], (step, category)
            trained = read_jsonl(output_dir / "bfcl_eval" / f"step-{step}" / f"BFCL_v4_{category}_result.json")
            assert trained == read_jsonl(out / f"BFCL_v4_{category}_result.json"), (step, category)  # same answers
        assert logs[step]["eval_bfcl/overall"] == pytest.approx(summary["aggregates"]["overall (custom)"]["accuracy"])
    # The two checkpoints are different models (the tiny model's greedy answers may still coincide, e.g. all newlines)
    from safetensors.torch import load_file

    weights = {step: load_file(merged[step] / "model.safetensors") for step in STEPS}
    assert any(not (weights[2][k] == weights[4][k]).all() for k in weights[2]), "steps 2 and 4 saved the same weights"


def test_no_improvement_stops_early_and_the_best_checkpoint_is_kept(bfcl_run, merged):
    from safetensors.torch import load_file

    output_dir, _ = bfcl_run
    logs = eval_logs(output_dir)
    assert [logs[s]["eval_bfcl/demo_simple"] for s in STEPS] == [0.0, 0.0]  # the premise: no improvement
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 10  # stopped by EarlyStoppingCallback
    assert state["best_global_step"] == 2 and state["best_metric"] == 0.0
    final = load_file(output_dir / "model.safetensors")
    best = load_file(merged[2] / "model.safetensors")  # load_best_model_at_end: the final model is step 2's
    assert final.keys() == best.keys() and all((final[k] == best[k]).all() for k in final)


def test_recipe_errors_name_the_missing_keys(assets, tmp_path):
    from fcsft import recipe as fcsft_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((REPO / "recipes" / "demo_cpu.yaml").read_text())
    cases = [
        (["--bfcl_eval_dir", str(assets / "bfcl_heldout")], "set eval_strategy"),
        (["--bfcl_eval_dir", str(assets / "bfcl_heldout"), "--eval_strategy", "steps"], "set eval_split_size"),
        (["--bfcl_eval_dir", str(tmp_path / "missing"), "--eval_strategy", "steps", "--eval_split_size", "4"],
         "is not a folder"),
        (["--bfcl_eval_dir", str(assets / "bfcl_heldout"), "--bfcl_eval_categories", "demo_simple,live_simple",
          "--eval_strategy", "steps", "--eval_split_size", "4"], "unknown category 'live_simple'"),
        (["--metric_for_best_model", "eval_bfcl/overall", "--eval_strategy", "steps", "--eval_split_size", "4"],
         "needs bfcl_eval_dir"),
        (["--early_stopping_patience", "2"], "early_stopping_patience needs metric_for_best_model"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError) as stopped:
            fcsft_recipe.parse_recipe([str(recipe), *flags])
        assert message in str(stopped.value) and str(recipe) in str(stopped.value), flags
