"""Evaluate a model on the Berkeley Function-Calling Leaderboard (BFCL v4) single-turn categories, scored exactly as
the official checker scores them (our implementation lives in fcsft/bfcl_checker.py and is tested against it).

    python eval_bfcl.py --model Qwen/Qwen2.5-3B-Instruct --categories all --output-dir runs/bfcl/qwen2.5-3b
    accelerate launch --multi_gpu --num_processes 8 eval_bfcl.py --model ... --output-dir ...  # a slice per process
    python eval_bfcl.py score --result-dir runs/bfcl/qwen2.5-3b                                 # no model loaded
    python eval_bfcl.py compare runs/bfcl/base runs/bfcl/sft --plot cmp.png                      # side by side
    python eval_bfcl.py prompts --model M --categories all --output prompts.jsonl                # what the model sees
    python eval_bfcl.py --model runs/x --output-dir runs/bfcl/x --model-card runs/x/README.md    # scores into the card

Prompts are, by default (`--prompt-format bfcl`), the exact text the official leaderboard harness builds for the
model's family, so the numbers are comparable with the leaderboard's; `--prompt-format chat_template` renders them
with the model's own chat template instead (what train_sft.py trains on and what a server renders for `tools`).

--model may be an adapter folder (adapter_config.json): its base model is loaded with the adapter merged in.

Generation appends BFCL result files (`BFCL_v4_<category>_result.json`, one {"id", "result"} per line) after every
batch; the same command run again generates only the ids still missing. Multi-turn and agentic categories are out
of scope (they need executable environments), so the leaderboard's Overall score is not reported.
"""

import argparse
import sys

from fcsft.bfcl_checker import BFCL_DECODERS
from fcsft.bfcl_generation import PROMPT_FORMATS, run_generation, run_prompts
from fcsft.bfcl_report import run_compare, run_score
from fcsft.errors import exit_on_user_error
from fcsft.model_card import write_bfcl_results


def add_prompt_arguments(parser):
    """What decides the prompt text: shared by generation and the prompts subcommand."""
    parser.add_argument("--model", required=True, help="local path or Hugging Face hub id")
    parser.add_argument("--categories", nargs="+", default=["all"], help="categories or groups: all, non_live, live")
    parser.add_argument("--data-dir", help="BFCL_v4_<category>.json + possible_answer/ (default: bfcl-eval's v4 data)")
    parser.add_argument("--mode", choices=["fc", "prompt"], default="fc",
                        help="fc: the model is told the functions as tools; prompt: BFCL's system prompt lists them "
                             "and asks for Python-style calls")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="bfcl",
                        help="bfcl: the official harness's prompt text for the model's family (leaderboard-comparable; "
                             "falls back to chat_template for a family without one); chat_template: the model's own "
                             "chat template")
    parser.add_argument("--limit", type=int, help="only the first N entries of each category (smoke tests)")
    parser.add_argument("--trust-remote-code", action="store_true")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py score", description="Score existing BFCL result files.")
        parser.add_argument("--result-dir", required=True, help="searched recursively for BFCL_v4_*_result.json")
        parser.add_argument("--output-dir", help="where score files and summaries go (default: --result-dir)")
        parser.add_argument("--data-dir", help="BFCL_v4_*.json + possible_answer/ (default: the run's, else bfcl-eval's)")
        parser.add_argument("--decoder", choices=sorted(BFCL_DECODERS), help="default: the run's, else qwen")
        parser.add_argument("--model-card", help="README.md to write the results into (model-index metadata + table)")
        parser.add_argument("--prompt-format", choices=PROMPT_FORMATS,
                            help="how result files without generation.json were prompted (e.g. bfcl for the official "
                                 "harness's own result files); recorded in the summary so compare can check it")
        args = parser.parse_args(argv[1:])
        summary = run_score(args.result_dir, args.output_dir, args.data_dir, args.decoder, args.prompt_format)
        write_card(args.model_card, summary)
        return
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py compare", description="Compare scored runs side by side.")
        parser.add_argument("dirs", nargs="+", help="output folders holding summary.json")
        parser.add_argument("--plot", help="also draw the error analysis per category, run against run, to this PNG")
        parser.add_argument("--mixed-formats", action="store_true",
                            help="compare runs generated with different prompt formats (refused otherwise)")
        args = parser.parse_args(argv[1:])
        run_compare(args.dirs, args.plot, args.mixed_formats)
        return
    if argv[:1] == ["prompts"]:
        parser = argparse.ArgumentParser(prog="eval_bfcl.py prompts",
                                         description="Write the prompts generation would feed the model (JSONL: id, "
                                                     "category, prompt_format, prompt, num_tokens); loads no weights.")
        add_prompt_arguments(parser)
        parser.add_argument("--output", required=True, help="the JSONL file to write")
        run_prompts(parser.parse_args(argv[1:]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_arguments(parser)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--decoder", choices=sorted(BFCL_DECODERS), help="default: qwen in fc mode, python in prompt mode")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="the longest BFCL answer is ~1,300 characters of tool calls")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results of these categories")
    parser.add_argument("--no-score", action="store_true", help="generate only")
    parser.add_argument("--model-card", help="README.md to write the results into (model-index metadata + table); "
                        "model_card.py writes the rest of the card")
    args = parser.parse_args(argv)
    args.decoder = args.decoder or ("qwen" if args.mode == "fc" else "python")
    data_dir = run_generation(args)  # this process's slice; the main process gets the data folder back
    if data_dir is not None and not args.no_score:
        summary = run_score(args.output_dir, args.output_dir, data_dir, args.decoder)
        write_card(args.model_card, summary)


def write_card(card_path, summary):
    """The scores into a model card's model-index metadata, which the hub shows (model_card.py writes the rest)."""
    if card_path:
        write_bfcl_results(card_path, summary)
        print(f"BFCL results written into {card_path}")


if __name__ == "__main__":
    with exit_on_user_error("eval_bfcl.py"):
        main()
