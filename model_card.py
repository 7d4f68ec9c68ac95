"""The model card of a finished model, its BFCL scores as hub metadata, and its push to the Hugging Face Hub.

    python model_card.py runs/qwen2.5-3b-xlam --bfcl runs/bfcl/qwen2.5-3b-xlam
    python model_card.py runs/qwen2.5-3b-xlam --bfcl runs/bfcl/qwen2.5-3b-xlam --push your-name/qwen2.5-3b-xlam-fc
    python eval_bfcl.py --model runs/qwen2.5-3b-xlam --categories all --output-dir runs/bfcl/qwen2.5-3b-xlam \\
        --model-card runs/qwen2.5-3b-xlam/README.md              # the scores go straight into the card

For a folder train_sft.py wrote (it holds run_summary.json), README.md is written from the run: base model, data
with row counts, recipe and overrides, hardware, train time, device-hours and cost, losses, and the BFCL results.
For any other folder (a merged checkpoint from merge_adapters.py) the card already there is kept and the BFCL results
are added. The BFCL summary goes into the card's `model-index` metadata too, so the hub shows the scores: every
aggregate and category that was run in full (a `--limit` run stays in the table only).

--push uses the project's hub code (fcsft/hub.py): the token comes from HF_TOKEN only and is never
printed; the token and the hub are checked before anything is uploaded; the card and model are written locally
first, and a failed upload names the folder (kept) and the command that uploads it later.
"""

import argparse
import json
from pathlib import Path

from fcsft.errors import UserError, exit_on_user_error
from fcsft.metrics import DEFAULT_PRICE_PER_GPU_HOUR
from fcsft.model_card import push, run_card, write_bfcl_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the model folder: train_sft.py's output_dir, or merge_adapters.py's --output")
    parser.add_argument("--bfcl", help="eval_bfcl.py's --output-dir for this model (its summary.json); a card rewritten "
                        "from run_summary.json without it has no BFCL results")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR,
                        help="for the cost line (default: the plan's $23/hour for 8 GPUs)")
    parser.add_argument("--push", metavar="REPO_ID", help="push the folder to this hub repository (token: HF_TOKEN)")
    parser.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    card_path = folder / "README.md"
    summary_path = folder / "run_summary.json"
    if summary_path.is_file():
        card_path.write_text(run_card(folder, json.loads(summary_path.read_text()), args.price_per_gpu_hour))
    elif not card_path.is_file():
        raise UserError(f"{folder} has neither run_summary.json (train_sft.py writes it) nor a README.md card")
    elif "It has been trained using [TRL]" in card_path.read_text():  # TRL's generic card, which says nothing of the run
        raise UserError(f"{folder} has no run_summary.json (train_sft.py writes it at the end of training: was the run "
                        f"interrupted?), so the card cannot be written; {card_path} is TRL's generic card, left as is")
    if args.bfcl:
        bfcl_summary = Path(args.bfcl) / "summary.json"
        if not bfcl_summary.is_file():
            raise UserError(f"{bfcl_summary} not found: score the model with eval_bfcl.py first")
        write_bfcl_results(card_path, json.loads(bfcl_summary.read_text()), model_name=args.push or folder.name)
    print(f"model_card.py: wrote {card_path}")
    if args.push:
        problem = push(folder, args.push, args.revision, private=not args.public)
        if problem:
            raise UserError(problem)


if __name__ == "__main__":
    with exit_on_user_error("model_card.py"):
        main()
