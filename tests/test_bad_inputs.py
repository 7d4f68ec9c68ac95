"""Bad inputs, kills and faults against the real commands (issue 20): each case is refused with one line that names
the file, key or row, exits non-zero without a traceback, and leaves what was already written as it was.

The quick cases (refused before any model loads) are one table, run once each by one module fixture; the cases
that need a run to exist (a killed multi-process eval, a sweep stopped with SIGTERM and run again over a damaged
checkpoint) have a test each.
"""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ACCELERATE, LAUNCH_ROWS, PYTHON, REPO, run

from fcsft import sweeps

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"  # a fake that looks like a real token (scrubbed by its look too)


def snapshot(folder):
    """{relative path: sha256} of every file under folder: what must not change."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def write_recipe(path, assets, **overrides):
    recipe = yaml.safe_load((REPO / "recipes" / "demo_cpu.yaml").read_text())
    recipe.update(model_name_or_path=str(assets / "tiny-qwen2"), dataset_name=str(assets / "xlam_sample" / "train.jsonl"),
                  output_dir=str(path.parent / f"{path.stem}_out"), report_to=["none"])
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_cases(assets, root):
    """(name, command, env, message that must appear, folder whose files must stay as they are)."""
    lines = (assets / "xlam_sample" / "train.jsonl").read_text().splitlines()
    (root / "empty.jsonl").write_text("")
    (root / "truncated.jsonl").write_text("\n".join(lines[:5] + [lines[5][:40]] + lines[6:10]) + "\n")
    (root / "latin1.jsonl").write_bytes(("\n".join(lines[:3]) + "\n").encode() + '{"query": "café"}\n'.encode("latin-1"))
    (root / "syntax.yaml").write_text(f"model_name_or_path: {assets / 'tiny-qwen2'}\nlearning_rate: [1e-3\n")
    mixture = [{"path": str(assets / "xlam_sample" / "train.jsonl"), "fraction": "half"}]
    recipes = {
        "hub_token_in_recipe": ({"hub_token": TOKEN}, r"hub_token in .*hub_token_in_recipe\.yaml.*export HF_TOKEN"),
        "epochs_negative": ({"num_train_epochs": -1}, r"epochs_negative\.yaml: num_train_epochs is -1"),
        "batch_size_zero": ({"per_device_train_batch_size": 0}, r"batch_size_zero\.yaml: per_device_train_batch_size is 0"),
        "learning_rate_text": ({"learning_rate": "fast"}, r"learning_rate_text\.yaml: learning_rate: 'fast' is not a number"),
        "unknown_format": ({"dataset_format": "xlamm"}, r"dataset_format 'xlamm' in .*unknown_format\.yaml"),
        "fraction_text": ({"dataset_name": None, "datasets": mixture}, r"datasets\[0\] .*fraction 'half' is not a number"),
        "empty_file": ({"dataset_name": str(root / "empty.jsonl")}, r"empty\.jsonl is empty"),
        "truncated_line": ({"dataset_name": str(root / "truncated.jsonl")}, r"truncated\.jsonl:6: not a valid JSON line"),
        "not_utf8": ({"dataset_name": str(root / "latin1.jsonl")}, r"latin1\.jsonl:4: not UTF-8"),
        "model_path_missing": ({"model_name_or_path": str(root / "no_such_model")}, r"no_such_model: no such folder"),
        "hub_id_not_cached": ({"model_name_or_path": "nobody/not-downloaded"},
                              r"nobody/not-downloaded is neither a local folder nor in the Hugging Face cache.*hf download"),
    }
    cases = []
    for name, (overrides, message) in recipes.items():
        recipe = write_recipe(root / f"{name}.yaml", assets, **overrides)
        keep = root / f"{name}_out"
        if name != "model_path_missing":  # an earlier run's files in the output folder must survive
            keep.mkdir()
            (keep / "README.md").write_text("an earlier run's card\n")
        cases.append((name, [PYTHON, "train_sft.py", recipe], {}, message, keep))
    token_flag = write_recipe(root / "token_flag.yaml", assets)
    cases += [
        ("hub_token_flag", [PYTHON, "train_sft.py", token_flag, "--hub_token", TOKEN], {},
         r"--hub_token on the command line", None),
        ("learning_rate_flag_text", [PYTHON, "train_sft.py", token_flag, "--learning_rate", "fast"], {},
         r"the command line: learning_rate: 'fast' is not a number", None),
        ("recipe_yaml_syntax", [PYTHON, "train_sft.py", root / "syntax.yaml"], {},
         r"syntax\.yaml is not valid YAML: .*line 2", None),
        # what every rank of `accelerate launch --config_file accelerate_configs/fsdp_full.yaml` sees without a GPU
        ("gpu_config_without_gpu", [PYTHON, "train_sft.py", token_flag],
         {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_FSDP": "true", "LOCAL_RANK": "0"},
         r"mixed_precision bf16 on GPUs, but no CUDA GPU was found.*cpu_fsdp_full\.yaml", None),
    ]
    return cases


def other_cases(assets, root):
    """eval_bfcl.py, model_card.py and sweep.py cases refused before anything runs."""
    trl_card = root / "trl_card_folder"
    trl_card.mkdir()
    (trl_card / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Model Card for x\n\nThis model is a "
                                        "fine-tuned version of [m](https://huggingface.co/m).\nIt has been trained using "
                                        "[TRL](https://github.com/huggingface/trl).\n")
    sweep_recipe = write_recipe(root / "sweep_recipe.yaml", assets, max_steps=2)
    base = {"recipe": str(sweep_recipe), "accelerate_config": str(REPO / "accelerate_configs" / "cpu_fsdp_full.yaml"),
            "grid": {"learning_rate": [1.0e-3]}}
    typo = root / "typo_sweep.yaml"
    typo.write_text(yaml.safe_dump({**base, "output_dir": str(root / "typo_sweep_out"),
                                    "bfcl": {"args": ["--limit", "1", "--batch-sise", "4"]}}))
    (root / "syntax_sweep.yaml").write_text("recipe: x.yaml\ngrid: {learning_rate: [1e-3}\n")
    locked = root / "locked_sweep.yaml"
    locked.write_text(yaml.safe_dump({**base, "output_dir": str(root / "locked_out"), "bfcl": {"score_trained": False}}))
    sweeps.claim_folder(sweeps.load_sweep(locked))  # the sweep started before, in this folder
    point_dir = root / "locked_out" / "learning_rate=0.001"
    point_dir.mkdir(parents=True)
    holder = {"host": os.uname().nodename, "pid": os.getpid(), "child_pid": None, "since": "now"}  # pytest: alive
    (point_dir / "point.lock").write_text(json.dumps(holder))
    return [
        ("eval_model_missing", [PYTHON, "eval_bfcl.py", "--model", root / "no_such_model", "--output-dir",
                                root / "eval_missing_out"], {}, r"--model: .*no_such_model: no such folder", None),
        ("eval_hub_id_not_cached", [PYTHON, "eval_bfcl.py", "--model", "nobody/not-downloaded", "--output-dir",
                                    root / "eval_hub_out"], {}, r"neither a local folder nor in the Hugging Face cache", None),
        ("model_card_without_run_summary", [PYTHON, "model_card.py", trl_card], {},
         r"trl_card_folder has no run_summary\.json .*TRL's generic card", trl_card),
        ("sweep_eval_args_typo", [PYTHON, "sweep.py", typo], {},
         r"typo_sweep\.yaml: bfcl\.args: eval_bfcl\.py has no flag --batch-sise.*did you mean '--batch-size'", None),
        ("sweep_yaml_syntax", [PYTHON, "sweep.py", root / "syntax_sweep.yaml"], {},
         r"syntax_sweep\.yaml is not valid YAML", None),
        ("sweep_point_locked", [PYTHON, "sweep.py", locked], {},
         rf"point\.lock: the point is being run by another process \(sweep pid {os.getpid()}", point_dir),
    ]


@pytest.fixture(scope="module")
def outcomes(assets, tmp_path_factory):
    """{name: (case, completed process, files before, files after)}: every quick case run once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cases = train_cases(assets, root) + other_cases(assets, root)

    def one(case):
        name, command, env, message, keep = case
        before = snapshot(keep) if keep else None
        proc = run(command, check=False, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **env})
        return name, (case, proc, before, snapshot(keep) if keep else None)

    return dict(map(one, cases))


QUICK = ["hub_token_in_recipe", "hub_token_flag", "epochs_negative", "batch_size_zero", "learning_rate_text",
         "learning_rate_flag_text", "unknown_format", "fraction_text", "empty_file", "truncated_line", "not_utf8", "model_path_missing",
         "hub_id_not_cached", "recipe_yaml_syntax", "gpu_config_without_gpu", "eval_model_missing",
         "eval_hub_id_not_cached", "model_card_without_run_summary", "sweep_eval_args_typo", "sweep_yaml_syntax",
         "sweep_point_locked"]


@pytest.mark.parametrize("name", QUICK)
def test_refused_with_one_line(outcomes, name):
    import re

    (_, command, _, message, keep), proc, before, after = outcomes[name]
    script = Path(str(command[1])).name
    assert proc.returncode != 0, f"{name}: exited 0\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, f"{name}:\n{proc.stderr[-3000:]}"
    assert "usage:" not in proc.stderr, f"{name}: the parser's usage text instead of one line"
    ours = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}: ")]
    said = proc.stderr[proc.stderr.index(ours[0]):] if len(ours) == 1 else ""  # the line and its hint lines
    assert re.search(message, said, re.S), f"{name}: {message!r} not in\n{proc.stderr[-3000:]}"
    assert TOKEN not in proc.stdout + proc.stderr  # a refused token is not echoed either
    assert before == after, f"{name}: files already written changed"
    if name in ("model_path_missing", "eval_model_missing", "eval_hub_id_not_cached"):
        outputs = {"model_path_missing": "model_path_missing_out", "eval_model_missing": "eval_missing_out",
                   "eval_hub_id_not_cached": "eval_hub_out"}
        assert not (Path(str(command[-1])).parent / outputs[name]).exists(), "an empty output folder was left behind"
    if name == "sweep_eval_args_typo":  # checked with the rest of the file: nothing trained, no sweep claimed the folder
        assert not Path(str(command[-1])).with_name("typo_sweep_out").exists()


# --- a killed multi-process eval resumed with another prompt format -----------------------------------------------


def test_resume_with_other_prompt_format_refused_on_rank_files(assets, tmp_path):
    """A 2-process eval killed before it merged its per-rank files leaves only BFCL_v4_<cat>_result.rank*.jsonl and
    generation.json (written before generating): resuming with another --prompt-format must be refused, not merged."""
    out = tmp_path / "eval"
    common = ["eval_bfcl.py", "--model", assets / "tiny-qwen2", "--data-dir", assets / "bfcl_heldout", "--categories",
              "demo_simple", "--limit", "2", "--max-new-tokens", "4", "--output-dir", out, "--no-score"]
    run([ACCELERATE, "launch", "--num_processes", "2", "--cpu", *common])
    merged = out / "BFCL_v4_demo_simple_result.json"
    rows = merged.read_text().splitlines()
    merged.unlink()  # as a kill leaves it: each rank's rows in its own file, not yet merged
    (out / "BFCL_v4_demo_simple_result.rank0.jsonl").write_text(rows[0] + "\n")
    (out / "BFCL_v4_demo_simple_result.rank1.jsonl").write_text(rows[1] + "\n")
    before = snapshot(out)
    proc = run([PYTHON, *common, "--prompt-format", "chat_template"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "holds results generated with other settings (prompt_format: bfcl -> chat_template" in proc.stderr
    assert snapshot(out) == before  # nothing merged, nothing overwritten


# --- scoring a result file with a duplicated id -------------------------------------------------------------------


def test_duplicated_ids_reported_in_score_output(assets, tmp_path):
    entries = [json.loads(line) for line in (assets / "bfcl_heldout" / "BFCL_v4_demo_simple.json").read_text().splitlines()]
    results = [{"id": e["id"], "result": "no call"} for e in entries[:3]]
    out = tmp_path / "result"
    out.mkdir()
    (out / "BFCL_v4_demo_simple_result.json").write_text(
        "".join(json.dumps(r) + "\n" for r in results + [results[1], results[1]]))
    proc = run([PYTHON, "eval_bfcl.py", "score", "--result-dir", out, "--data-dir", assets / "bfcl_heldout"])
    assert f"holds 2 duplicated id(s) (first: {entries[1]['id']})" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["duplicate_ids"] == {"demo_simple": {"count": 2, "first": entries[1]["id"]}}


# --- a sweep stopped with SIGTERM, then run again over a damaged checkpoint --------------------------------------


@pytest.fixture(scope="module")
def stopped_sweep(assets, tmp_path_factory):
    """One trained point (2-process FSDP2 on CPU, a checkpoint every 2 steps): SIGTERM to sweep.py once checkpoint-4
    is complete; the newest checkpoint is then damaged (an optimizer shard cut short) and the sweep run again."""
    root = tmp_path_factory.mktemp("stopped_sweep")
    recipe = write_recipe(root / "recipe.yaml", assets, max_steps=30, save_strategy="steps", save_steps=2,
                          logging_steps=1, max_samples=LAUNCH_ROWS, per_device_train_batch_size=1)
    sweep_file = root / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "recipe": str(recipe), "accelerate_config": "accelerate_configs/cpu_fsdp_full.yaml",
        "output_dir": str(root / "sweep"), "grid": {"learning_rate": [1.0e-3]}, "bfcl": {"score_trained": False}}))
    point = root / "sweep" / "learning_rate=0.001"
    proc = subprocess.Popen([PYTHON, "sweep.py", sweep_file, "--progress-seconds", "1"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 400
    while not (point / "train" / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    child = json.loads((point / "point.lock").read_text())["child_pid"]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "child": child,
               "lock_left": (point / "point.lock").exists()}
    time.sleep(1)
    stopped["child_alive"] = child_alive(child)
    checkpoints = sorted((point / "train").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = checkpoints[-1]
    shard = next(p for p in sorted(newest.rglob("*")) if p.is_file() and p.suffix in (".distcp", ".pt", ".pth"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    again = run([PYTHON, "sweep.py", sweep_file])
    return {"stopped": stopped, "again": again, "point": point, "damaged": newest, "root": root}


def child_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigterm_stops_the_training_child(stopped_sweep):
    stopped = stopped_sweep["stopped"]
    assert stopped["rc"] != 0 and "Traceback" not in stopped["stderr"] and "KeyboardInterrupt" not in stopped["stderr"]
    assert "sweep.py: stopped by SIGTERM; the running command was stopped too" in stopped["stderr"]
    assert not stopped["child_alive"], "the training command survived the sweep"
    assert not stopped["lock_left"]


def test_rerun_falls_back_from_a_damaged_checkpoint_and_counts_every_attempt(stopped_sweep):
    point, damaged = stopped_sweep["point"], stopped_sweep["damaged"]
    log = (point / "train.log").read_text()
    assert f"{damaged} is damaged" in log and "falling back to the previous complete checkpoint" in log
    record = json.loads((point / "point.json").read_text())
    assert record["status"] == "done" and len(record["attempt_seconds"]["train"]) == 2
    assert record["seconds"]["train"] == pytest.approx(sum(record["attempt_seconds"]["train"]), abs=0.2)
    rows = list(__import__("csv").DictReader(open(stopped_sweep["root"] / "sweep" / "results.csv")))
    assert float(rows[0]["train_seconds"]) == pytest.approx(record["seconds"]["train"], abs=0.2)
    assert rows[0]["status"] == "done (2 attempts: time and cost over all of them; resumed from a checkpoint)"
    assert "resume_from_checkpoint" not in rows[0]["settings"]
    summary = json.loads((point / "train" / "run_summary.json").read_text())
    assert summary["resumed_from"] and "train_loss_note" in summary


def test_no_token_in_a_card_written_from_an_old_run_summary(stopped_sweep, tmp_path):
    """A run_summary.json written before hub_token was refused (the token in its command and recipe): the card that
    model_card.py writes, and would push, holds no token."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(stopped_sweep["point"] / "train", folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = json.loads((folder / "run_summary.json").read_text())
    summary["command"] += ["--hub_token", TOKEN]
    summary["recipe_text"] += f"hub_token: {TOKEN}\n"
    (folder / "run_summary.json").write_text(json.dumps(summary))
    run([PYTHON, "model_card.py", folder])
    card = (folder / "README.md").read_text()
    assert TOKEN not in card and "--hub_token ***" in card


# --- the prompt-mode decoder's arithmetic guard -------------------------------------------------------------------


@pytest.mark.parametrize("expression", ['("a" * 10000) * 10000', "(9 ** 9999) ** 999", "[0] * 10 ** 6",
                                        "(1 << 99999) * (1 << 99999)", '"ab" * (10 ** 5)'])
def test_arithmetic_guard_bounds_both_operands(expression):
    """Model output like `f(a=("a"*10000)*10000)` is refused in microseconds instead of building 100 MB (or 7 s of
    CPU for the power); small arithmetic still decodes (tests/test_bfcl_checker.py keeps the official verdicts)."""
    from fcsft.bfcl_checker import DecodeError, decode_python_calls

    started = time.perf_counter()
    with pytest.raises(DecodeError, match="too large"):
        decode_python_calls(f"[f(a={expression})]")
    assert time.perf_counter() - started < 0.5
    assert decode_python_calls('[f(a="ab" * 3, b=2 ** 10, c=[1] * 2, d=3 * 1.5)]') == \
        [{"f": {"a": "ababab", "b": 1024, "c": [1, 1], "d": 4.5}}]
