"""Merge LoRA adapters: one into its base model (a full checkpoint for serving and eval_bfcl.py), or several into one
with PEFT's `add_weighted_adapter` (the plan's "ensemble methods: merge multiple LoRA adapters").

    python merge_adapters.py runs/qwen2.5-3b-xlam-lora --output runs/qwen2.5-3b-xlam-lora-merged
    python merge_adapters.py runs/lora-r16 runs/lora-r16-seed2 --method ties --weights 0.5 0.5 --density 0.5 \\
        --output runs/lora-ties                                  # a merged full checkpoint
    python merge_adapters.py runs/lora-a runs/lora-b --method svd --weights 0.7 0.3 --adapter-only --output runs/lora-ab

Methods, inputs and outputs: fcsft/merging.py.
"""

import argparse
import sys

from fcsft.errors import exit_on_user_error
from fcsft.merging import METHODS, merge


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", help="adapter folders (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--method", choices=METHODS, default="linear", help="how several adapters are combined")
    parser.add_argument("--weights", type=float, nargs="+", help="one per adapter (default: 1 for one, else 1/n each)")
    parser.add_argument("--density", type=float, help="ties / dare_*: share of entries kept, in (0, 1]")
    parser.add_argument("--svd-rank", type=int, help="svd: rank of the result (default: the largest input rank)")
    parser.add_argument("--adapter-only", action="store_true", help="write the combined adapter, not a merged checkpoint")
    parser.add_argument("--base-model", help="default: the adapters' base_model_name_or_path")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="dtype the base is loaded and merged in (auto: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="for the random DARE drops")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the model card
    if args.weights is None:
        args.weights = [1.0 / len(args.adapters)] * len(args.adapters)
    return args


if __name__ == "__main__":
    with exit_on_user_error("merge_adapters.py"):
        args = parse_args()
        output = merge(args)
        print(f"merge_adapters.py: wrote {'an adapter' if args.adapter_only else 'a merged checkpoint'} from "
              f"{len(args.adapters)} adapter(s) to {output}")
