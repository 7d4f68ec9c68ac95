"""BFCL v4 data and result files: the single-turn and multi-turn categories and their groups, the data files
(BFCL_v4_<category>.json + possible_answer/BFCL_v4_<category>.json, one JSON object per line), and the result files
generation appends to (one {"id", "result"} per line), merged, deduplicated and repaired on restart.
"""

import importlib.util
import json
import logging
import os
from pathlib import Path

from fcsft.bfcl_checker import is_relevance_category
from fcsft.errors import UserError

logger = logging.getLogger(__name__)

NON_LIVE = ["simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
            "irrelevance"]


LIVE = ["live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance"]


MULTI_TURN = ["multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context"]


GROUPS = {"non_live": NON_LIVE, "live": LIVE, "single_turn": NON_LIVE + LIVE, "multi_turn": MULTI_TURN,
          "all": NON_LIVE + LIVE + MULTI_TURN}


OUT_OF_SCOPE = ("web_search", "memory", "format_sensitivity")


SCOPE_NOTE = ("Agentic categories (web search, memory) are out of scope, not run: web search needs a paid search API (SerpAPI) and live web pages, and "
              "memory_vector downloads a sentence-embedding model; the leaderboard's Overall counts them as 0 "
              "(format_sensitivity is not part of the Overall).")


# ---------------------------------------------------------------------------------------------------------------
# Data: BFCL_v4_<category>.json (+ possible_answer/BFCL_v4_<category>.json), one JSON object per line
# ---------------------------------------------------------------------------------------------------------------


def package_data_dir():
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None:
        raise UserError("bfcl-eval is not installed (`make setup` installs it), so pass --data-dir with BFCL_v4_*.json files")
    return Path(spec.submodule_search_locations[0]) / "data"


def category_order(category):
    known = NON_LIVE + LIVE + MULTI_TURN
    return (known.index(category) if category in known else len(known), category)


def is_multi_turn(category):
    return category in MULTI_TURN


def categories_in(data_dir):
    """The categories of data_dir's BFCL_v4_<category>.json files that eval_bfcl.py runs: single-turn ones and the
    four multi-turn ones (those need multi_turn_func_doc/ beside them)."""
    names = [p.name[len("BFCL_v4_"):-len(".json")] for p in Path(data_dir).glob("BFCL_v4_*.json")]
    return sorted((n for n in names if not n.startswith(OUT_OF_SCOPE + ("multi_turn",)) or is_multi_turn(n)),
                  key=category_order)


def resolve_categories(requested, data_dir, multi_turn=True):
    """Category names and groups -> categories present in data_dir. "all" is every file there that is run: for the
    bfcl-eval data, single-turn and multi-turn. multi_turn=False: single-turn only (multi-turn names refused)."""
    available = [c for c in categories_in(data_dir) if multi_turn or not is_multi_turn(c)]
    chosen = []
    for name in (n for item in requested for n in item.split(",") if n):
        if name.startswith(OUT_OF_SCOPE):
            raise UserError(f"{name}: agentic categories are out of scope for eval_bfcl.py. {SCOPE_NOTE}")
        if not multi_turn and (name == "multi_turn" or is_multi_turn(name)):
            raise UserError(f"{name}: multi-turn categories are run by eval_bfcl.py only, not here")
        if name == "all":
            members = available
        elif name in GROUPS:
            members = [c for c in GROUPS[name] if c in available]
        elif name in available:
            members = [name]
        else:
            raise UserError(f"unknown category {name!r}: {data_dir} has {', '.join(available) or 'no BFCL_v4_*.json files'}")
        chosen += [c for c in members if c not in chosen]
    if not chosen:
        raise UserError(f"no categories selected from {data_dir}")
    return chosen


def read_jsonl(path):
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err})")
    return rows


def load_category(data_dir, category):
    """(entries, answers); answers are None for (ir)relevance categories, else aligned with entries by position,
    as the official eval_runner aligns them."""
    path = Path(data_dir) / f"BFCL_v4_{category}.json"
    entries = read_jsonl(path)
    for number, entry in enumerate(entries, 1):
        missing = [k for k in ("id", "question", "function") if k not in entry]
        if missing:
            raise UserError(f"{path}:{number}: entry without {', '.join(missing)}")
    if is_relevance_category(category):
        return entries, None
    answer_path = Path(data_dir) / "possible_answer" / f"BFCL_v4_{category}.json"
    if not answer_path.exists():
        raise UserError(f"{answer_path}: missing (every non-relevance category needs its possible answers)")
    answers = read_jsonl(answer_path)
    if len(answers) != len(entries):
        raise UserError(f"{answer_path}: {len(answers)} answers for {len(entries)} entries in {path}")
    for number, answer in enumerate(answers, 1):
        if not isinstance(answer.get("ground_truth"), list):
            raise UserError(f"{answer_path}:{number}: no ground_truth list")
    return entries, answers


def load_datasets(data_dir, requested_categories, limit=None, multi_turn=False):
    """(data dir, categories, {category: (entries, answers)}), the first `limit` entries of each category.
    multi_turn=True: `categories` includes the multi-turn ones requested, which `datasets` leaves out (they are loaded
    by bfcl_multi_turn.load_multi_turn_category)."""
    data_dir = Path(data_dir) if data_dir else package_data_dir()
    categories = resolve_categories(requested_categories, data_dir, multi_turn)
    datasets = {c: load_category(data_dir, c) for c in categories if not is_multi_turn(c)}
    if limit:
        datasets = {c: (e[:limit], a and a[:limit]) for c, (e, a) in datasets.items()}
    return data_dir, categories, datasets


# ---------------------------------------------------------------------------------------------------------------
# Result files: append as batches finish; on restart merge, dedupe and drop a truncated last line
# ---------------------------------------------------------------------------------------------------------------


def result_path(output_dir, category):
    return Path(output_dir) / f"BFCL_v4_{category}_result.json"


def rank_result_path(output_dir, category, rank):
    return Path(output_dir) / f"BFCL_v4_{category}_result.rank{rank}.jsonl"


def read_results(path):
    """id -> raw result. The first line for an id wins; a truncated last line (a killed run) is ignored."""
    results = {}
    lines = Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning(f"{path}:{number}: ignoring a truncated last line")
                continue
            raise UserError(f"{path}:{number}: not valid JSON")
        if not isinstance(row, dict) or "id" not in row or "result" not in row:
            raise UserError(f"{path}:{number}: expected an object with `id` and `result`")
        results.setdefault(row["id"], row["result"])
    return results


def write_jsonl_atomic(path, rows):
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")  # ASCII: one line per row
    os.replace(tmp, path)


def append_jsonl(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()


def consolidate_results(output_dir, category, entries):
    """Merge the result file with per-rank partial files of an earlier multi-process run into one file in dataset
    order, without duplicates. Returns the set of ids already done."""
    path = result_path(output_dir, category)
    partials = sorted(Path(output_dir).glob(f"BFCL_v4_{category}_result.rank*.jsonl"))
    sources = ([path] if path.exists() else []) + partials
    merged = {}
    for source in sources:
        for id_, result in read_results(source).items():
            merged.setdefault(id_, result)
    if merged or path.exists():
        order = {entry["id"]: i for i, entry in enumerate(entries)}
        ids = sorted(merged, key=lambda i: (order.get(i, len(order)), str(i)))
        write_jsonl_atomic(path, [{"id": i, "result": merged[i]} for i in ids])
    for partial in partials:
        partial.unlink()
    return set(merged)


def find_result_files(result_dir):
    files = {}
    for path in sorted(Path(result_dir).rglob("BFCL_v4_*_result.json")):
        category = path.name[len("BFCL_v4_"):-len("_result.json")]
        if category in files:
            raise UserError(f"two result files for {category}: {files[category]} and {path}; "
                     "point --result-dir at one model's folder")
        files[category] = path
    return files
