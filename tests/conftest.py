"""Shared fixtures: the offline assets built once per session, and helpers that run the real commands."""

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# A test launch trains on a few dozen rows; tokenizing all 600 of the assets cost each launch about 5 s (a 4-step
# launch: 23-27 s -> 18-19 s with 128), so the launches keep 128 (max_samples: a seeded random 128 of the 600).
LAUNCH_ROWS = 128
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


class ScriptServer:
    """tests/script_server.py: `python SCRIPT.py ARGS` and `accelerate launch ...` run by forking one process that
    imported the libraries once."""

    SCRIPTS = {p.name for p in REPO.glob("*.py")}
    # read by libraries when they are imported: the server runs with the values the command would see
    IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "WANDB", "PYTHON", "OMP", "MKL")

    def __init__(self):
        self.proc, self.lock, self.import_env = None, threading.Lock(), None

    def import_time(self, env):
        return {k: v for k, v in env.items() if k.startswith(self.IMPORT_TIME_ENV)}

    def can_run(self, cmd, env, kwargs):
        if os.environ.get("FCSFT_TESTS_NO_SCRIPT_SERVER"):  # every command a fresh process, as a user runs it
            return False
        if kwargs or len(cmd) < 2 or not hasattr(os, "fork"):
            return False
        script = cmd[0] == PYTHON and Path(cmd[1]).name in self.SCRIPTS and Path(cmd[1]).parent in (Path("."), REPO)
        # the launcher only: its workers are fresh interpreters, started by torch's elastic agent as usual
        launch = cmd[0] == ACCELERATE and cmd[1] == "launch"
        if not (script or launch):
            return False
        # a test that sets one of them for one command gets a fresh interpreter
        return self.import_time(env) == self.import_time(os.environ)

    def start(self, env):
        """(Re)start with env's import-time values: code run inside pytest may have set some (WANDB_PROJECT...)."""
        self.close()
        log = Path(tempfile.gettempdir(), f"script_server_{os.getpid()}.log")
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "script_server.py")], cwd=REPO, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests/script_server.py did not start:\n{log.read_text()[-3000:]}")
        self.import_env = self.import_time(env)

    def run(self, cmd, env, timeout):
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            if self.proc is None or self.proc.poll() is not None or self.import_env != self.import_time(env):
                self.start(env)
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            argv = cmd if cmd[0] == ACCELERATE else cmd[1:]  # the `accelerate` file itself, or the script
            request = {"argv": argv, "cwd": str(REPO), "env": env, "stdout": str(out), "stderr": str(err), "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = json.loads(self.proc.stdout.readline())
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if answer.get("timeout"):
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, answer["returncode"], stdout, stderr)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


SCRIPT_SERVER = ScriptServer()


def pytest_sessionfinish(session, exitstatus):
    SCRIPT_SERVER.close()


def run(cmd, check=True, timeout=600, env=None, **kwargs):
    """Run a command in the repo root; on failure show its output in the assertion message. `python SCRIPT.py ...` and
    `accelerate launch ...` go through the script server (the same command, started without re-importing the
    libraries); anything else, or one that changes an environment variable read at import time, is a fresh process."""
    cmd, command_env = [str(c) for c in cmd], env if env is not None else dict(os.environ)
    if SCRIPT_SERVER.can_run(cmd, command_env, kwargs):
        proc = SCRIPT_SERVER.run(cmd, command_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """demo_assets built by the repo's own script: tiny Qwen2 model, xLAM sample, BFCL-format held-out split."""
    out = tmp_path_factory.mktemp("assets")
    run([PYTHON, "make_demo_assets.py", "--out", out, "--n-train", "600"])  # the demo trains on 2,800; tests need fewer
    return out


def tiny_linear_layers(assets):
    """LoRA targets in the tiny Qwen2: its decoder layers x (q, k, v, o, gate, up, down)."""
    import json

    return json.loads((assets / "tiny-qwen2" / "config.json").read_text())["num_hidden_layers"] * 7


def write_demo_recipe(assets, folder, **overrides):
    """recipes/demo_cpu.yaml pointed at the session's assets and at folder/out, with overrides, written into folder."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  output_dir=str(folder / "out"), report_to=["none"])  # tests opt in to W&B
    recipe.update(overrides)
    path = folder / f"recipe_{len(list(folder.glob('recipe_*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def demo_recipe(assets, tmp_path):
    """Write recipes/demo_cpu.yaml pointed at the session's assets and tmp_path, with overrides."""
    return lambda **overrides: write_demo_recipe(assets, tmp_path, **overrides)


# --- shared by several test modules (test modules do not import each other) ----------------------------------------

FAKE_TOKEN = "hf_test_secret_do_not_print_123"


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records calls, and the files each upload would send."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def _record(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name == self.fail_on:
            raise ConnectionError(f"could not reach huggingface.co (Authorization: Bearer {FAKE_TOKEN})")

    def whoami(self):
        self._record("whoami")
        return {"name": "tester"}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self._record("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok)

    def create_branch(self, repo_id, branch, exist_ok=False):
        self._record("create_branch", repo_id=repo_id, branch=branch, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        self._record("upload_folder", repo_id=repo_id, folder=folder_path, revision=revision, files=files,
                     commit_message=commit_message)


def qwen_call(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def first_allowed(values):
    value = next(v for v in values if v != "")
    if isinstance(value, dict):  # dict answers list allowed values per key
        return {k: first_allowed(v) for k, v in value.items() if any(x != "" for x in v)}
    return value


def correct_qwen_output(answer):
    return "\n".join(qwen_call(name, {p: first_allowed(v) for p, v in params.items() if any(x != "" for x in v)})
                     for call in answer["ground_truth"] for name, params in call.items())


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present (make test-gpu); elsewhere they are skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- recipes/xlam_lora.yaml on the tiny model through 2-process FSDP2: one uninterrupted run and one killed and resumed,
# shared by tests/test_lora_qlora.py (adapter shards, resume) and tests/test_model_card.py (the card of a real run) -----

LORA_RUN_ARGS = ["--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
                 "--max_samples", LAUNCH_ROWS]
LORA_KILL_AFTER = "checkpoint-8"


def lora_recipe(assets, output_dir, path):
    """recipes/xlam_lora.yaml at the rank series' first point (sweeps/phase4_lora_ranks.yaml), scaled to the tiny model
    and CPU: what changes is only what CPU and the tiny model need."""
    recipe = yaml.safe_load((REPO / "recipes" / "xlam_lora.yaml").read_text())
    first_point = yaml.safe_load((REPO / "sweeps" / "phase4_lora_ranks.yaml").read_text())["points"][0]
    recipe.update(first_point)
    recipe.pop("datasets")  # the hub mixture -> the local sample (its data transforms stay as the recipe sets them)
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  output_dir=str(output_dir), dtype="float32", bf16=False, optim="adamw_torch", report_to=["none"],
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=512,
                  dataloader_num_workers=0, dataset_num_proc=1)
    path.write_text(yaml.safe_dump(recipe))
    return path


def kill_tree(proc):
    """SIGKILL a launched command and every process under it, by pid (torchrun's workers are its children)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    for process in parent.children(recursive=True) + [parent]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


@pytest.fixture(scope="session")
def lora_fsdp_runs(assets, tmp_path_factory):
    """{"reference": output dir of an uninterrupted run, "resumed": output dir of a run SIGKILLed once checkpoint-8 (its
    gathered adapter included) was on disk and then resumed with --resume_from_checkpoint true, "stderr": the resumed
    launch's log}. 12 steps of 2 x 2 rows, a checkpoint every 4 steps."""
    import time

    root = tmp_path_factory.mktemp("lora_fsdp")
    config = REPO / "accelerate_configs" / "cpu_fsdp_full.yaml"
    reference = lora_recipe(assets, root / "reference", root / "reference.yaml")
    run([ACCELERATE, "launch", "--config_file", config, "train_sft.py", reference, *LORA_RUN_ARGS])

    interrupted = lora_recipe(assets, root / "resumed", root / "resumed.yaml")
    cmd = [ACCELERATE, "launch", "--config_file", config, "train_sft.py", interrupted, *LORA_RUN_ARGS]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # training_args.bin is the last file the gathered adapter's save writes into the checkpoint
    written = root / "resumed" / LORA_KILL_AFTER / "training_args.bin"
    deadline = time.time() + 300
    while not written.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc)
    assert written.exists(), "the run never wrote its checkpoint"
    assert not (root / "resumed" / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    resumed = run([ACCELERATE, "launch", "--config_file", config, "train_sft.py", interrupted, *LORA_RUN_ARGS,
                   "--resume_from_checkpoint", "true"])
    return {"reference": root / "reference", "resumed": root / "resumed", "stderr": resumed.stderr}
