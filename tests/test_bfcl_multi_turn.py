"""BFCL v4 multi-turn (fcsft/bfcl_multi_turn.py) against the official bfcl-eval code, which is the oracle here:
- loading: our prepared entries equal the official load_dataset_entry's, for all 800 entries;
- execution: every ground-truth call sequence of the 800 entries, and model-style calls with odd inputs, give the
  official execute_multi_turn_func_call's results (the official eval()s them; in these tests that is trusted text);
- checking: a corpus of result files built from the ground truth and perturbations of it (all 800 entries) gets the
  official verdict from our checker;
- the loop: the official QwenFCHandler.inference_multi_turn_prompting, driven by a scripted model (its server client
  replaced, no model loaded), and our batched loop fed the same outputs send identical prompts and token budgets at
  every step and record identical results;
- aggregates: the leaderboard's Overall on hand-computed numbers and with the official helper functions.
CPU only, offline.
"""

import ast
import contextlib
import copy
import importlib
import inspect
import io
import itertools
import json
import math
import re
import types
from collections import Counter

import pytest

from bfcl_reference import load_official_bfcl
from fcsft import bfcl_multi_turn as mt
from fcsft.bfcl_data import read_results
from fcsft.errors import UserError

bfcl_eval = pytest.importorskip("bfcl_eval", reason="bfcl-eval is installed by `make setup`")
# The official execution eval()s odd call texts such as `5()`, on which Python warns; ours only parses them, quietly.
pytestmark = pytest.mark.filterwarnings("ignore::SyntaxWarning")


# ---------------------------------------------------------------------------------------------------------------
# The official pieces, imported once
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official modules. load_official_bfcl stubs what the handlers import but multi-turn never calls."""
    load_official_bfcl(tmp_path_factory.mktemp("bfcl_project_root"))
    module = importlib.import_module
    return types.SimpleNamespace(
        utils=module("bfcl_eval.utils"),
        execution=module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils"),
        eval_runner=module("bfcl_eval.eval_checker.eval_runner"),
        helper=module("bfcl_eval.eval_checker.eval_runner_helper"),
        qwen_fc=module("bfcl_eval.model_handler.local_inference.qwen_fc"),
        prompts=module("bfcl_eval.constants.default_prompts"),
        backend=module("bfcl_eval.constants.executable_backend_config"),
    )


@pytest.fixture(scope="module")
def data():
    """category -> (our prepared entries, answers)."""
    return {category: mt.load_multi_turn_category(category) for category in mt.MULTI_TURN_CATEGORIES}


def forget_official_instances(official, model_tag):
    """The official execution keeps environment instances in its module globals, keyed by model and entry, and
    reuses them on the next call: drop them so that every official run starts fresh (and memory stays bounded)."""
    names, prefix = vars(official.execution), re.sub(r"[-./:]", "_", model_tag)  # as the official names them
    for name in [n for n in names if n.startswith(prefix)]:
        del names[name]


def all_entries(data):
    return [(entry, answer) for entries, answers in data.values() for entry, answer in zip(entries, answers)]


# ---------------------------------------------------------------------------------------------------------------
# Loading and constants
# ---------------------------------------------------------------------------------------------------------------


def test_entries_and_tool_lists_are_the_official_ones(official, data):
    """Tool lists (every involved class's docs, held-out functions removed, language hint on the rest only) and the
    held-out docs, for all 800 entries, equal what the official load_dataset_entry builds."""
    for category, (entries, answers) in data.items():
        expected = official.utils.load_dataset_entry(category)
        assert len(entries) == len(expected) == len(answers) == 200
        assert entries == expected, category
    miss_func = data["multi_turn_miss_func"][0]
    assert all(entry["missed_function"] for entry in miss_func)
    held_out = [doc for entry in miss_func for docs in entry["missed_function"].values() for doc in docs]
    assert held_out and not any("Python 3 syntax" in doc["description"] for doc in held_out)


def test_constants_are_the_official_ones(official):
    assert mt.MAXIMUM_STEP_LIMIT == official.prompts.MAXIMUM_STEP_LIMIT
    assert mt.HELD_OUT_FUNCTIONS_MESSAGE == official.prompts.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_PROMPTING
    for name, module in mt.ENVIRONMENT_MODULES.items():
        assert official.backend.CLASS_FILE_PATH_MAPPING[name] == f"{mt.ENVIRONMENT_PACKAGE}.{module}"
        assert official.backend.MULTI_TURN_FUNC_DOC_FILE_MAPPING[name] == mt.FUNCTION_DOC_FILES[name]
    assert list(mt.STATELESS_CLASSES) == official.backend.STATELESS_CLASSES
    assert mt.TOOL_CALL_PATTERN.pattern in inspect.getsource(official.qwen_fc.QwenFCHandler._extract_tool_calls)
    source = inspect.getsource(official.execution)
    assert str(list(mt.BLOCKED_FUNCTION_NAMES)).replace("'", '"') in source
    assert mt.METHOD_NAME_PATTERN.pattern in source


def test_unknown_category_and_bad_model_name_raise(data):
    with pytest.raises(UserError, match="not a multi-turn category"):
        mt.load_multi_turn_category("simple_python")
    entry = data["multi_turn_base"][0][0]
    with pytest.raises(UserError, match="not a Python name"):
        mt.EntryEnvironment(entry, "my model")


# ---------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------


def assert_same_execution(official, entry, turns, model_tag):
    """Execute `turns` (lists of call texts) on fresh instances of one entry, ours and the official's, and require
    the same result texts and the same public state after every turn (compared at once: later calls mutate it)."""
    ours = mt.EntryEnvironment(entry, model_tag)
    try:
        for number, calls in enumerate(turns):
            results, instances = official.execution.execute_multi_turn_func_call(
                calls, entry["initial_config"], entry["involved_classes"], model_tag, entry["id"],
                long_context="long_context" in entry["id"])
            assert ours.execute(calls) == results, f"{entry['id']} turn {number}"
            state = {name: {k: v for k, v in vars(instance).items() if not k.startswith("_")}
                     for name, instance in instances.items()}
            assert ours.public_state() == state, f"{entry['id']} turn {number}"
    finally:
        forget_official_instances(official, model_tag)


def test_ground_truth_execution_is_the_official_one(official, data):
    """Every ground-truth call sequence of the 800 entries (4,625 calls, 160 with positional arguments): the same
    result texts and the same public state after every turn as the official eval()-based execution."""
    calls = positional = 0
    for entry, answer in all_entries(data):
        turns = answer["ground_truth"]
        assert_same_execution(official, entry, turns, "gt")
        calls += sum(map(len, turns))
        positional += sum(bool(ast.parse(c, mode="eval").body.args) for turn in turns for c in turn)
    assert (calls, positional) == (4625, 160)


# Model-style call texts (decode_execute's form) with the inputs where eval() semantics show: unknown and blocked
# names, wrong or missing arguments, numbers as names, leading spaces, NaN/Infinity arguments, keys that are not
# Python names, Python keywords, and method-call text inside string arguments (which the official rewrites).
ODD_CALLS = [
    "not_a_function(x=1)", "kill(pid=1)", "exit()", "run(cmd='ls')", "os.remove(path='x')", "5()", "1.5(a=1)",
    "None()", "True()", " ls(a=True)", "ls(a=True,extra=1)", "cd()", "cd(folder=nan)", "cd(folder=[1, -inf])",
    "cd(folder name='x')", "cd(class='x')", "cd(True=1)", "cd(folder='a',folder='b')", "cd(folder=",
    "echo(content='then ls(a) and cd (b)')", "echo(content='\\nls(x)')", "mkdir(dir_name='ls(x)')",
    "touch(file_name='notes.txt')", "echo(content='mean(1) sort (2)',file_name='notes.txt')",
    "cat(file_name='notes.txt')",
    "ls(a=True)", "mean(numbers=[1, 2, 3.5])", "mean(numbers=[])", "logarithm(value=8,base=2,precision=5)",
    "cd(folder='x')\x00", "ls()(a=1)", "cd(folder=1+2)", "functions.ls(a=True)", "GorillaFileSystem.ls()",
    "'abc'.upper()", "ls.x()", "cd.__class__()",
]


def test_model_style_calls_execute_as_officially(official, data):
    """Call texts as decode_execute writes them, including odd ones, on every environment class: same results and
    states as the official execution, except where the official would run Python code (a callee or argument that is
    more than a method and literals): there we refuse it."""
    entries = {}
    for entry, _ in all_entries(data):
        entries.setdefault(tuple(entry["involved_classes"]), entry)
    assert {name for classes in entries for name in classes} == set(mt.ENVIRONMENT_MODULES)
    official_tag = "Qwen_Qwen3_8B"  # what the official inference uses for model Qwen/Qwen3-8B
    assert mt.inference_model_tag("Qwen/Qwen3-8B") == official_tag
    refused = {"ls()(a=1)", "cd(folder=1+2)"}
    for entry in entries.values():
        method = next(name for name, _ in inspect.getmembers(
            mt._environment_class(entry["involved_classes"][0])(), inspect.ismethod) if not name.startswith("_"))
        calls = [c for c in ODD_CALLS if c not in refused] + [f"{method}(x=1)", f"{method}()"]
        assert_same_execution(official, entry, [calls[:12], calls[12:]], official_tag)
        results = mt.EntryEnvironment(entry, official_tag).execute(sorted(refused))
        assert all(r.startswith("Error during execution: ") for r in results)
    mangled = mt.EntryEnvironment(entries[("GorillaFileSystem",)], official_tag).execute(["echo(content='then ls(a)')"])
    assert "Qwen_Qwen3_8B_" in mangled[0] and "_GorillaFileSystem_instance.ls(a)" in mangled[0]


# ---------------------------------------------------------------------------------------------------------------
# Result corpus: the ground truth as Qwen tool-call outputs, and perturbations of it
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def method_parameters():
    """method name -> its parameter names, from the official environment classes (to name positional arguments)."""
    parameters = {}
    for class_name in mt.ENVIRONMENT_MODULES:
        instance = mt._environment_class(class_name)()
        for name, method in inspect.getmembers(instance, inspect.ismethod):
            if not name.startswith("_"):
                parameters[name] = list(inspect.signature(method).parameters)
    return parameters


def as_json_call(call_string, method_parameters):
    """`sort('a.pdf')` -> {"name": "sort", "arguments": {"file_name": "a.pdf"}}: what a model would write."""
    node = ast.parse(call_string, mode="eval").body
    arguments = dict(zip(method_parameters[node.func.id], (ast.literal_eval(a) for a in node.args)))
    arguments.update({k.arg: ast.literal_eval(k.value) for k in node.keywords})
    return {"name": node.func.id, "arguments": arguments}


def tool_calls_text(calls):
    return "\n".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in calls)


def one_call_per_step(turn_calls, closing="Done."):
    return [[tool_calls_text([c]) for c in calls] + [closing] for calls in turn_calls]


def first_turn_with(turn_calls, minimum, index):
    """The index of a turn with at least `minimum` calls, chosen by `index` among them; None if there is none."""
    candidates = [t for t, calls in enumerate(turn_calls) if len(calls) >= minimum]
    return candidates[index % len(candidates)] if candidates else None


def changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    return {"x": 1}


def _with_calls(turn_calls, index, edit, minimum=1):
    """One call per step after `edit(calls, t)` on a copy, t a turn with at least `minimum` calls; None if none."""
    t = first_turn_with(turn_calls, minimum, index)
    if t is None:
        return None
    calls = copy.deepcopy(turn_calls)
    edit(calls, t)
    return one_call_per_step(calls)


def _with_steps(turn_calls, index, edit):
    """The ground truth one call per step, then `edit(steps, t)`, t a turn with a call; None if none."""
    t = first_turn_with(turn_calls, 1, index)
    if t is None:
        return None
    steps = one_call_per_step(turn_calls)
    edit(steps, t)
    return steps


def _wrong_value(calls, t):
    call = calls[t][-1]
    for key in sorted(call["arguments"])[:1]:
        call["arguments"][key] = changed_value(call["arguments"][key])


def _early_turn(turn_calls, entry, index):
    """A turn whose first call can be made one turn early: a held-out function's turn if any, else a later turn."""
    holdout = [int(t) for t in entry.get("missed_function", {}) if turn_calls[int(t)]]
    later = [t for t in range(1, len(turn_calls)) if turn_calls[t]]
    return holdout[0] if holdout else (later[index % len(later)] if later else None)


def _called_early(turn_calls, entry, index, keep_in_its_turn):
    t = _early_turn(turn_calls, entry, index)
    if t is None:
        return None
    calls = copy.deepcopy(turn_calls)
    calls[t - 1].append(copy.deepcopy(calls[t][0]) if keep_in_its_turn else calls[t].pop(0))
    return one_call_per_step(calls)


def _calls_where_none_expected(turn_calls):
    empty = [t for t, calls in enumerate(turn_calls[:-1]) if not calls]
    if not empty:
        return None
    steps = one_call_per_step(turn_calls)
    steps[empty[0]] = [tool_calls_text([c]) for c in turn_calls[empty[0] + 1]] + ["Done."]
    return steps


def _odd_arguments(turn_calls, entry):
    """A step of calls whose execution errors (a key that is not a Python name, NaN) or whose string argument the
    official rewrites (`ls(` inside echo's content), before the ground truth."""
    first = next((c for calls in turn_calls for c in calls), {"name": "ls", "arguments": {}})
    odd = [{"name": first["name"], "arguments": {"bad key": 1}}, {"name": "cd", "arguments": {"folder": float("nan")}}]
    if "GorillaFileSystem" in entry["involved_classes"]:
        odd.append({"name": "echo", "arguments": {"content": "ls(a) mkdir (b)", "file_name": "notes.txt"}})
    steps = one_call_per_step(turn_calls)
    steps[0].insert(0, tool_calls_text(odd))
    return steps


PERTURBATIONS = {
    "call dropped": lambda tc, e, i: _with_calls(tc, i, lambda calls, t: calls[t].pop()),
    "wrong argument value": lambda tc, e, i: _with_calls(tc, i, _wrong_value),
    "duplicated call": lambda tc, e, i: _with_calls(tc, i, lambda calls, t: calls[t].append(calls[t][0])),
    "duplicate in one step": lambda tc, e, i: _with_steps(
        tc, i, lambda steps, t: steps[t].insert(-1, tool_calls_text([tc[t][0], tc[t][0]]))),
    "swapped order": lambda tc, e, i: _with_calls(tc, i, lambda calls, t: calls[t].reverse(), minimum=2),
    "called a turn early": lambda tc, e, i: _called_early(tc, e, i, keep_in_its_turn=False),
    "called early and again": lambda tc, e, i: _called_early(tc, e, i, keep_in_its_turn=True),
    "empty turn": lambda tc, e, i: _with_steps(
        tc, i, lambda steps, t: steps.__setitem__(t, [] if i % 2 else ["I am not able to do that."])),
    "malformed JSON": lambda tc, e, i: _with_steps(  # an unterminated object: the block is skipped
        tc, i, lambda steps, t: steps[t].__setitem__(0, steps[t][0].replace("}\n</tool_call>", "\n</tool_call>"))),
    "unknown function": lambda tc, e, i: _with_steps(
        tc, i, lambda steps, t: steps[t].insert(0, tool_calls_text([{"name": "not_a_function", "arguments": {}}]))),
    "non-dict JSON": lambda tc, e, i: _with_steps(  # makes the whole step undecodable: its calls are lost
        tc, i, lambda steps, t: steps[t].__setitem__(0, "<tool_call>\n[1, 2]\n</tool_call>\n" + steps[t][0])),
    "mixed text, all calls in one step": lambda tc, e, i: [
        ["Let me see.\n" + tool_calls_text(calls) + "\nThat should do it.", "All done."] if calls else ["Sorry."]
        for calls in tc],
    "arguments as a JSON string": lambda tc, e, i: [
        [tool_calls_text([{"name": c["name"], "arguments": json.dumps(c["arguments"])}]) for c in calls]
        for calls in tc],
    "calls in a turn expecting none": lambda tc, e, i: _calls_where_none_expected(tc),
    "odd arguments": lambda tc, e, i: _odd_arguments(tc, e),
    "fewer turns": lambda tc, e, i: one_call_per_step(tc)[:-1],
    "inference error": lambda tc, e, i: "Error during inference: the server went away",
    "no calls at all": lambda tc, e, i: [["I cannot help with that."] for _ in tc],
}


@pytest.fixture(scope="module")
def corpus(data, method_parameters):
    """(entry, ground truth, kind, result) for all 800 entries: the ground truth one call per step, and three
    perturbations per entry, rotating through the kinds so that each kind meets every category."""
    items = []
    for index, (entry, answer) in enumerate(all_entries(data)):
        turn_calls = [[as_json_call(c, method_parameters) for c in calls] for calls in answer["ground_truth"]]
        items.append((entry, answer["ground_truth"], "ground truth", one_call_per_step(turn_calls)))
        candidates = [(kind, result) for kind, perturb in PERTURBATIONS.items()
                      if (result := perturb(turn_calls, entry, index)) is not None]
        for offset in range(3):
            kind, result = candidates[(index * 3 + offset) % len(candidates)]
            items.append((entry, answer["ground_truth"], kind, result))
    return items


class _DecodeOnlyHandler:
    """The official QwenFCHandler's decode_execute (all the runner needs of a handler), without its constructor."""

    def __init__(self, official):
        self._handler = object.__new__(official.qwen_fc.QwenFCHandler)

    def decode_execute(self, result, has_tool_call_tag):
        return self._handler.decode_execute(result, has_tool_call_tag)


def official_verdict(official, entry, ground_truth, result, model_name):
    """The official per-entry verdict (eval_runner._evaluate_single_multi_turn_entry, which multi_turn_runner calls
    for every line of a result file)."""
    prompt_entry = copy.deepcopy(entry)
    try:
        verdict = official.eval_runner._evaluate_single_multi_turn_entry(
            _DecodeOnlyHandler(official), entry["id"], copy.deepcopy(result), ground_truth, prompt_entry, model_name,
            mt.category_of(entry["id"]))
    finally:
        forget_official_instances(official, model_name)
    if verdict["valid"]:
        return {"valid": True}
    error = verdict["error"]
    message = error["error_message"][0] if isinstance(error["error_message"], list) else error["error_message"]
    return {"valid": False, "error_type": error["error_type"], "error": message}


def test_checker_agrees_with_the_official_on_the_corpus(official, corpus):
    """Same verdict (valid, error type, error message) as the official checker for every candidate; the ground truth
    itself passes everywhere, every kind of perturbation and every error type occurs."""
    disagreements, outcomes = [], Counter()
    for number, (entry, ground_truth, kind, result) in enumerate(corpus):
        model_name = f"agree{number}"  # its own instances on the official side
        theirs = official_verdict(official, entry, ground_truth, result, model_name)
        row = mt.score_multi_turn_entry(entry, ground_truth, result, model_name)
        ours = {k: row[k] for k in ("valid", "error_type", "error") if k in row}
        if ours != theirs:
            disagreements.append((entry["id"], kind, ours, theirs))
        outcomes[kind, theirs.get("error_type", "valid")] += 1
    assert not disagreements, f"{len(disagreements)} of {len(corpus)} verdicts differ, e.g. {disagreements[:3]}"
    assert outcomes["ground truth", "valid"] == 800
    assert {kind for kind, _ in outcomes} == {"ground truth", *PERTURBATIONS}
    assert {error for _, error in outcomes} == {"valid", mt.FORCE_TERMINATED, mt.INFERENCE_ERROR, mt.EMPTY_TURN,
                                                mt.STATE_MISMATCH, mt.RESPONSE_MISMATCH}
    assert outcomes["called early and again", "valid"] > 0  # a call made a turn early and repeated in its turn passes
    assert outcomes["arguments as a JSON string", "valid"] > 0


def test_response_check_counts_each_result_once(official):
    """The response check as the official _is_subsequence_unordered: every expected result needs its own produced
    result (two expected `None`s need two), order ignored. Real entries rarely separate this from set inclusion,
    so all pairs of short lists over two values are compared with the official function directly."""
    checker = importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
    lists = [list(p) for n in range(4) for p in itertools.product("ab", repeat=n)]
    for expected, produced in itertools.product(lists, repeat=2):
        assert mt._missing_results(expected, produced) == checker._is_subsequence_unordered(expected, produced)[1]


def test_score_rows_and_error_analysis(data, corpus):
    """Score rows carry what error analysis needs; the analysis counts failed turns by error type and the share of
    turns with a decodable call."""
    entries, answers = data["multi_turn_base"]
    results = {entries[0]["id"]: corpus[0][3], entries[1]["id"]: [["no call"]] * len(answers[1]["ground_truth"]),
               entries[2]["id"]: "Error during inference: x"}
    rows, summary = mt.score_multi_turn_category("multi_turn_base", results, entries, answers)
    assert [row["id"] for row in rows] == [e["id"] for e in entries[:3]]
    assert summary == {"accuracy": 1 / 3, "correct": 1, "total": 3, "expected": 200,
                       "error_types": {mt.EMPTY_TURN: 1, mt.INFERENCE_ERROR: 1}}
    empty_turn = next(t for t, calls in enumerate(answers[1]["ground_truth"]) if calls)
    assert rows[1]["turn"] == empty_turn and rows[1]["model_result"] == results[entries[1]["id"]]
    analysis = mt.multi_turn_error_analysis({"multi_turn_base": rows})["multi_turn_base"]
    turns = len(answers[0]["ground_truth"]) + len(answers[1]["ground_truth"])
    with_call = sum(bool(calls) for calls in answers[0]["ground_truth"])
    assert analysis == {"entries": 3, "failed_turns": {mt.EMPTY_TURN: {empty_turn: 1}, mt.INFERENCE_ERROR: {"-": 1}},
                        "turns": turns, "turns_with_call": with_call, "turns_with_call_share": with_call / turns}


# ---------------------------------------------------------------------------------------------------------------
# The generation loop against the official handler, driven by a scripted model
# ---------------------------------------------------------------------------------------------------------------

CONTEXT_LENGTH = 9000  # "tokens" of 4 characters: some long-context conversations outgrow it


def count_tokens(text):
    return len(text) // 4


def position(prompt):
    """(turn, step) of the prompt being answered: real user messages so far - 1, and assistant messages since."""
    user = "<|im_start|>user\n"
    real_users = prompt.count(user) - prompt.count(user + "<tool_response>")
    last_user = max(i for i in _find_all(prompt, user) if not prompt.startswith("<tool_response>", i + len(user)))
    return real_users - 1, prompt.count("<|im_start|>assistant\n", last_user) - 1


def _find_all(text, needle):
    start = text.find(needle)
    while start != -1:
        yield start
        start = text.find(needle, start + 1)


class ScriptedModel:
    """Outputs chosen from the prompt (turn, step) and the entry's ground truth, one behaviour per entry."""

    BEHAVIOURS = ("one call per step", "all calls in one step", "reasoning and text around calls",
                  "duplicate calls", "errors and odd arguments", "step limit", "step limit in the last turn",
                  "non-dict JSON", "int as a name", "extra function key", "malformed JSON", "no calls")

    def __init__(self, behaviour, turn_calls, involved_classes):
        self.behaviour, self.turn_calls, self.involved = behaviour, turn_calls, involved_classes

    def __call__(self, prompt):
        turn, step = position(prompt)
        calls = self.turn_calls[turn] if turn < len(self.turn_calls) else []
        any_call = next((c for turn_calls in self.turn_calls for c in turn_calls), {"name": "ls", "arguments": {}})
        b = self.behaviour
        if b == "one call per step":
            return tool_calls_text([calls[step]]) if step < len(calls) else "Done."
        if b == "all calls in one step":
            return tool_calls_text(calls) if step == 0 and calls else "Done."
        if b == "reasoning and text around calls":
            if step == 0 and calls:
                return "<think>\nThe user wants this.\n</think>\n\nSure.\n" + tool_calls_text(calls) + "\nThere."
            return "<think>\nNothing left.\n</think>\n\nAll done." if step == 1 else "Nothing to do."
        if b == "duplicate calls":
            return tool_calls_text([calls[0]] + calls) if step == 0 and calls else "Done."
        if b == "errors and odd arguments":
            if step == 0:
                odd = [{"name": "not_a_function", "arguments": {"x": 1}},
                       {"name": any_call["name"], "arguments": {"bad key": 1, "y": float("nan")}}]
                if "GorillaFileSystem" in self.involved:
                    odd.append({"name": "echo", "arguments": {"content": "ls(a) then cd (b)"}})
                return tool_calls_text(odd)
            if step == 1 and calls:
                return tool_calls_text([{"name": calls[0]["name"], "arguments": json.dumps(calls[0]["arguments"])}])
            return "I could not do it."
        if b == "step limit":
            return tool_calls_text([any_call])
        if b == "step limit in the last turn":
            if turn == len(self.turn_calls) - 1:
                return tool_calls_text([any_call])
            return tool_calls_text([calls[step]]) if step < len(calls) else "Done."
        if b in ("non-dict JSON", "int as a name", "extra function key"):
            if turn == 1 and step == 0:  # decoded or not, the next prompt cannot be written: the entry errors
                bad = {"non-dict JSON": [1, 2], "int as a name": {"name": 5, "arguments": {}},
                       "extra function key": {**any_call, "function": 5}}[b]
                return f"<tool_call>\n{json.dumps(bad)}\n</tool_call>"
            return tool_calls_text([calls[step]]) if step < len(calls) else "Done."
        if b == "malformed JSON":
            return '<tool_call>\n{"name": "ls", "arguments": {\n</tool_call>' if step == 0 else "Done."
        return "I cannot help with that."


class ScriptedServer:
    """Stands in for the official handler's OpenAI completions client (its vLLM server): records each request and
    answers with the scripted model's output; refuses a request that does not fit the context, as vLLM does."""

    def __init__(self, model):
        self.model, self.requests = model, []
        self.completions = self

    def create(self, model, temperature, prompt, max_tokens, timeout, **kwargs):
        prompt_tokens = count_tokens(prompt)
        if max_tokens < 1 or prompt_tokens + max_tokens > CONTEXT_LENGTH:
            raise ValueError(f"Error code: 400 - maximum context length is {CONTEXT_LENGTH} tokens")
        text = self.model(prompt)
        self.requests.append((prompt, max_tokens, text))
        usage = types.SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=count_tokens(text))
        return types.SimpleNamespace(choices=[types.SimpleNamespace(text=text)], usage=usage)


def official_run(official, entry, model):
    """The official multi-turn inference for one entry with the scripted model; an exception is recorded as the
    official runner (_llm_response_generation.multi_threaded_inference) records it."""
    handler = official.qwen_fc.QwenFCHandler(model_name="Qwen/Qwen3-8B", temperature=0.001,
                                             registry_name="Qwen/Qwen3-8B", is_fc_model=True)
    handler.client = server = ScriptedServer(model)
    handler.tokenizer = types.SimpleNamespace(tokenize=lambda text: range(count_tokens(text)))
    handler.max_context_length, handler.model_path_or_id = CONTEXT_LENGTH, "Qwen/Qwen3-8B"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
            result, metadata = handler.inference(copy.deepcopy(entry), include_input_log=False,
                                                 exclude_state_log=True)
    except Exception as err:  # noqa: BLE001
        result, metadata = f"Error during inference: {err}", {}
    finally:
        forget_official_instances(official, handler.model_name_underline_replaced)
    return server.requests, result, metadata


@pytest.fixture(scope="module")
def scripted_runs(official, data, method_parameters):
    """For a sample of entries of every category and every behaviour: the official run's requests and result."""
    runs = []
    behaviours = itertools.cycle(ScriptedModel.BEHAVIOURS)
    for category, (entries, answers) in data.items():
        official_entries = {e["id"]: e for e in official.utils.load_dataset_entry(category)}
        for entry, answer in list(zip(entries, answers))[::4]:
            turn_calls = [[as_json_call(c, method_parameters) for c in calls] for calls in answer["ground_truth"]]
            model = ScriptedModel(next(behaviours), turn_calls, entry["involved_classes"])
            requests, result, metadata = official_run(official, official_entries[entry["id"]], model)
            runs.append((entry, model.behaviour, requests, result, metadata))
    return runs


def test_loop_sends_the_official_prompts_and_records_the_official_results(scripted_runs):
    """Our batched loop, fed the scripted model's outputs, sends at every round exactly the prompts (and token
    budgets) that the official handler sent for each entry still running, in entry order, and records the
    official result and token counts; an entry the official ended with an error ends with one here too."""
    by_id = {entry["id"]: (requests, result, metadata) for entry, _, requests, result, metadata in scripted_runs}
    order = [entry["id"] for entry, *_ in scripted_runs]
    rounds = itertools.count()

    def generate(prompts, budgets):
        j = next(rounds)
        expected = [(i, by_id[i][0][j]) for i in order if len(by_id[i][0]) > j]
        for prompt, budget, (entry_id, (official_prompt, official_budget, _)) in zip(prompts, budgets, expected):
            assert prompt == official_prompt, f"{entry_id}: round {j} prompt differs"
            assert budget == official_budget, entry_id
        assert len(prompts) == len(expected), f"round {j}: {len(prompts)} prompts, official {len(expected)}"
        return [text for _, (_, _, text) in expected]

    records = list(mt.generate_multi_turn([entry for entry, *_ in scripted_runs], generate, count_tokens,
                                          CONTEXT_LENGTH, model_name="Qwen/Qwen3-8B"))
    assert sorted(r["id"] for r in records) == sorted(order)
    outcomes = Counter()
    for record in records:
        requests, result, metadata = by_id[record["id"]]
        if isinstance(result, str):
            assert isinstance(record["result"], str) and record["result"].startswith("Error during inference: ")
            overflow = "maximum context length" in result
            assert overflow == ("no room to generate" in record["result"]), record["id"]
            if not overflow:  # the handler's own error: the same text
                assert record["result"] == result, record["id"]
            outcomes["context overflow" if overflow else "inference error"] += 1
        else:
            assert record["result"] == result, record["id"]
            assert record["input_token_count"] == metadata["input_token_count"], record["id"]
            assert record["output_token_count"] == metadata["output_token_count"], record["id"]
            outcomes["force-quit" if any(len(turn) > mt.MAXIMUM_STEP_LIMIT for turn in result) else "completed"] += 1
        assert record["steps"] == len(requests)
    assert all(outcomes[k] > 0 for k in ("context overflow", "inference error", "force-quit", "completed")), outcomes
    behaviours = {b for _, b, *_ in scripted_runs}
    assert behaviours == set(ScriptedModel.BEHAVIOURS)
    held_out = [r for e, _, requests, *_ in scripted_runs if "missed_function" in e for r in requests
                if "I have updated some more functions" in r[0]]
    assert held_out, "no held-out-function turn was exercised"


def test_official_result_files_score_as_officially(official, scripted_runs, data, tmp_path):
    """Result files as the official harness writes them (BaseHandler.write, from the scripted runs above, whose
    results our loop reproduces), read with read_results and scored per category: every entry gets the
    official verdict."""
    handler = official.qwen_fc.QwenFCHandler(model_name="Qwen/Qwen3-8B", temperature=0.001,
                                             registry_name="Qwen/Qwen3-8B", is_fc_model=True)
    for entry, _, _, result, metadata in scripted_runs:
        handler.write({"id": entry["id"], "result": result, **metadata}, result_dir=tmp_path)
    checked = 0
    for category, (entries, answers) in data.items():
        (path,) = tmp_path.rglob(f"BFCL_v4_{category}_result.json")
        rows, summary = mt.score_multi_turn_category(category, read_results(path), entries, answers,
                                                     model_name="Qwen_Qwen3-8B")
        truth = {a["id"]: a["ground_truth"] for a in answers}
        by_id = {e["id"]: e for e in entries}
        results = read_results(path)
        for row in rows:
            theirs = official_verdict(official, by_id[row["id"]], truth[row["id"]], results[row["id"]],
                                      "Qwen_Qwen3-8B")
            assert {k: row[k] for k in ("valid", "error_type", "error") if k in row} == theirs, row["id"]
        assert summary["total"] == len(rows) == 50 and summary["expected"] == 200
        checked += len(rows)
    assert checked == len(scripted_runs)


def test_generate_must_answer_every_prompt(data):
    entries = data["multi_turn_base"][0][:2]
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        list(mt.generate_multi_turn(entries, lambda prompts, budgets: ["x"], count_tokens, CONTEXT_LENGTH))


def test_step_token_budget_is_the_official_one():
    """min(4096, context - prompt - 2); at or below 0 the official request fails."""
    assert mt.step_token_budget(1000, 32768) == 4096
    assert mt.step_token_budget(30000, 32768) == 2766
    assert mt.step_token_budget(32766, 32768) == 0
    assert mt.step_token_budget(40000, 32768) < 0


def test_context_length_is_the_official_one():
    config = types.SimpleNamespace(max_position_embeddings=32768)
    tokenizer = types.SimpleNamespace(model_max_length=131072)
    assert mt.official_context_length(config, tokenizer) == 32768
    assert mt.official_context_length(types.SimpleNamespace(), tokenizer) == 131072
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mt.official_context_length(types.SimpleNamespace(), types.SimpleNamespace(model_max_length=None))


# ---------------------------------------------------------------------------------------------------------------
# Aggregates
# ---------------------------------------------------------------------------------------------------------------


def score(accuracy, total):
    return {"accuracy": accuracy, "total": total}


FULL_SCORES = {
    "simple_python": score(0.9, 400), "simple_java": score(0.6, 100), "simple_javascript": score(0.6, 50),
    "multiple": score(0.9, 200), "parallel": score(0.8, 200), "parallel_multiple": score(0.7, 200),
    "live_simple": score(0.75, 258), "live_multiple": score(0.7, 1053), "live_parallel": score(0.5, 16),
    "live_parallel_multiple": score(0.5, 24), "irrelevance": score(0.8, 240), "live_irrelevance": score(0.6, 884),
    "live_relevance": score(1.0, 16),
    "multi_turn_base": score(0.3, 200), "multi_turn_miss_func": score(0.2, 200),
    "multi_turn_miss_param": score(0.1, 200), "multi_turn_long_context": score(0.2, 200),
    "web_search_base": score(0.1, 100), "web_search_no_snippet": score(0.05, 100),
    "memory_kv": score(0.2, 155), "memory_vector": score(0.1, 155), "memory_rec_sum": score(0.3, 155),
}


def test_multi_turn_accuracy_is_the_unweighted_mean():
    scores = {c: FULL_SCORES[c] for c in mt.MULTI_TURN_CATEGORIES}
    assert mt.multi_turn_accuracy(scores)["accuracy"] == pytest.approx((0.3 + 0.2 + 0.1 + 0.2) / 4)
    partial = mt.multi_turn_accuracy({"multi_turn_base": FULL_SCORES["multi_turn_base"]})
    assert partial["accuracy"] is None and partial["status"].startswith("incomplete")
    assert mt.multi_turn_accuracy({})["status"] == "not run"


def test_overall_on_hand_computed_numbers():
    """Non-Live = mean(mean(.9,.6,.6)=.7, .9, .8, .7) = .775; Live = (.75*258 + .7*1053 + .5*16 + .5*24)/1351
    = 942.6/1351; Irrelevance = .7; Multi-Turn = .2; Agentic = mean(.075, .2) = .1375;
    Overall = .1*.775 + .1*Live + .1*.7 + .3*.2 + .4*.1375."""
    live = (0.75 * 258 + 0.7 * 1053 + 0.5 * 16 + 0.5 * 24) / 1351
    overall = mt.leaderboard_overall(FULL_SCORES)
    assert overall["accuracy"] == pytest.approx(0.1 * 0.775 + 0.1 * live + 0.1 * 0.7 + 0.3 * 0.2 + 0.4 * 0.1375)
    assert overall["complete"] and all(p["status"] == "run" for p in overall["parts"].values())
    assert overall["parts"]["Live"]["accuracy"] == pytest.approx(live)
    assert overall["parts"]["Agentic"]["accuracy"] == pytest.approx(0.1375)

    # Single-turn and multi-turn only (no agentic run): agentic counts 0; live_parallel not run counts 0 with its
    # 16 entries in Live's weighting.
    scores = {c: s for c, s in FULL_SCORES.items()
              if c != "live_parallel" and not c.startswith(("web_search", "memory"))}
    live_partial = (0.75 * 258 + 0.7 * 1053 + 0.5 * 24) / 1351
    result = mt.leaderboard_overall(scores, sizes={"live_parallel": 16})
    assert result["accuracy"] == pytest.approx(0.1 * 0.775 + 0.1 * live_partial + 0.1 * 0.7 + 0.3 * 0.2)
    assert result["parts"]["Agentic"] == {"accuracy": 0.0, "weight": 0.4, "status": "not run", "categories_run": []}
    assert result["parts"]["Live"]["status"] == "partly run" and not result["complete"]
    # sizes default to the installed data: live_parallel has 16 entries there
    assert mt.leaderboard_overall(scores)["accuracy"] == pytest.approx(result["accuracy"])
    with pytest.raises(ValueError, match="live_parallel"):
        mt.leaderboard_overall(scores, sizes={})


def test_overall_matches_the_official_helpers(official):
    """The same numbers through the official generate_leaderboard_csv arithmetic (its helper functions, with a
    missing category as {accuracy 0, its data set size, N/A})."""
    helper = official.helper
    scores = {c: s for c, s in FULL_SCORES.items() if c not in ("simple_java", "live_multiple", "memory_vector")}
    sizes = {"simple_java": 100, "live_multiple": 1053, "memory_vector": 155}

    def part(c):
        if c in scores:
            return {"accuracy": scores[c]["accuracy"], "total_count": scores[c]["total"],
                    "display_accuracy": scores[c]["accuracy"]}
        return {"accuracy": 0, "total_count": sizes[c], "display_accuracy": "N/A"}

    unweighted = lambda names: helper.calculate_unweighted_accuracy(  # noqa: E731
        [n if isinstance(n, dict) else part(n) for n in names], display_na_if_category_missing=False)
    non_live = unweighted([unweighted(["simple_python", "simple_java", "simple_javascript"]), "multiple", "parallel",
                           "parallel_multiple"])
    live = helper.calculate_weighted_accuracy([part(c) for c in mt.LIVE_AST], display_na_if_category_missing=False)
    irrelevance = unweighted(["irrelevance", "live_irrelevance"])
    multi_turn = unweighted(list(mt.MULTI_TURN_CATEGORIES))
    agentic = unweighted([unweighted(["web_search_base", "web_search_no_snippet"]),
                          unweighted(["memory_kv", "memory_vector", "memory_rec_sum"])])
    expected = helper.calculate_percentage_weighted_accuracy(
        [non_live, live, irrelevance, multi_turn, agentic], [10, 10, 10, 30, 40], display_na_if_category_missing=False)
    assert mt.leaderboard_overall(scores, sizes)["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    source = inspect.getsource(helper.generate_leaderboard_csv)
    assert "[10, 10, 10, 30, 40]" in source and "total_irrelevance" in source


def test_overall_weights_sum_to_one():
    assert math.isclose(sum(p["weight"] for p in mt.leaderboard_overall(FULL_SCORES)["parts"].values()), 1.0)
