"""estimate_memory.py against hand-worked cases and against tensors measured on CPU (no GPU needed, a few seconds)."""

import json
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO

from fcsft import memory_estimate
from fcsft.metrics import GPUS

QWEN3B = memory_estimate.ARCHITECTURES["qwen2.5-3b"]


def test_parameter_counts_match_the_architectures_table():
    # REFERENCE.md: 0.49B, 1.54B, 3.09B, 1.32B; exact values are what transformers builds from these configs
    totals = {name: memory_estimate.parameter_counts(memory_estimate.shape_of(config))["total"] for name, config in memory_estimate.ARCHITECTURES.items()}
    assert totals == {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
                      "opt-1.3b": 1_315_758_080}


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "opt-1.3b"])
def test_parameter_counts_equal_the_transformers_model(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**memory_estimate.ARCHITECTURES[name]))
    assert sum(p.numel() for p in model.parameters()) == memory_estimate.parameter_counts(memory_estimate.shape_of(memory_estimate.ARCHITECTURES[name]))["total"]


def test_lora_parameters_by_hand():
    # Qwen2.5-3B, r=16 on q,k,v,o,gate,up,down: 16 * [(2048+2048) + 2*(2048+256) + (2048+2048) + 2*(2048+11008)
    # + (11008+2048)] = 831,488 per layer, x 36 layers
    assert memory_estimate.lora_parameters(memory_estimate.shape_of(QWEN3B), 16) == 36 * 831_488 == 29_933_568


def test_fsdp_full_shard_states_by_hand():
    # 3.086B params over 8 GPUs, fp32 master copies (accelerate upcasts under bf16 mixed precision):
    # params 4 B, grads 4 B, AdamW 8 B per parameter, each divided by 8
    setup = memory_estimate.Setup(world_size=8, strategy="full_shard", dtype="bfloat16", mixed_precision="bf16")
    result = memory_estimate.estimate(QWEN3B, setup)
    n = 3_085_938_688
    assert result["parameters"] == n * 4 / 8
    assert result["gradients"] == n * 4 / 8
    assert result["optimizer"] == n * 8 / 8


def test_ddp_keeps_full_copies_and_buckets():
    # DDP does not upcast: a bf16-loaded model trains in bf16 (2 B params, 2 B grads + 2 B buckets, 4 B AdamW)
    n = memory_estimate.ARCHITECTURES["qwen2.5-1.5b"]
    result = memory_estimate.estimate(n, memory_estimate.Setup(world_size=8, strategy="ddp"))
    total = 1_543_714_304
    assert result["parameters"] == total * 2 and result["gradients"] == total * 4 and result["optimizer"] == total * 4


def test_flops_per_token_by_hand():
    # tied embeddings: the matrix is the LM head, counted once; 12*L*d*s for attention
    assert memory_estimate.flops_per_token(QWEN3B, 0) == 6 * 3_085_938_688
    assert memory_estimate.flops_per_token(QWEN3B, 500) == 6 * 3_085_938_688 + 12 * 36 * 2048 * 500
    # OPT: learned positions are a lookup, not a matmul
    opt = memory_estimate.ARCHITECTURES["opt-1.3b"]
    assert memory_estimate.flops_per_token(opt, 0) == 6 * (1_315_758_080 - 2050 * 2048)


def test_knobs_move_memory_the_right_way():
    base = memory_estimate.Setup(world_size=8, batch_size=16, seq_len=1024)
    plain = memory_estimate.estimate(QWEN3B, base)
    checkpointed = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(**{**base.__dict__, "activation_checkpointing": True}))
    zero2 = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(**{**base.__dict__, "strategy": "shard_grad_op"}))
    lora = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(**{**base.__dict__, "lora_r": 16}))
    assert checkpointed["activations"] < plain["activations"] / 10
    counts = memory_estimate.parameter_counts(memory_estimate.shape_of(QWEN3B))
    layer = counts["layer_linear"] + counts["layer_other"]
    assert zero2["temporary"] - plain["temporary"] == (36 - 1) * layer * 2  # every layer stays gathered, not one (bf16)
    assert lora["optimizer"] < plain["optimizer"] / 50
    # padding-free with SDPA: the block-diagonal mask spans the whole micro-batch, so it grows with its square
    free = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(**{**base.__dict__, "padding_free": True, "seq_len": 512}))
    free2 = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(**{**base.__dict__, "padding_free": True, "seq_len": 512, "batch_size": 32}))
    assert free2["activations"] > 2 * free["activations"]


def test_fits_verdicts():
    def fits(*flags):
        out = subprocess.run([PYTHON, "estimate_memory.py", "--model", "qwen2.5-3b", "--json", *flags], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["fits"]

    # full fine-tuning of 3B on one 24 GB GPU: bf16 weights, gradients and AdamW states alone are 8 B/param = 23 GiB
    assert not fits("--world-size", "1", "--strategy", "single", "--gpu", "l4", "--batch-size", "1", "--seq-len", "512")
    assert fits("--world-size", "1", "--strategy", "single", "--gpu", "l4", "--qlora", "--batch-size", "1",
                "--seq-len", "512", "--activation-checkpointing")
    # 8 x H100: 16 rows of 1024 tokens keep ~80 GiB of activations without checkpointing, 8 rows fit
    assert not fits("--world-size", "8", "--batch-size", "16", "--seq-len", "1024")
    assert fits("--world-size", "8", "--batch-size", "16", "--seq-len", "1024", "--activation-checkpointing")
    assert fits("--world-size", "8", "--batch-size", "8", "--seq-len", "1024")


# --- activations: the per-layer count against what autograd really saves -------------------------------------------


def _saved_bytes_per_token(model, layer, batch, length):
    """Bytes of the tensors autograd saves inside one decoder layer (unique storages, parameters excluded)."""
    ids = torch.randint(10, 1000, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding, so SDPA gets a mask as in padded training batches
    captured = {}

    def grab(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise StopIteration

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(StopIteration):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    args, kwargs = captured["args"], captured["kwargs"]
    x = args[0].detach().requires_grad_()
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for value in kwargs.values():  # the mask and rotary tables are shared by all layers
        for t in value if isinstance(value, tuple) else (value,):
            if torch.is_tensor(t):
                shared.add(t.untyped_storage().data_ptr())
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, *args[1:], **kwargs)
    return sum(n for ptr, n in saved.items() if ptr not in shared) / (batch * length)


@pytest.mark.parametrize("family", ["qwen2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_r", [0, 8])
def test_activation_count_equals_saved_tensors(family, dtype, lora_r):
    from transformers import AutoModelForCausalLM, OPTConfig, Qwen2Config

    torch.manual_seed(0)
    if family == "qwen2":
        config = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = OPTConfig(vocab_size=1000, hidden_size=128, ffn_dim=512, num_hidden_layers=1, num_attention_heads=4,
                           word_embed_proj_dim=128, max_position_embeddings=512, dropout=0.1)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").train()
    if lora_r:
        from peft import LoraConfig, get_peft_model

        # adapters in the compute dtype, as FSDP2's bf16 mixed precision gathers them
        model = get_peft_model(model, LoraConfig(r=lora_r, target_modules="all-linear", lora_dropout=0.05),
                               autocast_adapter_dtype=False)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model.model.get_decoder()
    measured = _saved_bytes_per_token(model, decoder.layers[0], batch=4, length=128)
    c = 2 if dtype == torch.bfloat16 else 4
    # on CPU dropout keeps its mask in the compute dtype (bool on CUDA)
    predicted = memory_estimate.activation_bytes_per_token_per_layer(memory_estimate.shape_of(json.loads(config.to_json_string())), c, lora_r,
                                                        attention_mask_span=128, dropout_mask_bytes=c)
    assert predicted == pytest.approx(measured, rel=0.005)


def test_states_equal_a_real_adamw_step(assets):
    """Single process fp32: parameters, gradients and AdamW state bytes of the tiny model after one real step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "tiny-qwen2")
    ids = torch.randint(10, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    result = memory_estimate.estimate(memory_estimate.load_config(assets / "tiny-qwen2"),
                         memory_estimate.Setup(world_size=1, strategy="single", dtype="float32", mixed_precision="no"))
    assert result["parameters"] == nbytes(model.parameters())
    assert result["gradients"] == nbytes(p.grad for p in model.parameters())
    assert result["optimizer"] == nbytes(state)


# --- long context: 8K / 16K and context parallelism ----------------------------------------------------------------


def test_context_parallelism_divides_the_sequence_activations():
    # cp devices share each sequence: activations are those of 1/cp of its tokens, with the mask dropped (plain causal
    # attention, k/v at the kv heads, as with FlashAttention); states stay sharded over the whole world size
    cp = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(world_size=8, batch_size=1, seq_len=16384, cp_size=2))
    half = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(world_size=8, batch_size=1, seq_len=8192, attention="flash_attention_2"))
    assert cp["activations"] == half["activations"]
    assert (cp["parameters"], cp["gradients"], cp["optimizer"]) == (half["parameters"], half["gradients"], half["optimizer"])
    s = memory_estimate.shape_of(QWEN3B)
    kv = s.d // s.heads * s.kv_heads
    assert cp["temporary"] - half["temporary"] == 2 * 16384 * kv * 2  # one layer's all-gathered k and v (bf16)
    quarter = memory_estimate.estimate(QWEN3B, memory_estimate.Setup(world_size=8, batch_size=1, seq_len=16384, cp_size=4))
    assert quarter["activations"] == pytest.approx(cp["activations"] / 2)
    for bad in (dict(cp_size=3), dict(cp_size=2, strategy="ddp"), dict(cp_size=2, padding_free=True),
                dict(cp_size=2, attention="flash_attention_2")):
        with pytest.raises(ValueError):
            memory_estimate.estimate(QWEN3B, memory_estimate.Setup(world_size=8, batch_size=1, seq_len=16384, **bad))


def test_long_context_recipes_fit_8_h100s_as_their_headers_say():
    """Each long-context recipe's header quotes the estimate for its own batch, length, packing, checkpointing and
    accumulation on 8 x H100."""
    import yaml

    def setup(recipe, **changes):
        r = yaml.safe_load((REPO / "recipes" / recipe).read_text())
        return memory_estimate.Setup(world_size=8, batch_size=r["per_device_train_batch_size"], seq_len=r["max_length"],
                        padding_free=r.get("packing", False), activation_checkpointing=r["activation_checkpointing"],
                        gradient_accumulation_steps=r["gradient_accumulation_steps"], **changes)

    for recipe, changes in (("xlam_8k.yaml", {}), ("xlam_16k.yaml", {}), ("xlam_16k_cp.yaml", {"cp_size": 2})):
        result = memory_estimate.estimate(QWEN3B, setup(recipe, **changes))
        assert result["peak"] * 1.10 / memory_estimate.GiB <= GPUS["h100"]["usable_gib"]
        assert f"Estimated peak per H100{':' if 'cp' not in recipe else ' for full 16,384-token rows:'} " \
               f"{result['peak'] / memory_estimate.GiB:.1f} GiB" in (REPO / "recipes" / recipe).read_text()
    # without context parallelism the cp recipe's 16K tokens and activations do not fit one H100
    alone = memory_estimate.estimate(QWEN3B, setup("xlam_16k_cp.yaml"))
    assert alone["peak"] * 1.10 / memory_estimate.GiB > GPUS["h100"]["usable_gib"]
    assert f"{alone['peak'] / memory_estimate.GiB:.1f} GiB without cp" in (REPO / "recipes" / "xlam_16k_cp.yaml").read_text()
