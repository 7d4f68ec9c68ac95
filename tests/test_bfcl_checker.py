"""Our BFCL checker (bfcl_scorer.py) against the official one from the pinned bfcl-eval.

For every entry of the 13 single-turn BFCL v4 categories we build candidate model outputs from the real answers
(correct, wrong values, wrong types, missing/extra params, wrong names and counts, reordered parallel calls,
string variants, Java/JS source strings, malformed blocks, prose), render them in each decoder's format, and
require the official eval_runner's verdict (valid, and error_type when invalid) for every one. Where the official
code raises, ours must report the entry invalid (it never raises). See tests/bfcl_reference.py for how the
official code is imported without its dependencies.
"""

import copy
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from bfcl_reference import load_official_bfcl

from fcsft import bfcl_checker, bfcl_prompts
from fcsft.bfcl_data import read_jsonl

bfcl_eval = pytest.importorskip("bfcl_eval", reason="bfcl-eval is installed by `make setup`")
DATA_DIR = Path(bfcl_eval.__path__[0]) / "data"
CATEGORIES = [
    "simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple", "irrelevance",
    "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance",
]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return load_official_bfcl(tmp_path_factory.mktemp("bfcl_project_root"))


def load(category):
    entries = read_jsonl(DATA_DIR / f"BFCL_v4_{category}.json")
    answer_path = DATA_DIR / "possible_answer" / f"BFCL_v4_{category}.json"
    answers = read_jsonl(answer_path) if answer_path.exists() else [None] * len(entries)
    return list(zip(entries, answers))


# --- Building candidate outputs ----------------------------------------------------------------------------------


def first_allowed(allowed, choice=0):
    values = [v for v in allowed if v != ""]
    return values[min(choice, len(values) - 1)] if values else None


def concrete(value, spec):
    """An allowed value as a model would write it: dict answers are {key: [allowed]}, pick one per key."""
    def pick_dict(d):
        return {k: first_allowed(v) for k, v in d.items() if isinstance(v, list) and first_allowed(v) is not None} \
            if isinstance(d, dict) else d
    if spec.get("type") in ("dict", "HashMap") and isinstance(value, dict):
        return pick_dict(value)
    if spec.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [pick_dict(v) for v in value]
    return value


def java_source(value, spec, quote_strings=False):
    """A Python answer value as Java source text (what an FC model is asked to write)."""
    jtype, item = spec.get("type"), spec.get("items", {}).get("type")
    if isinstance(value, str):
        return f'"{value}"' if quote_strings else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        suffix = {"long": "L", "float": "f"}.get(jtype, "")
        return f"{value}{suffix}"
    if isinstance(value, list):
        elements = [f'"{v}"' if isinstance(v, str) and (quote_strings or item in ("String", "char"))
                    else java_source(v, {"type": item}) for v in value]
        if jtype == "ArrayList":
            return f"new ArrayList<>(Arrays.asList({', '.join(elements)}))"
        return f"new {'String' if item == 'String' else 'int'}[]{{{', '.join(elements)}}}"
    if isinstance(value, dict):
        puts = " ".join(f'put("{k}", {json.dumps(v) if isinstance(v, str) else java_source(v, {})});' for k, v in value.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}"
    return str(value)


def js_source(value, spec, quote_strings=False):
    jtype = spec.get("type")
    if isinstance(value, str):
        return f"'{value}'" if quote_strings else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value}n" if jtype == "Bigint" else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(f"'{v}'" if isinstance(v, str) else js_source(v, {}) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: " + (f"'{v}'" if isinstance(v, str) else js_source(v, {})) for k, v in value.items()) + "}"
    return str(value)


def mutations(value, rng):
    """(label, wrong or borderline value) pairs for one parameter value."""
    out = [("null", None), ("as_string", str(value)) if not isinstance(value, str) else ("str_as_int", 7)]
    if isinstance(value, bool):
        out += [("bool_flip", not value), ("bool_as_int", int(value)), ("bool_as_text", "true" if value else "false")]
    elif isinstance(value, int):
        out += [("int_plus_one", value + 1), ("int_as_float", float(value)), ("int_negated", -value - 1)]
    elif isinstance(value, float):
        out += [("float_plus", value + 0.5), ("float_as_int", int(value)), ("float_rounded", round(value, 1))]
    elif isinstance(value, str):
        out += [("upper", value.upper()), ("spaced", " ".join(value) if len(value) < 12 else value.replace(" ", "-")),
                ("quote_swap", value.replace("'", '"') + "'"), ("suffix", value + "x"), ("empty", ""),
                ("punctuation", value + ". "), ("prefix_word", "the " + value)]
    elif isinstance(value, list):
        out += [("list_reversed", value[::-1]), ("list_drop_last", value[:-1]), ("list_as_tuple", tuple(value)),
                ("list_duplicate", value + value[:1]), ("list_as_text", json.dumps(value)), ("list_empty", []),
                ("list_items_as_str", [str(v) for v in value]),
                ("list_items_float", [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]),
                ("list_items_int", [int(v) if isinstance(v, float) else v for v in value]),
                ("list_items_upper", [v.upper() if isinstance(v, str) else v for v in value]),
                ("list_of_dicts_bad", [{"k": 1}] * len(value)), ("list_nested", [value])]
    elif isinstance(value, dict):
        keys = list(value)
        out += [("dict_extra_key", {**value, "extra_key": 1}), ("dict_empty", {}),
                ("dict_as_text", json.dumps(value)), ("dict_as_list", [value])]
        if keys:
            k = rng.choice(keys)
            out += [("dict_drop_key", {kk: v for kk, v in value.items() if kk != k}),
                    ("dict_change_value", {**value, k: str(value[k]) + "_changed"}),
                    ("dict_upper_value", {**value, k: value[k].upper() if isinstance(value[k], str) else value[k]})]
    return out


def build_call(expected, functions, choice=0, omit_optional=False):
    name, allowed_by_param = next(iter(expected.items()))
    props = next((f for f in functions if f["name"] == name), {"parameters": {"properties": {}}})["parameters"]["properties"]
    args = {}
    for param, allowed in allowed_by_param.items():
        value = first_allowed(allowed, choice)
        if value is None or (omit_optional and "" in allowed):
            continue
        args[param] = concrete(value, props.get(param, {}))
    return {name: args}


def ast_candidates(entry, answer, category, rng):
    """(label, [calls] or {"raw": text-by-decoder}) for an AST entry; values are Python-typed (converted to
    Java/JS source text afterwards for those categories)."""
    functions, truth = entry["function"], answer["ground_truth"]
    good = [build_call(e, functions) for e in truth]
    yield "correct", good
    yield "correct_required_only", [build_call(e, functions, omit_optional=True) for e in truth]
    yield "correct_second_choice", [build_call(e, functions, choice=1) for e in truth]
    yield "empty_list", []
    yield "duplicated_call", good + good[:1]
    if len(good) > 1:
        yield "dropped_call", good[:-1]
        yield "reversed_calls", good[::-1]
        yield "rotated_calls", good[1:] + good[:1]
    other = [f for f in functions if f["name"] not in {next(iter(c)) for c in good}]
    if other:
        yield "other_function", [{other[0]["name"]: {}}] + good[1:]
        yield "extra_other_call", good + [{other[0]["name"]: {}}]

    i = rng.randrange(len(good))
    name, args = next(iter(good[i].items()))
    function = next((f for f in functions if f["name"] == name), functions[0])
    props, required = function["parameters"]["properties"], function["parameters"].get("required", [])

    def with_call(new_call):
        return good[:i] + [new_call] + good[i + 1:]

    yield "wrong_name", with_call({name + "_v2": args})
    yield "name_case", with_call({name.upper(): args})
    if "." in name:
        yield "dots_to_underscores", with_call({name.replace(".", "_"): args})
    yield "extra_param", with_call({name: {**args, "unexpected_param": 1}})
    unanswered = [p for p in props if p not in args]
    if unanswered:
        yield "schema_param_not_in_answer", with_call({name: {**args, unanswered[0]: "x"}})
    for param in required[:2]:
        yield f"missing_required:{param}", with_call({name: {k: v for k, v in args.items() if k != param}})
    optional = [p for p in args if p not in required]
    if optional:
        yield "missing_optional", with_call({name: {k: v for k, v in args.items() if k != optional[0]}})
    yield "all_values_as_strings", with_call({name: {k: v if isinstance(v, str) else str(v) for k, v in args.items()}})
    for param in args:
        for label, bad in mutations(args[param], rng):
            if rng.random() < 0.6 or len(args) <= 2:
                yield f"{label}:{param}", with_call({name: {**args, param: bad}})
    if len(good) > 1:  # swap one argument between two calls to the same function
        j = (i + 1) % len(good)
        other_name, other_args = next(iter(good[j].items()))
        shared = [p for p in args if p in other_args and args[p] != other_args[p]]
        if other_name == name and shared:
            p = shared[0]
            swapped = list(good)
            swapped[i] = {name: {**args, p: other_args[p]}}
            swapped[j] = {name: {**other_args, p: args[p]}}
            yield "swapped_values", swapped


def source_variants(calls, functions, language, rng):
    """Java/JS: the model writes every value as source text. Canonical rendering plus quoted-string, raw (non-string)
    value and alternative collection syntax variants."""
    render = java_source if language == "java" else js_source

    def rendered(quote=False, raw_param=None):
        out = []
        for call in calls:
            name, args = next(iter(call.items()))
            props = next((f for f in functions if f["name"] == name), {"parameters": {"properties": {}}})["parameters"]["properties"]
            out.append({name: {k: (v if k == raw_param else render(v, props.get(k, {}), quote)) for k, v in args.items()}})
        return out

    yield "", rendered()
    if rng.random() < 0.5:
        yield "+quoted", rendered(quote=True)
    params = [p for c in calls for p in next(iter(c.values()))]
    if params and rng.random() < 0.5:
        yield "+raw_value", rendered(raw_param=rng.choice(params))


def raw_candidates(functions, rng):
    """Decoder-specific malformed outputs and prose, using the entry's real function name."""
    f = functions[0]
    name = f["name"]
    req = f["parameters"].get("required", [])
    arg = {req[0]: "x"} if req else {}
    block = lambda payload: f"<tool_call>\n{payload}\n</tool_call>"  # noqa: E731
    good_json = json.dumps({"name": name, "arguments": arg})
    yield "prose", {d: "I'm sorry, none of the available functions can help with that." for d in bfcl_checker.BFCL_DECODERS}
    yield "empty", {d: "" for d in bfcl_checker.BFCL_DECODERS}
    yield "qwen_variants", {"qwen": rng.choice([
        block("{not json"), f"<tool_call>{good_json}</tool_call>", block("[1, 2]"), block('"text"'),
        block(json.dumps({"name": name})), block(json.dumps({"name": name, "arguments": json.dumps(arg)})),
        block(json.dumps({"name": [name], "arguments": {}})), block(json.dumps({"name": name, "arguments": []})),
        "Sure! " + block(good_json), block(good_json) + "\n" + block("{broken"), block(good_json)[:-5],
        block(json.dumps({"name": name, "arguments": {}})), block(json.dumps({"arguments": arg})),
        block(json.dumps({"name": 5, "arguments": arg})), f"<tool_call>\n\n{good_json}\n\n</tool_call>",
        "<think>\nhmm\n</think>\n\n" + block(good_json), "```json\n" + good_json + "\n```"])}
    yield "xlam_variants", {"xlam": rng.choice([
        "[]", "{}", "null", "[1]", '"text"', json.dumps({"name": name}), json.dumps({"name": name, "arguments": arg}),
        good_json + "; " + good_json, good_json + "; {broken", json.dumps([{"name": name, "arguments": []}]),
        json.dumps([{"name": name, "arguments": "x"}]), json.dumps([[{"name": name, "arguments": {}}]]),
        json.dumps([{"name": [name], "arguments": {}}]), "```json\n" + json.dumps([json.loads(good_json)]) + "\n```"])}
    yield "python_variants", {"python": rng.choice([
        f"{name}(", "[1, 2]", f"{name}(x)", f"[{name}(a=1), 3]", f"{name}(a=b.c)", f"{name}(a=lambda: 1)",
        f"{name}(a=-x)", f"{name}(a=+5)", f"{name}(a={{**d}})", f"{name}(a=[*b])", f"{name}(a=x[0])",
        f"{name}(a=g(1))", f"{name}(a=g(b=1))", f"{name}(a=1+2)", f"{name}(a='x'*3)", f"{name}(a=1/0)",
        f"{name}(a=not True)", f"'{name}(a=1)'", f"```\n{name}(a=1)\n```", f"{name}(a=f'x')", f"{name}(**k)",
        f"{name}(a=(1, 2))", f"{name}(a={{1, 2}})", f"{name}(a=-'s')", f"{name}(a=...)", f"{name}(a=None)",
        f"[{name}()]", "[]", "[[]]", f"x.y.{name}(a=1)", f"{name}()(a=1)", f"({name}(a=1), {name}(a=2))",
        f"{name}(a=1 if b else 2)", f"{name}(a=[1, 2][0])", "{" + f"{name}(a=1)" + "}"])}


def relevance_candidates(entry, rng):
    if not entry["function"]:  # a few live_irrelevance entries offer no function at all
        yield "no_functions_prose", {d: "I can't do that." for d in bfcl_checker.BFCL_DECODERS}
        return
    f = entry["function"][0]
    props = f["parameters"]["properties"]
    call = {f["name"]: {p: ("x" if props[p].get("type") == "string" else 1) for p in f["parameters"].get("required", [])}}
    yield "call_first_function", [call]
    yield "call_no_args", [{f["name"]: {}}]
    yield "two_calls", [call, call]
    yield "no_calls", []
    yield from raw_candidates(entry["function"], rng)


def render(calls, decoder):
    if decoder == "qwen":
        return "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>"
                         for c in calls for n, a in c.items())
    if decoder == "xlam":
        return json.dumps([{"name": n, "arguments": a} for c in calls for n, a in c.items()])
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})"
                           for c in calls for n, a in c.items()) + "]"


def corpus(category, decoders, seed=0):
    """Yields (entry, answer, label, decoder, raw_output)."""
    language = bfcl_checker.bfcl_language(category)
    for entry, answer in load(category):
        rng = random.Random(f"{seed}:{entry['id']}")
        if bfcl_checker.is_relevance_category(category):
            candidates = list(relevance_candidates(entry, rng))
        else:
            candidates = list(ast_candidates(entry, answer, category, rng)) + list(raw_candidates(entry["function"], rng))
        for label, candidate in candidates:
            for decoder in decoders:
                if isinstance(candidate, dict):  # raw text, per decoder
                    if decoder in candidate:
                        yield entry, answer, label, decoder, candidate[decoder]
                elif language != "python" and decoder != "python":
                    for suffix, calls in source_variants(candidate, entry["function"], language, rng):
                        yield entry, answer, label + suffix, decoder, render(calls, decoder)
                elif language == "python" or decoder != "python":
                    yield entry, answer, label, decoder, render(copy.deepcopy(candidate), decoder)


# Java/JS prompt-mode output is parsed with tree-sitter by BFCL (not installed; we parse it as Python): compare the
# python decoder on Python-language categories only.
DECODERS_BY_LANGUAGE = {"python": ("qwen", "xlam", "python"), "java": ("qwen", "xlam"), "javascript": ("qwen", "xlam")}


@pytest.mark.parametrize("category", CATEGORIES)
def test_same_verdict_as_official_checker(official, category):
    decoders = DECODERS_BY_LANGUAGE[bfcl_checker.bfcl_language(category)]
    counts, verdicts, mismatches = Counter(), Counter(), []
    for entry, answer, label, decoder, raw in corpus(category, decoders):
        truth = answer["ground_truth"] if answer else None
        expected = official.evaluate(decoder, entry, raw, category, truth)
        ours = bfcl_checker.score_bfcl_entry(entry, raw, category, ground_truth=truth, decoder=decoder)
        counts[decoder] += 1
        if "crash" in expected:
            verdicts["official_crash"] += 1
            agree = not ours["valid"]
        else:
            verdicts["valid" if expected["valid"] else "invalid"] += 1
            agree = ours["valid"] == expected["valid"] and (ours["valid"] or ours["error_type"] == expected["error_type"])
        if not agree:
            mismatches.append((entry["id"], label, decoder, raw[:300], expected, {k: ours.get(k) for k in ("valid", "error_type", "error")}))
    print(f"\n{category}: {sum(counts.values())} candidates {dict(counts)}, official verdicts {dict(verdicts)}")
    assert not mismatches, f"{len(mismatches)} disagreements, first ones:\n" + "\n".join(map(repr, mismatches[:15]))
    assert verdicts["valid"] > 0 and verdicts["invalid"] > 0  # the corpus exercises both outcomes


def test_tools_match_official_conversion(official):
    """FC-mode tools: language hints + convert_to_tool, as the official FC handlers build them (the Fireworks
    style is the one that wraps as {"type": "function", "function": ...} and keeps dotted names, as we do)."""
    for category in CATEGORIES:
        for entry, _ in load(category):
            hinted = official.language_hints(copy.deepcopy(entry["function"]), category)
            expected = official.convert_to_tool(hinted, official.gorilla_to_openapi, official.model_style.FIREWORK_AI)
            assert bfcl_prompts.bfcl_functions_to_tools(entry["function"], category) == expected, entry["id"]


def test_prompt_mode_system_prompt_matches_official(official):
    for category in ("simple_python", "simple_java", "simple_javascript", "live_multiple"):
        entry, _ = load(category)[3]
        messages, tools = bfcl_prompts.bfcl_chat(entry, category, mode="prompt")
        hinted = official.language_hints(copy.deepcopy(entry["function"]), category)
        assert tools is None
        assert messages[0] == {"role": "system", "content": official.formulate_system_prompt(official.default_prompt_format, hinted)}
        assert messages[1:] == entry["question"][0]


def test_decoders_on_known_outputs():
    qwen = '<tool_call>\n{"name": "math.add", "arguments": {"a": 1, "b": [2.5]}}\n</tool_call>\n<tool_call>\n{bad}\n</tool_call>'
    assert bfcl_checker.decode_qwen_tool_calls(qwen) == [{"math.add": {"a": 1, "b": [2.5]}}]
    assert bfcl_checker.decode_qwen_tool_calls("no calls here") == []
    with pytest.raises(bfcl_checker.DecodeError):
        bfcl_checker.decode_qwen_tool_calls('<tool_call>\n[1]\n</tool_call>')
    assert bfcl_checker.decode_xlam_json('[{"name": "f", "arguments": {"x": "y"}}]') == [{"f": {"x": "y"}}]
    assert bfcl_checker.decode_xlam_json('{"name": "f", "arguments": {}}; {"name": "g", "arguments": {}}') == [{"f": {}}, {"g": {}}]
    assert bfcl_checker.decode_python_calls("[a.b(x=1, y='s', z=[1, -2.5], w=(1, 2), v=2*3), c()]") == [
        {"a.b": {"x": 1, "y": "s", "z": [1, -2.5], "w": (1, 2), "v": 6}}, {"c": {}}]



def test_model_output_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    call = f"__import__('os').system('touch {marker}')"
    assert bfcl_checker.decode_python_calls(f"f(a={call})") == [{"f": {"a": call}}]  # a call without keywords stays text
    for text in (f"f(a={call} + 1)", f"f(a=lambda: {call})", f"f(a=[{call}][0] * 2)"):
        assert bfcl_checker.score_bfcl_entry({"function": []}, text, "irrelevance", decoder="python")["valid"]  # undecodable
    assert not marker.exists()


def test_where_the_official_checker_raises_ours_reports_invalid(official):
    """An optional list-of-dicts parameter given a list of numbers makes the official dict checker call .items() on
    an int; the official evaluation would stop there, ours scores the entry wrong and carries on."""
    entry = {"id": "simple_python_crash", "function": [{"name": "f", "parameters": {"type": "dict", "properties": {
        "items": {"type": "array", "items": {"type": "dict"}, "description": ""}}, "required": []}}]}
    truth = [{"f": {"items": ["", [{"a": [1]}]]}}]
    raw = '<tool_call>\n{"name": "f", "arguments": {"items": [5]}}\n</tool_call>'
    assert "crash" in official.evaluate("qwen", entry, raw, "simple_python", truth)
    result = bfcl_checker.score_bfcl_entry(entry, raw, "simple_python", ground_truth=truth)
    assert not result["valid"] and result["error_type"] == "ast_checker:exception"
