"""Per-device training memory for a model config under FSDP2 / DDP, as train_sft.py runs it (TRL 1.16 SFTTrainer,
accelerate 1.15 FSDP2, transformers 5 Qwen2/OPT layers with SDPA). No GPU, no weights: arithmetic on the config.

    python estimate_memory.py --model qwen2.5-3b --world-size 8 --strategy full_shard --batch-size 16 --seq-len 1024
    python estimate_memory.py --model demo_assets/tiny-qwen2 --world-size 2 --dtype float32 --mixed-precision no --device cpu
    python estimate_memory.py --model qwen2.5-3b --world-size 1 --strategy single --qlora --lora-r 16 --gpu-gb 24
    python estimate_memory.py --model qwen2.5-3b --world-size 8 --batch-size 1 --seq-len 16384 --cp-size 2   # 16K, cp

What is counted, and how: fcsft/memory_estimate.py.
"""

import argparse
import json
from dataclasses import asdict

from fcsft.errors import exit_on_user_error
from fcsft.memory_estimate import ARCHITECTURES, GiB, Setup, estimate, load_config
from fcsft.metrics import GPUS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-3b", help=f"one of {list(ARCHITECTURES)} or a model dir / config.json")
    defaults = Setup()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--gpu-gb", type=float, default=None, help="usable GiB on the device (default: H100's 79.1)")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()

    setup = Setup(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        result = estimate(load_config(args.model), setup)
    except ValueError as err:
        parser.error(str(err))
    capacity = args.gpu_gb or GPUS[args.gpu]["usable_gib"]
    # The caching allocator reserves more than it hands out; 10% is typical for steady training steps.
    result["fits"] = result["peak"] * 1.10 / GiB <= capacity
    if args.json:
        print(json.dumps({"model": args.model, **asdict(setup), **result, "device_gib": capacity}, indent=1))
        return
    where = f"{setup.batch_size} x {setup.seq_len} tokens per device" if setup.cp_size == 1 else \
        f"{setup.batch_size} x {setup.seq_len} tokens per {setup.cp_size} devices (context parallel)"
    print(f"{args.model}: {result['total_parameters'] / 1e9:.3f}B parameters, {result['trainable_parameters'] / 1e6:.1f}M trainable; "
          f"{setup.strategy} over {setup.world_size}, {where}")
    for part in ("parameters", "gradients", "optimizer", "activations", "temporary"):
        print(f"  {part:<12} {result[part] / GiB:8.2f} GiB")
    print(f"  {'peak':<12} {result['peak'] / GiB:8.2f} GiB  (in the {result['peak_phase']})")
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(f"  {verdict} in {capacity:g} GiB (peak + 10% allocator slack)")


if __name__ == "__main__":
    with exit_on_user_error("estimate_memory.py"):
        main()
