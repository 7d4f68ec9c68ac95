"""The breakdown of saved torch.profiler traces (what `profile_steps` in a recipe records), by rank.

    python step_profile.py runs/qwen2.5-3b-xlam/profile/rank*.pt.trace.json

What the shares mean: fcsft/step_profile.py.
"""

import argparse
import sys
from pathlib import Path

from fcsft.step_profile import format_breakdown, trace_breakdown


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", type=Path, help="Chrome trace files (*.pt.trace.json), one per rank")
    args = parser.parse_args()
    missing = [str(p) for p in args.traces if not p.is_file()]
    if missing:
        sys.exit(f"step_profile.py: trace file not found: {', '.join(missing)}")
    print(format_breakdown([trace_breakdown(p) for p in args.traces]))


if __name__ == "__main__":
    main()
