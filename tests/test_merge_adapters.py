"""merge_adapters.py on two LoRA adapters of the tiny model: each combination method gives a model plain transformers
loads; the linear and cat results equal a hand computation from the saved adapters; errors come before any model is
loaded; eval_bfcl.py scores an adapter folder and its merged checkpoint alike."""

import json
import math

import pytest
import torch
from conftest import PYTHON, run, tiny_linear_layers
from safetensors.torch import load_file

import merge_adapters
from fcsft.errors import UserError

WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def adapters(assets, tmp_path_factory):
    """Two rank-4 adapters with random (not zero) A and B and different alphas (scales 2 and 1), saved as train_sft.py
    saves them (with the tokenizer), and a rank-8 one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    folders = []
    for seed, (r, alpha) in enumerate(((4, 8), (4, 4), (8, 8))):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2"),
                               LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False))
        folder = root / f"adapter_{seed}"
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(assets / "tiny-qwen2").save_pretrained(folder)
        folders.append(folder)
    return folders


def merge(*argv):
    return merge_adapters.merge(merge_adapters.parse_args([str(a) for a in argv]))


def factors(folder):
    """{module: (A, B, alpha/r)} from a saved adapter."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    modules = {k.split(".lora_A")[0] for k in tensors if ".lora_A" in k}
    return {m: (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"], config["lora_alpha"] / config["r"])
            for m in modules}


def weights_of(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def hand_merged(assets, adapters, combine):
    """The base's weights plus combine([(A, B, scale, weight) per adapter]) for every adapted linear layer."""
    base = weights_of(assets / "tiny-qwen2")
    per_adapter = [factors(a) for a in adapters]
    expected = dict(base)
    for module in per_adapter[0]:
        key = module.removeprefix("base_model.model.") + ".weight"
        expected[key] = base[key] + combine([(*f[module], w) for f, w in zip(per_adapter, WEIGHTS)])
    return base, expected


def test_linear_merge_equals_the_hand_computation(assets, adapters, tmp_path):
    """PEFT's linear: A' = sum sqrt(w s) A_i, B' = sum sqrt(w s) B_i with scale 1, so W' = W + B'A' (cross terms
    included: not the weighted sum of the updates)."""
    merge(*adapters[:2], "--method", "linear", "--weights", *WEIGHTS, "--output", tmp_path / "linear")

    def linear(parts):
        a = sum(math.sqrt(w * s) * A for A, B, s, w in parts)
        b = sum(math.sqrt(w * s) * B for A, B, s, w in parts)
        return b @ a

    base, expected = hand_merged(assets, adapters[:2], linear)
    merged = weights_of(tmp_path / "linear")
    changed = [k for k in base if not torch.equal(expected[k], base[k])]
    assert len(changed) == tiny_linear_layers(assets)  # every linear layer of every decoder layer
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_cat_merge_is_the_exact_weighted_sum_of_the_updates(assets, adapters, tmp_path):
    merge(*adapters[:2], "--method", "cat", "--weights", *WEIGHTS, "--output", tmp_path / "cat")
    _, expected = hand_merged(assets, adapters[:2], lambda parts: sum(w * s * B @ A for A, B, s, w in parts))
    merged = weights_of(tmp_path / "cat")
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "svd"])
def test_each_method_gives_a_loadable_model_with_its_card(assets, adapters, method, tmp_path):
    output = merge(*adapters[:2], "--method", method, "--weights", *WEIGHTS, "--density", 0.5, "--output", tmp_path / method)
    base, merged = weights_of(assets / "tiny-qwen2"), weights_of(output)
    assert merged.keys() == base.keys() and all(torch.isfinite(t).all() for t in merged.values())
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    card = (output / "README.md").read_text()
    assert f"combination_type={method}" in card and "| method | " + method + " |" in card
    assert f"| `{adapters[0]}` | 0.7 | 4 | 8 | 2 |" in card and f"| `{adapters[1]}` | 0.3 | 4 | 4 | 1 |" in card
    assert ("| density | 0.5 |" in card) == (method != "svd")  # recorded where the method uses it
    assert "library_name: transformers" in card and "Command: `python merge_adapters.py" in card


def test_combined_adapter_output_loads_as_an_adapter(assets, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = merge(*adapters[:2], "--method", "ties", "--density", "0.5", "--adapter-only", "--output", tmp_path / "ad")
    assert (output / "adapter_config.json").is_file() and (output / "tokenizer.json").is_file()
    assert "library_name: peft" in (output / "README.md").read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2"), output)
    assert sum("lora_B" in n for n, _ in model.named_parameters()) == tiny_linear_layers(assets)


@pytest.mark.parametrize("argv, message", [
    (["--method", "linear"], r"--method linear needs adapters of one rank, got r=\[4, 8\]"),
    (["--method", "ties"], r"--method ties needs adapters of one rank"),
    (["--method", "dare_ties", "--weights", "1", "1"], r"needs adapters of one rank"),
    (["--method", "cat", "--weights", "1"], r"1 --weights for 2 adapters"),
])
def test_bad_combinations_stop_before_loading(adapters, argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        merge(adapters[0], adapters[2], *argv, "--output", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_density_is_required_for_ties_and_dare(adapters, tmp_path):
    with pytest.raises(UserError, match=r"--method dare_linear needs --density in \(0, 1\]"):
        merge(*adapters[:2], "--method", "dare_linear", "--output", tmp_path / "x")
    with pytest.raises(UserError, match="is not an adapter folder"):
        merge(tmp_path, "--output", tmp_path / "x")


def test_eval_bfcl_scores_an_adapter_folder_as_its_merged_checkpoint(assets, adapters, tmp_path):
    """One adapter merged into its base is a plain checkpoint; eval_bfcl.py on the adapter folder (base + adapter via
    PEFT) and on that checkpoint generates the same answers and writes the same scores."""
    merged = merge(adapters[0], "--output", tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    outputs = {}
    for name, model in (("adapter", adapters[0]), ("merged", merged)):
        outputs[name] = tmp_path / f"bfcl_{name}"
        run([PYTHON, "eval_bfcl.py", "--model", model, "--data-dir", assets / "bfcl_heldout", "--categories", "all",
             "--limit", "3", "--max-new-tokens", "8", "--batch-size", "4", "--output-dir", outputs[name]])
    results = {n: sorted(p.read_text() for p in out.glob("BFCL_v4_*_result.json")) for n, out in outputs.items()}
    assert len(results["adapter"]) == 5 and results["adapter"] == results["merged"]  # one file per demo category
    scores = {n: json.loads((out / "summary.json").read_text())["categories"] for n, out in outputs.items()}
    assert scores["adapter"] == scores["merged"]
