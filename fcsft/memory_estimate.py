"""Per-device training memory for a model config under FSDP2 / DDP, as train_sft.py runs it (TRL 1.16 SFTTrainer,
accelerate 1.15 FSDP2, transformers 5 Qwen2/OPT layers with SDPA). No GPU, no weights: arithmetic on the config.
estimate_memory.py is its command line.
What is counted, per device (bytes of live tensors, i.e. torch.cuda.max_memory_allocated; not the CUDA context):
  parameters    sharded storage. FSDP2 with mixed precision keeps fp32 master copies of trainable parameters
                (accelerate upcasts them); frozen LoRA bases stay in the load dtype; QLoRA bases are 4-bit.
  gradients     one per trainable parameter, in the master dtype, sharded like the parameters. DDP adds its
                gradient buckets (a second copy: accelerate leaves gradient_as_bucket_view off).
  optimizer     AdamW: two states per trainable parameter in the master dtype (8-bit AdamW: 2 bytes).
  activations   tensors autograd saves in forward, counted tensor by tensor from the transformers layer code
                (tests/test_estimate_memory.py checks the counts against saved_tensors_hooks on CPU).
  temporary     buffers that exist at the peak: parameters FSDP has gathered (the decoder layer prefetched for
                backward and the embedding/LM-head group for the whole step; every layer for shard_grad_op), TRL's
                chunked LM-head buffers, its fp32 weight-gradient accumulator and the unsharded LM-head gradient
                (or, if larger, a decoder layer's unsharded gradients), the bool attention mask.
Context parallelism (--cp-size, FSDP2 only): each sequence is split over cp devices, so every per-token activation
and buffer above is divided by cp; the attention mask is dropped (plain causal attention, k/v stay at the kv heads)
and the full sequence's k/v of one layer are all-gathered; parameters stay sharded over the whole world size.
The peak is parameters + optimizer + max(backward start: activations + temporary [+ accumulated gradients],
optimizer step: gradients + one fp32 copy of the largest tensor). Each term is reported so the prediction can be
checked against measured peaks (bench_fsdp.py does, for every row it measures).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from fcsft.errors import UserError

GiB = 2**30

# Real architectures (from their config.json files); bench_fsdp.py writes these to disk to build random-init models.
ARCHITECTURES = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "rms_norm_eps": 1e-06, "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0},
    "qwen2.5-1.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                     "rms_norm_eps": 1e-06, "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0},
    "qwen2.5-3b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 2048, "intermediate_size": 11008,
                   "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                   "rms_norm_eps": 1e-06, "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0},
    "opt-1.3b": {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 2048, "ffn_dim": 8192,
                 "num_hidden_layers": 24, "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2048,
                 "max_position_embeddings": 2048, "do_layer_norm_before": True, "activation_function": "relu",
                 "dropout": 0.1, "attention_dropout": 0.0, "enable_bias": True, "tie_word_embeddings": True},
}
DECODER_LAYER = {"qwen2": "Qwen2DecoderLayer", "opt": "OPTDecoderLayer"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_logprob.py tile: tokens x vocabulary columns


def load_config(name_or_path):
    """A name from ARCHITECTURES, or a model directory / config.json on disk."""
    if name_or_path in ARCHITECTURES:
        return dict(ARCHITECTURES[name_or_path])
    path = Path(name_or_path)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


@dataclass
class Shape:
    family: str
    d: int          # hidden size
    f: int          # MLP inner size
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    positions: int  # learned position embeddings (OPT); 0 for rotary models


def shape_of(config):
    family = config["model_type"]
    if family == "opt":
        return Shape("opt", config["hidden_size"], config["ffn_dim"], config["num_hidden_layers"], config["num_attention_heads"],
                     config["num_attention_heads"], config["vocab_size"], config.get("tie_word_embeddings", True),
                     config["max_position_embeddings"] + 2)  # OPT offsets positions by 2
    if family != "qwen2":
        raise UserError(f"model_type '{family}' is not modelled (qwen2, opt)")
    return Shape("qwen2", config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                 config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]),
                 config["vocab_size"], config.get("tie_word_embeddings", False), 0)


def parameter_counts(s):
    """Parameter counts: per decoder layer (split into linear weights and the rest) and outside the layers."""
    kv = s.d // s.heads * s.kv_heads
    if s.family == "qwen2":
        linear = s.d * s.d + 2 * s.d * kv + s.d * s.d + 3 * s.d * s.f       # q, k, v, o, gate, up, down
        other = s.d + 2 * kv + 2 * s.d                                        # q/k/v biases, two RMSNorms
        final_norm = s.d
    else:
        linear = 4 * s.d * s.d + 2 * s.d * s.f                                # q, k, v, out, fc1, fc2
        other = 4 * s.d + s.f + s.d + 4 * s.d                                 # their biases, two LayerNorms
        final_norm = 2 * s.d
    embedding = s.vocab * s.d
    lm_head = 0 if s.tied else s.vocab * s.d
    return {"layer_linear": linear, "layer_other": other, "embedding": embedding, "positions": s.positions * s.d,
            "final_norm": final_norm, "lm_head": lm_head,
            "total": s.layers * (linear + other) + embedding + s.positions * s.d + final_norm + lm_head}


def lora_parameters(s, r):
    """LoRA A and B on every linear layer of every decoder layer (lora_target_modules: all-linear)."""
    kv = s.d // s.heads * s.kv_heads
    if s.family == "qwen2":
        shapes = [(s.d, s.d), (s.d, kv), (s.d, kv), (s.d, s.d), (s.d, s.f), (s.d, s.f), (s.f, s.d)]
    else:
        shapes = [(s.d, s.d)] * 4 + [(s.d, s.f), (s.f, s.d)]
    return s.layers * sum(r * (i + o) for i, o in shapes)


def flops_per_token(config, attention_span):
    """Training FLOPs per token: 6N + 12*L*d*s (N: parameters that multiply every token, i.e. without the input
    embedding lookup unless it is tied to the LM head; s: the tokens a token attends over)."""
    s = shape_of(config)
    counts = parameter_counts(s)
    n = counts["total"] - counts["positions"] - (0 if s.tied else counts["embedding"])
    return 6 * n + 12 * s.layers * s.d * attention_span


def activation_bytes_per_token_per_layer(s, c, lora_r, attention_mask_span, dropout_mask_bytes=1, gqa_in_sdpa=False):
    """Bytes autograd saves per token in one decoder layer (compute dtype c bytes), counted from the layer code.

    Qwen2 (RMSNorm upcasts to fp32; SDPA saves q, k, v, out and an fp32 logsumexp; with a mask, transformers repeats
    k/v to all heads and SDPA keeps its own float copy of the mask). Full fine-tuning:
      per RMSNorm: fp32 input 4d + cast 2d + normed output c*d (for c=4 the cast is the input itself and the layer
      input is saved too), attention 4*c*d + 4*heads + c*mask_span, MLP 4*c*f (gate, silu, up, product).
    LoRA: frozen linears save nothing; each adapter saves its dropout output and mask and its rank-r activations.
    Dropout masks are bool on CUDA and in the compute dtype on CPU (dropout_mask_bytes).
    """
    kv = s.d // s.heads * s.kv_heads
    mask = c * attention_mask_span
    if s.family == "qwen2":
        k_v = 2 * c * (kv if gqa_in_sdpa else s.d)
        attention = 2 * c * s.d + k_v + 4 * s.heads + mask           # q (after rope), k, v, out, logsumexp, mask
        if not lora_r:
            norm = 4 * s.d + 2 * c * s.d if c == 2 else 3 * 4 * s.d   # fp32 x, cast, normed (fp32: x, x*rsqrt, normed)
            return 2 * norm + attention + 4 * c * s.f + 8
        norm = 4 * s.d                                                 # frozen weight: only the fp32 input of rsqrt
        adapters = (c + dropout_mask_bytes) * (3 * s.d + s.d + 2 * s.d + s.f) + 7 * c * lora_r  # q,k,v,o,gate,up,down inputs after dropout
        return 2 * norm + attention + 3 * c * s.f + adapters + 8       # MLP: gate, silu, up (product only via down's adapter)
    # OPT: LayerNorm saves its input (+ fp32 mean, rstd); dropout(0.1) keeps a bool mask after attention and after
    # fc2; ReLU keeps its output, which fc2 also saves.
    norm = c * s.d
    attention = 4 * c * s.d + 4 * s.heads + mask                      # q, k, v, out (heads == kv heads)
    dropouts = 2 * s.d * dropout_mask_bytes
    if not lora_r:
        return 2 * (norm + c * s.d) + attention + dropouts + c * s.f + 16   # + each LayerNorm's output, ReLU output
    adapters = (c + dropout_mask_bytes) * (3 * s.d + s.d + s.d + s.f) + 6 * c * lora_r
    return 2 * norm + attention + dropouts + c * s.f + adapters + 16


@dataclass
class Setup:
    world_size: int = 8
    strategy: str = "full_shard"         # full_shard | shard_grad_op | ddp | single
    dtype: str = "bfloat16"              # dtype the weights are loaded in (recipe `dtype`)
    mixed_precision: str = "bf16"        # accelerate mixed_precision: bf16 | no
    optim: str = "adamw"                 # adamw | adamw_8bit | sgd
    lora_r: int = 0                      # 0 = full fine-tuning
    qlora: bool = False                  # 4-bit NF4 base (bnb_4bit_quant_storage = bf16), LoRA adapters on top
    activation_checkpointing: bool = False
    batch_size: int = 8                  # rows per device per micro-batch
    seq_len: int = 1024                  # padded batches: padded length; padding-free: mean real row length
    padding_free: bool = False           # all rows of a micro-batch in one row; SDPA masks it block-diagonally
    attention: str = "sdpa"              # sdpa | flash_attention_2 | flex_attention (no mask, k/v stay at the kv heads)
    loss_fraction: float = 1.0           # fraction of positions with a label (assistant-only loss: ~0.1-0.2)
    gradient_accumulation_steps: int = 1
    cp_size: int = 1                     # context parallelism: devices sharing one sequence (FSDP2, sdpa, no packing)
    device: str = "cuda"                 # cuda (Triton LM-head kernels) | cpu (torch fallback; RSS counts touched pages)


def estimate(config, setup):
    """Per-device memory in bytes, by part, and the peak. See the module docstring for what each part holds."""
    s = shape_of(config)
    counts = parameter_counts(s)
    if setup.cp_size > 1:  # what accelerate 1.15 / TRL 1.16 accept (accelerate_configs/fsdp_cp.yaml)
        if setup.strategy not in ("full_shard", "shard_grad_op") or setup.world_size % setup.cp_size:
            raise ValueError(f"cp_size {setup.cp_size} needs FSDP over a world size it divides (got {setup.strategy} "
                             f"over {setup.world_size})")
        if setup.padding_free:
            raise ValueError("context parallelism keeps plain causal attention: no padding-free batches or packing")
        if setup.attention != "sdpa":
            raise ValueError(f"context parallelism runs only sdpa attention, not {setup.attention}")
    shard = setup.world_size if setup.strategy in ("full_shard", "shard_grad_op") else 1
    fsdp = setup.strategy in ("full_shard", "shard_grad_op")
    load = DTYPE_BYTES[setup.dtype]
    c = 2 if setup.mixed_precision in ("bf16", "fp16") else load           # compute dtype
    master = 4 if (fsdp and setup.mixed_precision != "no") else load       # accelerate upcasts trainable params for FSDP2
    lora_r = setup.lora_r or (16 if setup.qlora else 0)

    total = counts["total"]
    layer_params = counts["layer_linear"] + counts["layer_other"]
    tail_params = total - s.layers * layer_params                          # embedding(+positions), final norm, LM head
    if lora_r:
        trainable = lora_parameters(s, lora_r)
        base_linear = s.layers * counts["layer_linear"]
        frozen_bytes = (base_linear * (0.5 + 4 / 64 if setup.qlora else load)   # NF4 + fp32 absmax per 64 weights
                        + (total - base_linear) * load)
        parameters = (frozen_bytes + trainable * master) / shard
    else:
        trainable = total
        parameters = total * master / shard
    gradients = trainable * master / shard * (2 if setup.strategy == "ddp" else 1)
    optimizer = trainable * {"adamw": 2 * master, "adamw_8bit": 2, "sgd": 0}[setup.optim] / shard

    # Activations of one micro-batch
    rows, length = setup.batch_size, setup.seq_len
    tokens = rows * length / setup.cp_size                                  # this device's share of the sequences
    flash = setup.attention in ("flash_attention_2", "flex_attention") or setup.cp_size > 1  # no mask; k/v at kv heads
    mask_span = 0 if flash else (tokens if setup.padding_free else length)  # keys each query's mask row covers
    per_layer = activation_bytes_per_token_per_layer(s, c, lora_r, mask_span, 1 if setup.device == "cuda" else c,
                                                     gqa_in_sdpa=flash)
    head_tokens = tokens * (setup.loss_fraction if setup.device == "cuda" else 1)  # Triton scores only labelled positions
    outside = tokens * (4 * s.d + 2 * c * s.d) + head_tokens * c * s.d      # final norm, LM-head input copy
    if setup.activation_checkpointing:
        one_layer = per_layer * tokens
        activations = s.layers * tokens * c * s.d + one_layer + outside     # layer inputs + one layer recomputed
    else:
        activations = s.layers * per_layer * tokens + outside
    attention_mask = 0 if flash else (tokens * tokens if setup.padding_free else rows * length * length)  # bool, shared

    # Temporary buffers at the peak, which is the LM head's backward (all activations still saved) or, if larger,
    # the last decoder layer's backward (its unsharded gradients and reduce-scatter buffer instead of the head's).
    chunk = min(head_tokens, TRL_TOKEN_CHUNK)
    columns = TRL_VOCAB_CHUNK if setup.device == "cuda" else min(s.vocab, TRL_VOCAB_CHUNK)  # untouched pages are not RSS
    head = chunk * columns * c + head_tokens * s.d * 4                     # logits tile, fp32 hidden gradient
    if setup.device != "cuda":
        head += 4 * chunk * columns * 4                                    # torch fallback: fp32 copies of the tile
    if not lora_r and c != 4:
        head += s.vocab * s.d * 4                                          # fp32 accumulator of the LM-head weight grad
    grad_bytes = c if fsdp else load                                       # FSDP2 computes grads in param_dtype
    tied_grad = 0 if lora_r else s.vocab * s.d * grad_bytes                # LM-head grad, unsharded until backward ends
    layer_grads = 2 * layer_params * c if (fsdp and not lora_r) else 0     # unsharded grads + reduce-scatter buffer
    gathered = 0
    if fsdp:
        layer_unsharded = layer_params * c if not setup.qlora else counts["layer_linear"] * 0.5 + counts["layer_other"] * c
        in_flight = s.layers if setup.strategy == "shard_grad_op" else 1   # the layer prefetched for backward
        gathered = in_flight * layer_unsharded + tail_params * c           # the tail group stays gathered fwd -> bwd
    elif setup.mixed_precision != "no" and load == 4:
        gathered = total * c                                               # autocast's bf16 weight cache (DDP, fp32 load)
    kv = s.d // s.heads * s.kv_heads
    cp_kv = 2 * rows * length * kv * c if setup.cp_size > 1 else 0        # one layer's all-gathered k and v
    temporary = gathered + max(head, layer_grads) + tied_grad + attention_mask + cp_kv

    # Gradient accumulation: the Trainer skips gradient sync between micro-batches (accelerate no_sync); FSDP2 then
    # keeps every trainable gradient unsharded in the compute dtype until the last micro-batch.
    accumulated = 0
    if setup.gradient_accumulation_steps > 1:
        accumulated = trainable * c if fsdp else gradients
    backward_peak = activations + temporary + accumulated
    largest = lora_r * max(s.d, s.f) if lora_r else max(s.vocab * s.d, s.d * s.f)  # biggest trainable tensor
    step_peak = gradients + largest * 4 / shard
    peak = parameters + optimizer + max(backward_peak, step_peak)
    return {
        "parameters": parameters, "gradients": gradients, "optimizer": optimizer, "activations": activations,
        "temporary": temporary, "peak": peak, "peak_phase": "backward" if backward_peak >= step_peak else "optimizer step",
        "total_parameters": total, "trainable_parameters": trainable, "activations_per_token_per_layer": per_layer,
    }
