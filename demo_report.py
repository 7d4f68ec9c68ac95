"""The end of `make demo`: what a room can read aloud. A before/after table of the three steps of eval_bfcl.py's error
analysis per held-out category, a picture of it and of the training loss, written into the training run's folder.

    python demo_report.py --run runs/demo_cpu --before runs/demo_eval/before --after runs/demo_eval/after

Writes <run>/before_after.png (eval_bfcl.py compare's plot), <run>/loss_curve.png and <run>/demo_report.md.
"""

import argparse
import json
from pathlib import Path

from fcsft.bfcl_checker import is_relevance_category
from fcsft.bfcl_data import category_order
from fcsft.bfcl_report import OUTCOME_STEPS, load_summaries, plot_comparison, table
from fcsft.errors import UserError, exit_on_user_error

IRRELEVANCE_NOTE = "in irrelevance categories there is no function to call: a decoded call is the mistake"


CALL_KINDS = ["simple", "multiple", "parallel", "parallel_multiple"]


def report_order(categories):
    """Simple to parallel-multiple (demo_simple first), then the (ir)relevance categories."""
    def kind(c):
        suffix = c.split("_", 1)[-1]
        return CALL_KINDS.index(suffix) if suffix in CALL_KINDS else len(CALL_KINDS)
    return sorted(categories, key=lambda c: (is_relevance_category(c), kind(c), category_order(c)))


def step_rates(summary, categories, key):
    """Per category, and over the categories that score calls (weighted by entries), the rate of one step."""
    per_category = {c: summary["categories"][c]["rates"][key] for c in categories}
    scored = [c for c in categories if per_category[c] is not None and not is_relevance_category(c)]
    total = sum(summary["categories"][c]["total"] for c in scored)
    overall = sum(per_category[c] * summary["categories"][c]["total"] for c in scored) / total if total else None
    return per_category, overall


def before_after_table(before, after):
    """Rows of `before -> after` in %, one per category plus one for the categories that call tools."""
    categories = report_order(after["categories"])
    cells = {}
    for key in OUTCOME_STEPS:
        (b, b_all), (a, a_all) = step_rates(before, categories, key), step_rates(after, categories, key)
        cells[key] = {**{c: (b[c], a[c]) for c in categories}, "all calling categories": (b_all, a_all)}

    def arrow(pair):
        return "—" if pair[0] is None else f"{100 * pair[0]:.0f} -> {100 * pair[1]:.0f}"

    counts = {c: str(after["categories"][c]["total"]) for c in categories}
    counts["all calling categories"] = str(sum(int(n) for c, n in counts.items() if not is_relevance_category(c)))
    header = ["category", "questions", "well-formed calls (%)", "right function(s) (%)", "right arguments = BFCL accuracy (%)"]
    label = lambda name: name + (" (a call is the mistake)" if "irrelevance" in name else "")  # noqa: E731
    rows = [[label(name), counts[name], *(arrow(cells[key][name]) for key in OUTCOME_STEPS)] for name in counts]
    return table(header, rows, text_columns=1)


def plot_loss(run_summary, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    logs = [log for log in run_summary["log_history"] if "loss" in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([log["step"] for log in logs], [log["loss"] for log in logs], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title(f"{Path(run_summary.get('output_dir', path.parent)).name}: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="the training output_dir (holds run_summary.json)")
    parser.add_argument("--before", required=True, help="eval_bfcl.py output folder of the untrained model")
    parser.add_argument("--after", required=True, help="eval_bfcl.py output folder of the trained model")
    args = parser.parse_args()

    run_summary_path = args.run / "run_summary.json"
    if not run_summary_path.exists():
        raise UserError(f"{run_summary_path} not found: train first (make demo)")
    run_summary = json.loads(run_summary_path.read_text())
    (before, after), _ = load_summaries([args.before, args.after])

    losses = [log["loss"] for log in run_summary["log_history"] if "loss" in log]
    seconds = next((log["train_runtime"] for log in run_summary["log_history"] if "train_runtime" in log), None)
    trained = f"{run_summary['log_history'][-1].get('step', '?')} steps" + (f" in {seconds:.0f} s" if seconds else "")
    lines = [f"Before and after training ({trained}; logged loss {losses[0]:.2f} -> {losses[-1]:.2f}), on held-out "
             "questions the model never trained on:", ""]
    lines += before_after_table(before, after)
    lines += ["", f"Each step counts only answers that passed the step before; {IRRELEVANCE_NOTE}."]
    report = "\n".join(lines)
    print("\n" + report + "\n")
    (args.run / "demo_report.md").write_text(report + "\n")

    plot_comparison(["before", "after"], [before, after], report_order(after["categories"]),
                    args.run / "before_after.png")
    plot_loss(run_summary, args.run / "loss_curve.png")
    print(f"wrote {args.run / 'demo_report.md'}, {args.run / 'before_after.png'} and {args.run / 'loss_curve.png'}")


if __name__ == "__main__":
    with exit_on_user_error("demo_report.py"):
        main()
