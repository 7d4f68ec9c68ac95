"""Real FSDP2 across several gloo processes through `accelerate launch ... train_sft.py RECIPE`.

Accelerate alone runs multi-process CPU jobs as DDP; these tests prove cpu_fsdp.py makes FSDP really shard the
model (parameters are DTensors over the ranks), that training resumes exactly, and that the final checkpoint loads.
If an accelerate upgrade breaks the patch, the sharding assertions here fail.
"""

import json
import subprocess
import time

import pytest
import torch
from conftest import ACCELERATE, LAUNCH_ROWS, PYTHON, REPO, run, write_demo_recipe

SHORT = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--max_length", "512", "--logging_steps", "1",
         "--max_samples", LAUNCH_ROWS]
# the FULL_SHARD run: 16 steps with a checkpoint every 4, shared by the sharding, final-checkpoint and resume tests
FULL_RUN = ["--max_steps", "16", "--per_device_train_batch_size", "2", "--max_length", "512", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "4", "--max_samples", LAUNCH_ROWS]


def launch(config, recipe, *overrides, **kwargs):
    return run([ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / config, "train_sft.py", recipe, *overrides], **kwargs)


def summary(output_dir):
    return json.loads((output_dir / "run_summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """(output dir, stderr) of one uninterrupted cpu_fsdp_full.yaml launch with FULL_RUN."""
    folder = tmp_path_factory.mktemp("full_run")
    recipe = write_demo_recipe(assets, folder)
    proc = launch("cpu_fsdp_full.yaml", recipe, *FULL_RUN)
    return folder / "out", proc.stderr


@pytest.mark.parametrize("config, mesh, placement", [
    ("cpu_fsdp_full.yaml", [2], "(Shard(dim=0),)"),
    ("cpu_fsdp_shard_grad_op.yaml", [2], "(Shard(dim=0),)"),
    ("cpu_hsdp.yaml", [2, 2], "(Replicate(), Shard(dim=0))"),
])
def test_fsdp2_really_shards(config, mesh, placement, demo_recipe, tmp_path, request):
    if config == "cpu_fsdp_full.yaml":
        output_dir, stderr = request.getfixturevalue("full_run")
    else:
        stderr, output_dir = launch(config, demo_recipe(), *SHORT).stderr, tmp_path / "out"
    assert "cpu_fsdp: no GPU and an FSDP launch config" in stderr
    info = summary(output_dir)
    assert info["distributed_type"] == "DistributedType.FSDP" and info["fsdp_version"] == 2
    shard = info["sharding"]
    assert shard["dtensor_parameters"] == shard["parameters"] > 0
    assert shard["mesh_shape"] == mesh and shard["placements"] == [placement]
    # each rank holds 1/shard-size of the weights (dim-0 chunks round up, hence the small slack)
    assert shard["local_numel"] <= shard["global_numel"] / mesh[-1] * 1.02
    assert len(info["peak_memory_per_rank"]) == info["num_processes"] == (4 if len(mesh) == 2 else 2)
    assert any("tokens_per_second_per_device" in log for log in info["log_history"])
    if config == "cpu_fsdp_shard_grad_op.yaml":
        env = (REPO / "accelerate_configs" / config).read_text()
        assert "fsdp_reshard_after_forward: false" in env


def test_final_checkpoint_loads_on_one_device(assets, full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = full_run
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "weather in Oslo?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5 or tokenizer.eos_token_id in generated[0].tolist()
    # every tensor is complete (gathered, not a shard) and differs from the random init: trained and saved in full
    init = AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2").state_dict()
    trained = model.state_dict()
    assert all(trained[k].shape == init[k].shape for k in init)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])


def _losses(output_dir):
    return {log["step"]: log["loss"] for log in summary(output_dir)["log_history"] if "loss" in log}


def test_killed_run_resumes_with_identical_losses(full_run, demo_recipe, tmp_path):
    args = FULL_RUN
    expected = _losses(full_run[0])  # the uninterrupted run
    assert len(expected) == 16

    # the same run, killed (SIGKILL, the whole process group) once its first checkpoint is on disk
    interrupted = demo_recipe(output_dir=str(tmp_path / "interrupted"))
    cmd = [ACCELERATE, "launch", "--config_file", REPO / "accelerate_configs" / "cpu_fsdp_full.yaml", "train_sft.py", interrupted, *args]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "interrupted" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # torchrun starts each worker in its own session, so kill every process whose command line names this recipe
    subprocess.run(["pkill", "-KILL", "-f", str(interrupted)], check=False)
    proc.wait()
    time.sleep(1)
    assert subprocess.run(["pgrep", "-f", str(interrupted)], capture_output=True).returncode == 1, "a worker survived"
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (tmp_path / "interrupted" / "model.safetensors").exists(), "the run finished before it was killed"

    proc = launch("cpu_fsdp_full.yaml", interrupted, *args, "--resume_from_checkpoint", "true")
    resumed_from = int(proc.stderr.split("resume: continuing from ")[1].split("checkpoint-")[1].split()[0])
    assert 4 <= resumed_from < 16
    resumed = _losses(tmp_path / "interrupted")
    for step in range(resumed_from + 1, 17):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_patch_is_inactive_without_an_fsdp_launch(demo_recipe):
    proc = run([PYTHON, "train_sft.py", demo_recipe(), "--show_examples", "1"])
    assert "cpu_fsdp" not in proc.stderr
    assert not torch.cuda.is_available()  # these tests are the CPU path; GPU runs never reach the patch


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_load(config):
    """Every config loads with accelerate's own loader; FSDP configs use FSDP2 and decoder-layer wrapping."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "accelerate_configs" / config))
    if cfg.distributed_type == "FSDP":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"].endswith("DecoderLayer")
        assert fsdp["fsdp_version"] == 2 or "FSDP1" in (REPO / "accelerate_configs" / config).read_text()
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if cfg.parallelism_config:
        sizes = cfg.parallelism_config
        product = 1
        for dim in ("dp_replicate", "dp_shard", "tp", "cp"):  # every mesh dimension accelerate multiplies
            product *= sizes.get(f"parallelism_config_{dim}_size", 1)
        assert product == cfg.num_processes
        # accelerate ignores keys it does not know: each must be a real `accelerate launch` option
        from accelerate.commands.launch import launch_command_parser

        assert set(sizes) <= {action.dest for action in launch_command_parser()._actions}
