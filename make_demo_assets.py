"""Build the offline default: xLAM-schema sample data, a BFCL-format held-out split, a tiny tokenizer and a tiny
Qwen2-architecture model with random weights. Deterministic: the same seed gives byte-identical files.

    python make_demo_assets.py --out demo_assets

Writes
    demo_assets/xlam_sample/train.jsonl      rows {id, query, tools, answers} exactly as Salesforce/xlam-function-calling-60k
    demo_assets/bfcl_heldout/BFCL_v4_demo_<category>.json (+ possible_answer/)  questions the model never trains on
    demo_assets/tiny-qwen2/                  Qwen2ForCausalLM + tokenizer with Qwen2.5's real chat template (from TRL)
    demo_assets/dolly_sample/train.jsonl     rows {instruction, context, response, category} as databricks/databricks-dolly-15k
    demo_assets/tiny-opt/                    OPTForCausalLM + a byte-level BPE tokenizer that, like OPT's, prepends </s>
"""

import argparse
from pathlib import Path

from fcsft.demo_assets import build_demo_assets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_assets", type=Path)
    parser.add_argument("--seed", default=0, type=int, help="training rows, tokenizer and model weights (make demo DEMO_SEED=N)")
    parser.add_argument("--heldout-seed", default=0, type=int, help="the held-out BFCL questions (fixed across DEMO_SEED)")
    parser.add_argument("--n-train", default=2800, type=int, help="xLAM-schema training rows (make demo: one epoch)")
    parser.add_argument("--n-heldout", default=10, type=int, help="held-out BFCL entries per category")
    parser.add_argument("--vocab-size", default=2048, type=int)
    parser.add_argument("--num-layers", default=2, type=int, help="decoder layers of the tiny Qwen2 model")
    parser.add_argument("--hidden-size", default=256, type=int)
    parser.add_argument("--n-dolly", default=48, type=int, help="Dolly-15k-format rows for the tiny OPT recipe test")
    args = parser.parse_args()
    build_demo_assets(args.out, args.seed, args.n_train, args.n_heldout, args.vocab_size, args.num_layers,
                      args.hidden_size, args.n_dolly, args.heldout_seed)


if __name__ == "__main__":
    main()
