"""recipes/dolly_opt.yaml on the tiny OPT from make_demo_assets.py: the dolly format and its response-only loss mask,
FSDP2 across 2 CPU processes (fp32) with eval every N steps and an HF checkpoint per epoch, the per-epoch hub push
against a stand-in client, and fp16 loss scaling under FSDP2 (gloo, 2 processes)."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import yaml
from conftest import ACCELERATE, FAKE_TOKEN, PYTHON, REPO, RecordingHub, run

from fcsft import callbacks, chat_formats, hub, training_data
from fcsft import recipe as fcsft_recipe
from fcsft.errors import UserError

# recipes/dolly_opt.yaml scaled to the 48-row sample and CPU: 8 held-out rows, 40 train rows, 2 x 2 rows per step
# -> 10 steps per epoch, eval every 4 steps (4, 8, 12, 16, 20) plus at each epoch end (10, 20).
CPU_OVERRIDES = dict(
    fp16=False, report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
    per_device_eval_batch_size=4, eval_split_size=8, eval_steps=4, warmup_steps=2, learning_rate=1e-3,
    logging_steps=2, max_length=256, dataloader_num_workers=0, dataset_num_proc=1, save_steps=12, save_total_limit=None,
)


@pytest.fixture
def dolly_recipe(assets, tmp_path):
    """Write recipes/dolly_opt.yaml pointed at the session's tiny OPT and Dolly sample, with CPU overrides."""

    def write(**overrides):
        recipe = yaml.safe_load((REPO / "recipes" / "dolly_opt.yaml").read_text())
        recipe.update(model_name_or_path=str(assets / "tiny-opt"), dataset_name=str(assets / "dolly_sample" / "train.jsonl"),
                      output_dir=str(tmp_path / "out"), **CPU_OVERRIDES)
        recipe.update(overrides)
        path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*')))}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def _rows(assets):
    return [json.loads(line) for line in (assets / "dolly_sample" / "train.jsonl").read_text().splitlines()]


# --- the recipe and the configs ---------------------------------------------------------------------------------------


def test_recipe_and_t4_config_are_what_the_issue_asks_for():
    recipe = yaml.safe_load((REPO / "recipes" / "dolly_opt.yaml").read_text())
    t4 = yaml.safe_load((REPO / "accelerate_configs" / "fsdp_t4x2_fp16.yaml").read_text())
    cpu = yaml.safe_load((REPO / "accelerate_configs" / "cpu_fsdp_opt.yaml").read_text())
    assert recipe["fp16"] is True and recipe["bf16"] is False and t4["mixed_precision"] == "fp16"
    assert recipe["per_device_train_batch_size"] * t4["num_processes"] * recipe["gradient_accumulation_steps"] == 16
    assert (recipe["num_train_epochs"], recipe["lr_scheduler_type"], recipe["warmup_steps"]) == (2, "cosine", 85)
    assert (recipe["eval_strategy"], recipe["eval_steps"], recipe["max_grad_norm"]) == ("steps", 100, 1.0)
    assert recipe["dataset_format"] == "dolly" and recipe["epoch_checkpoints"] is True
    assert t4["fsdp_config"]["fsdp_version"] == 2 and t4["fsdp_config"]["fsdp_reshard_after_forward"] is True
    assert t4["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "OPTDecoderLayer"
    # The CPU twin the tests run differs only in precision (and use_cpu, which must stay false for 2 processes).
    assert {k: v for k, v in cpu.items() if k not in ("mixed_precision", "use_cpu")} == {k: v for k, v in t4.items() if k != "mixed_precision"}
    # accelerate silently ignores unknown fsdp_config keys: check each is a real `accelerate launch` option.
    from accelerate.commands.launch import launch_command_parser

    known = {action.dest for action in launch_command_parser()._actions}
    assert set(t4["fsdp_config"]) <= known, set(t4["fsdp_config"]) - known


def test_dolly_rows_to_prompt_completion():
    with_context = chat_formats.dolly_to_prompt_completion({"instruction": " Summarize. ", "context": "Oslo is in Norway.", "response": "Norway.\n"})
    assert with_context == {"prompt": "### Instruction:\nSummarize.\n\n### Context:\nOslo is in Norway.\n\n### Response:\n",
                            "completion": "Norway."}
    assert chat_formats.dolly_to_prompt_completion({"instruction": "Hi?", "context": "", "response": "Hello."})["prompt"] == (
        "### Instruction:\nHi?\n\n### Response:\n")
    for row, reason in [({"instruction": " ", "context": "", "response": "x"}, "empty_instruction"),
                        ({"instruction": "q", "context": "c", "response": ""}, "empty_response"),
                        ({"instruction": "q", "context": None, "response": None}, "empty_response")]:
        with pytest.raises(chat_formats.MalformedRow) as err:
            chat_formats.dolly_to_prompt_completion(row)
        assert err.value.reason == reason


# --- the real command -------------------------------------------------------------------------------------------------


def test_loss_is_on_the_response_and_eos_only(assets, dolly_recipe, tmp_path):
    """--show_examples marks tokens with labels != -100: exactly the response plus the </s> TRL appends. OPT's tokenizer
    also starts every text with </s> (its BOS); that one carries no loss. Empty rows are counted and skipped."""
    rows = _rows(assets)
    bad = [{"instruction": "", "context": "", "response": "orphan answer", "category": "open_qa"},
           {"instruction": "Which country is Oslo in?", "context": "", "response": "  ", "category": "open_qa"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:20] + bad + rows[20:]))
    proc = run([PYTHON, "train_sft.py", dolly_recipe(dataset_name=str(data), max_malformed_fraction=0.05), "--show_examples", "8"])
    assert re.search(r"skipped 2 of 50 rows", proc.stderr)
    assert re.search(r"empty_instruction\s+1", proc.stderr) and re.search(r"empty_response\s+1", proc.stderr)
    examples = proc.stdout.split("=== example ")[1:]
    assert len(examples) == 8
    # (untrained, trained) as they must render: OPT's </s> + our prompt template, then the response + the EOS TRL appends
    expected = {("</s>" + chat_formats.dolly_to_prompt_completion(r)["prompt"], r["response"] + "</s>") for r in rows}
    for text in examples:
        assert text.count("⟦") == 1 and text.count("⟧") == 1, text
        header, rendered = text.split("\n", 1)
        prompt, trained = rendered.split("⟦")[0], rendered.split("⟦")[1].split("⟧")[0]
        assert (prompt, trained) in expected, text
        n_tokens, n_trained = map(int, re.match(r"\d+: (\d+) tokens, (\d+) trained", header).groups())
        assert 0 < n_trained < n_tokens


def test_fsdp_on_two_cpu_processes_evaluates_and_saves_each_epoch(dolly_recipe, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    recipe = dolly_recipe()
    proc = run([ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_fsdp_opt.yaml", "train_sft.py", recipe])
    assert "turning off the recipe's gradient_checkpointing" in proc.stderr  # FSDP's activation checkpointing is used

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DistributedType.FSDP" and summary["fsdp_version"] == 2
    sharding = summary["sharding"]
    assert sharding["dtensor_parameters"] == sharding["parameters"] and sharding["mesh_shape"] == [2]
    assert sharding["local_numel"] < sharding["global_numel"]
    evals = {h["step"]: h["eval_loss"] for h in summary["log_history"] if "eval_loss" in h}
    assert sorted(evals) == [4, 8, 10, 12, 16, 20]  # every 4 steps, plus each epoch end (10, 20)

    final = load_file(out / "model.safetensors")
    epoch_weights = {}
    for epoch, step in ((1, 10), (2, 20)):
        folder = out / "checkpoints" / f"ep{epoch}"
        info = json.loads((folder / "epoch_info.json").read_text())
        assert info == {"epoch": epoch, "global_step": step, "eval_loss": evals[step]}
        card = (folder / "README.md").read_text()
        assert f"epoch {epoch} of 2" in card and f"| eval loss | {evals[step]:.4f} (8 held-out rows) |" in card
        assert f"## Recipe `{recipe}`" in card and "dataset_format: dolly" in card
        model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no FSDP
        assert type(model).__name__ == "OPTForCausalLM"
        assert AutoTokenizer.from_pretrained(folder).eos_token == "</s>"
        epoch_weights[epoch] = load_file(folder / "model.safetensors")
    assert epoch_weights[1].keys() == final.keys()
    assert all(torch.equal(epoch_weights[2][k], final[k]) for k in final)  # the last epoch is the final model
    assert not all(torch.equal(epoch_weights[1][k], final[k]) for k in final)  # epoch 2 trained on

    # The resumable checkpoint after epoch 1 is sharded again (the epoch save switched to FULL and back).
    checkpoint = out / "checkpoint-12"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()


def test_unreachable_hub_stops_both_fsdp_ranks_before_training(dolly_recipe, tmp_path):
    """Real use with no way to the hub (the real HfApi, HF_HUB_OFFLINE=1): rank 0's check fails, both ranks stop with
    one clear message before the first step, and the token is not shown."""
    recipe = dolly_recipe(hub_push_epochs="branch", hub_model_id="tester/tiny-opt-dolly")
    proc = run([ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_fsdp_opt.yaml", "train_sft.py", recipe],
               check=False, env={**os.environ, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count("train_sft.py: cannot reach or write to the Hugging Face Hub for hub_push_epochs=branch "
                        "(hub_model_id tester/tiny-opt-dolly): OfflineModeIsEnabled") == 1, output[-3000:]
    assert FAKE_TOKEN not in output
    assert not (tmp_path / "out" / "checkpoints").exists() and "'loss'" not in output  # stopped before any step


# --- the hub push --------------------------------------------------------------------------------------------------------


@pytest.fixture
def in_process(monkeypatch):
    """Train in this process (one process, no FSDP), leaving accelerate's singletons and torch's threads as found."""
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend for the shared cores
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_each_epoch_goes_to_a_branch_and_a_repo(dolly_recipe, tmp_path, monkeypatch, capfd, in_process):
    """A real Trainer loop with the callback, the client built from HF_TOKEN replaced by a recorder."""
    from trl import SFTTrainer

    hub = RecordingHub()
    monkeypatch.setattr(callbacks, "make_hub_client", lambda token: hub if token == FAKE_TOKEN else None)
    recipe = dolly_recipe(per_device_train_batch_size=4, save_strategy="no", activation_checkpointing=False,
                          hub_push_epochs="both", hub_model_id="tester/tiny-opt-dolly")
    script_args, training_args, model_args = fcsft_recipe.parse_recipe([str(recipe)])
    train_dataset, eval_dataset, _ = training_data.build_datasets(script_args, training_args.seed)
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset)
    trainer.add_callback(callbacks.EpochCheckpointCallback(trainer, script_args, recipe_path=str(recipe)))
    trainer.train()

    out = tmp_path / "out"
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == [4, 8, 10, 12, 16, 20]
    expected = [("whoami", {}), ("create_repo", {"repo_id": "tester/tiny-opt-dolly", "private": True, "exist_ok": True})]
    for epoch, step in ((1, 10), (2, 20)):
        folder = str(out / "checkpoints" / f"ep{epoch}")
        expected += [
            ("create_repo", {"repo_id": "tester/tiny-opt-dolly", "private": True, "exist_ok": True}),
            ("create_branch", {"repo_id": "tester/tiny-opt-dolly", "branch": f"epoch-{epoch}", "exist_ok": True}),
            ("upload_folder", {"repo_id": "tester/tiny-opt-dolly", "folder": folder, "revision": f"epoch-{epoch}"}),
            ("create_repo", {"repo_id": f"tester/tiny-opt-dolly-epoch-{epoch}", "private": True, "exist_ok": True}),
            ("upload_folder", {"repo_id": f"tester/tiny-opt-dolly-epoch-{epoch}", "folder": folder, "revision": None}),
        ]
        card = (out / "checkpoints" / f"ep{epoch}" / "README.md").read_text()
        assert f"epoch {epoch} of 2" in card and f"| eval loss | {evals[step]:.4f}" in card and "hub_push_epochs: both" in card
    assert [(n, {k: v for k, v in kw.items() if k not in ("files", "commit_message")}) for n, kw in hub.calls] == expected
    uploads = [kwargs for name, kwargs in hub.calls if name == "upload_folder"]
    assert [u["commit_message"] for u in uploads] == [f"epoch {e}: eval_loss {evals[s]:.4f}" for e, s in ((1, 10),) * 2 + ((2, 20),) * 2]
    assert all({"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(u["files"]) for u in uploads)

    # The token is never printed, logged or written.
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out + captured.err
    assert not [p for p in out.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]


def _fake_trainer(tmp_path, **args):
    """Just what EpochCheckpointCallback touches, for the failure paths (no training needed)."""

    def save_model(folder):
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")

    defaults = dict(hub_model_id="tester/tiny-opt-dolly", hub_token=None, hub_private_repo=True, output_dir=str(tmp_path),
                    run_name="t", per_device_train_batch_size=2, gradient_accumulation_steps=1)
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, mixed_precision="no",
                                  distributed_type=SimpleNamespace(value="NO"))
    return SimpleNamespace(args=SimpleNamespace(**{**defaults, **args}), accelerator=accelerator, is_fsdp_enabled=False,
                           save_model=save_model, eval_dataset=None, model=SimpleNamespace(config=SimpleNamespace()))


SCRIPT_ARGS = SimpleNamespace(hub_push_epochs="branch", dataset_name="d.jsonl", dataset_format="dolly", datasets=[],
                              dataset_config=None, dataset_split="train")
STATE = SimpleNamespace(log_history=[], global_step=10, max_steps=20, num_train_epochs=2)


def test_failed_push_keeps_the_checkpoint_and_says_how_to_retry(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    callback = callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path), SCRIPT_ARGS, hub_client=RecordingHub(fail_on="upload_folder"))
    with pytest.raises(hub.HubPushError) as err:
        callback.save_epoch(1, 1.25, STATE)
    folder = tmp_path / "checkpoints" / "ep1"
    message = str(err.value)
    assert "pushing epoch 1 to tester/tiny-opt-dolly@epoch-1 failed: ConnectionError" in message
    assert f"The checkpoint is saved at {folder}; push it later with: hf upload tester/tiny-opt-dolly {folder} --revision epoch-1" in message
    assert FAKE_TOKEN not in message and "***" in message
    assert (folder / "model.safetensors").is_file() and "1.2500" in (folder / "README.md").read_text()


def test_hub_problems_stop_the_run_before_the_first_step(tmp_path, monkeypatch):
    # No token in the environment.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    callback = callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path), SCRIPT_ARGS, hub_client=RecordingHub())
    with pytest.raises(UserError, match="needs a write token in the HF_TOKEN environment variable"):
        callback.on_train_begin(None, STATE, None)
    # The real HfApi with the hub unreachable (HF_HUB_OFFLINE=1 here, as in an air-gapped job).
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    callback = callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path), SCRIPT_ARGS)
    with pytest.raises(UserError) as err:
        callback.on_train_begin(None, STATE, None)
    assert "cannot reach or write to the Hugging Face Hub for hub_push_epochs=branch" in str(err.value)
    assert FAKE_TOKEN not in str(err.value)
    # Misconfigurations are caught when the callback is built.
    with pytest.raises(UserError, match="needs hub_model_id"):
        callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path, hub_model_id=None), SCRIPT_ARGS)
    with pytest.raises(UserError, match="export HF_TOKEN instead"):
        callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path, hub_token="hf_x"), SCRIPT_ARGS)
    with pytest.raises(UserError, match="is not one of"):
        callbacks.EpochCheckpointCallback(_fake_trainer(tmp_path), SimpleNamespace(hub_push_epochs="tag"))


# --- fp16 loss scaling under FSDP2 --------------------------------------------------------------------------------------

SCALER_CHECK = r'''
import sys
import torch, torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import get_fsdp2_grad_scaler
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
rank = dist.get_rank()
plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
plugin.set_mixed_precision("fp16")  # what accelerate does for mixed_precision: fp16: fp16 compute, reduce and output
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
for module in (*model, model):
    fully_shard(module, mp_policy=plugin.mixed_precision_policy)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
scaler = get_fsdp2_grad_scaler(device="cpu", init_scale=2.0**10, growth_interval=1)  # accelerate's FSDP2 scaler
for case in ("clean", "inf_in_rank0_shard", "fp16_overflow"):
    before = [p.full_tensor().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 8)).float().sum() * (1e4 if case == "fp16_overflow" else 1)
    scaler.scale(loss).backward()
    grad = model[0].weight.grad
    if case == "inf_in_rank0_shard" and rank == 0:
        grad.to_local()[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    applied = not all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    with open(f"{sys.argv[1]}/rank{rank}.txt", "a") as f:  # one file per rank: their stdout interleaves
        f.write(f"{case} {type(scaler).__name__} master {model[0].weight.dtype} grad {grad.dtype} "
                f"scale {scaler.get_scale():g} applied {applied}\n")
dist.barrier()  # both ranks done before gloo is torn down: without it 2 runs aborted at exit ("terminate called")
dist.destroy_process_group()
'''


def test_fp16_loss_scaler_under_fsdp2_skips_the_step_on_every_rank(tmp_path):
    """accelerate gives FSDP2 a plain GradScaler (not ShardedGradScaler). With DTensor gradients the found-inf flag is
    all-reduced across ranks, so an overflow in one shard makes both ranks skip the step and halve the scale; with
    accelerate's fp16 policy the master weights and gradients stay fp32, and a real fp16 overflow is caught too."""
    script = tmp_path / "scaler_check.py"
    script.write_text(SCALER_CHECK)
    run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, tmp_path])
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == [
            "clean GradScaler master torch.float32 grad torch.float32 scale 2048 applied True",  # grows (interval 1)
            "inf_in_rank0_shard GradScaler master torch.float32 grad torch.float32 scale 1024 applied False",
            "fp16_overflow GradScaler master torch.float32 grad torch.float32 scale 512 applied False",
        ]
