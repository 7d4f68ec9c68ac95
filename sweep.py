"""The project plan's study, runnable: a grid of training runs, each scored on BFCL, in one results table.

    python sweep.py sweeps/phase3_hyperparameters.yaml            # run a sweep, or continue an interrupted one
    python sweep.py sweeps/phase3_hyperparameters.yaml --dry-run  # validate it and print every command
    python sweep.py sweeps/phase3_hyperparameters.yaml --point learning_rate=1e-05   # one point (another node)
    python sweep.py sweeps/phase3_hyperparameters.yaml --wandb-sweep > wandb_sweep.yaml  # the same grid for W&B
    python sweep.py report runs/sweeps/phase1 runs/sweeps/phase3 --output runs/report    # one table for any runs

A sweep file (YAML):

    recipe: recipes/xlam.yaml                           # the base recipe
    accelerate_config: accelerate_configs/fsdp_full.yaml
    accelerate_flags: {num_processes: 8}                # optional `accelerate launch --key value` flags
    output_dir: runs/sweeps/phase3                      # default: runs/sweeps/<sweep file name>
    overrides: {num_train_epochs: 1}                    # recipe keys set on every trained point
    grid:                                               # every combination of the axes; or `one_at_a_time:` (each
      learning_rate: [1.0e-5, 2.0e-5]                   # axis varied alone around the recipe), or `points:` (a list)
      precision:                                        # an axis of named bundles of settings
        bf16: {bf16: true, dtype: bfloat16, accelerate_flags: {mixed_precision: bf16}}
        fp32: {bf16: false, dtype: float32, accelerate_flags: {mixed_precision: "no"}}
    baseline: true                                      # also score the base model, untrained: a point like any other;
                                                        # or the folder of a baseline another sweep scored
    bfcl:
      categories: [all]                                 # eval_bfcl.py --categories
      args: [--batch-size, "32"]                        # more eval_bfcl.py flags
      launcher: accelerate launch --multi_gpu --num_processes 8   # default: python
      score_trained: true                               # false: trained points measure speed and memory only

Each point runs, in its own folder OUTPUT/<point>/, the real commands
`accelerate launch --config_file CONFIG train_sft.py RECIPE --output_dir OUTPUT/<point>/train --key value ...` and
`eval_bfcl.py --model OUTPUT/<point>/train --output-dir OUTPUT/<point>/bfcl ...`, logs to train.log / eval.log and
records its status in point.json; the results table (results.md, results.csv, PNG plots) is rewritten after every
point. A failed point is recorded with its error and the sweep goes on. Started again, a sweep skips finished points,
retries failed or interrupted ones (a training run resumes from its last complete checkpoint), and refuses a folder
that holds another sweep (other recipe, grid, configs or BFCL settings) or anything else.
"""

import argparse
import sys
from pathlib import Path

from fcsft.errors import exit_on_user_error
from fcsft.metrics import DEFAULT_PRICE_PER_GPU_HOUR
from fcsft.study_report import expand_run_dirs, write_report
from fcsft.sweeps import load_sweep, run_sweep, wandb_sweep_config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        parser = argparse.ArgumentParser(prog="sweep.py report", description="One results table for any set of run folders.")
        parser.add_argument("run_dirs", nargs="+", help="sweep folders (all their points), point folders, train_sft.py "
                            "output dirs or eval_bfcl.py output dirs")
        parser.add_argument("--output", type=Path, default=Path("runs/report"), help="where results.md/.csv and plots go")
        parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR,
                            help="default: the plan's $23 per hour for 8 GPUs = $2.875")
        parser.add_argument("--peak-tflops", type=float, help="peak per device for MFU (default: datasheet bf16 for known "
                            "GPUs; CPU: a 1-thread fp32 matmul measured now)")
        parser.add_argument("--baseline", help="the untrained run to count points from (default: the only baseline, "
                            "or the one of the same model)")
        parser.add_argument("--mixed-formats", action="store_true",
                            help="put runs scored with different BFCL prompt formats in one table (refused otherwise)")
        args = parser.parse_args(argv[1:])
        rows = write_report(expand_run_dirs(args.run_dirs), args.output, args.price_per_gpu_hour, args.peak_tflops,
                            args.baseline, title=f"Runs ({len(args.run_dirs)} folder(s))", mixed_formats=args.mixed_formats)
        print((args.output / "results.md").read_text())
        print(f"wrote {args.output}/results.md, results.csv and plots for {len(rows)} run(s)")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file")
    parser.add_argument("--dry-run", action="store_true", help="validate, print every point's commands, run nothing")
    parser.add_argument("--point", action="append", help="run only this point (repeatable): for several nodes or a W&B agent")
    parser.add_argument("--output-dir", help="the sweep folder (default: the file's output_dir)")
    parser.add_argument("--wandb-sweep", action="store_true", help="print a W&B sweep config over this sweep's points")
    parser.add_argument("--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR)
    parser.add_argument("--peak-tflops", type=float, help="peak per device for MFU in the table")
    parser.add_argument("--progress-seconds", type=float, default=20.0, help="how often the current log line is shown")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep_file, args.output_dir)
    if args.wandb_sweep:
        print(wandb_sweep_config(sweep), end="")
        return 0
    return run_sweep(sweep, args)


if __name__ == "__main__":
    with exit_on_user_error("sweep.py"):
        sys.exit(main())
