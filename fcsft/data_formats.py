"""Function-calling training data as users have it -> one normal form: TRL's conversational rows.

Each public layout has a converter from one raw row (a dict of the dataset's columns) to the normal form

    {"messages": [message, ...], "tools": [tool, ...] or None}

    {"role": "system", "content": str}
    {"role": "user", "content": str}
    {"role": "assistant", "content": str, "tool_calls": [call, ...]   (only when the turn calls),
                                          "weight": 0                  (only when the turn is shown but not trained)}
    {"role": "tool", "content": str, "name": the function it answers (when known), "tool_call_id": str (when given)}
    call: {"type": "function", "function": {"name": str, "arguments": dict}} (+ "id" when the source has one)
    tool: {"type": "function", "function": {"name": str, "description": str,
                                            "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

which the model's own chat template renders (`apply_chat_template(messages, tools=tools)`), exactly as at inference.
Arguments are always a dict: a JSON string would be rendered double-encoded by Qwen2.5's `tojson`.

Every converted row passes `check_example` (MalformedRow with a reason code otherwise; REASONS says what each means).
The transforms (function masking, irrelevance, extra tools) are pure functions of a normal-form row and a
random.Random. Weight 0 (OpenAI's "shown, not trained"): the assistant message keeps `"weight": 0`, and
`weighted_training_template` turns a training chat template into one that leaves such messages out of the assistant
mask, so TRL's own assistant-only loss honours it (see that function).
"""

import ast
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from fcsft.bfcl_prompts import BFCL_TO_JSON_SCHEMA
from fcsft.chat_formats import NO_TOOL_FITS_REPLY, MalformedRow, python_type_to_schema, xlam_to_messages, xlam_tool_to_schema

ROLES = ("system", "user", "assistant", "tool")
JSON_SCHEMA_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}

# Reason codes a row is skipped under, counted per source (the caller shows the first offending row of each).
REASONS = {
    # the checks every converted row passes
    "bad_arguments": "a call's arguments do not parse to a JSON object",
    "unknown_tool": "a call names a function that is not in the row's tools",
    "orphan_tool_result": "a tool result with no call before it that it could answer (none left unanswered in the "
                          "latest assistant turn, or none with its tool_call_id)",
    "no_trained_turn": "no assistant turn to train on (none at all, or every one has weight 0)",
    # the shape of the source row
    "bad_message": "a message or turn with an unknown role, or content that is not text",
    "empty_reply": "an assistant turn with neither text nor calls",
    "bad_weight": "an assistant `weight` other than 0 or 1",
    "bad_call": "a call without a function name",
    "bad_tool_spec": "a tool spec without a name, or with parameters that are not an object",
    "bad_function_call": "a sharegpt function_call / glaive <functioncall> that does not parse",
    "bad_tool_call": "a hermes <tool_call> block that is unclosed or does not parse",
    "bad_call_syntax": "a toolace call list that is not [name(key=literal, ...), ...]",
    "bad_tools_block": "a hermes <tools> block that is unclosed or does not parse",
    "bad_chat": "glaive chat text that does not start with a speaker (USER:, ASSISTANT:, FUNCTION RESPONSE:)",
    "missing_system": "apigen_mt row without its domain policy (`system`)",
    # missing_<column> / bad_json_<column>: a required column is absent / a column is not the JSON list it should be
}


# ----------------------------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------------------------


def parse_json_or_python(text):
    """JSON, else a Python literal (single quotes, True/None) read with ast.literal_eval, never eval. ValueError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"neither JSON nor a Python literal: {text[:80]!r}") from None


def list_column(row, key, required=False):
    """A column that holds a list, given as a list or as a JSON string of one; absent or empty is [] unless required."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise MalformedRow(f"missing_{key}")
        return []
    if isinstance(value, str):
        try:
            value = parse_json_or_python(value)
        except ValueError as err:
            raise MalformedRow(f"bad_json_{key}", str(err)) from None
    if not isinstance(value, list):
        raise MalformedRow(f"bad_json_{key}", f"{key} is not a list")
    return value


def decode_arguments(arguments, python_literals=False):
    """A call's arguments as a dict: a dict as is; a JSON string decoded (twice when it was encoded twice; Python
    literals too where the layout writes them); None = no arguments. MalformedRow("bad_arguments") otherwise."""
    value = {} if arguments is None else arguments
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = parse_json_or_python(value) if python_literals else json.loads(value)
        except ValueError:
            raise MalformedRow("bad_arguments", f"not JSON: {str(arguments)[:80]!r}") from None
    if not isinstance(value, dict):
        raise MalformedRow("bad_arguments", f"not an object: {str(arguments)[:80]!r}")
    return value


def content_text(content, role):
    """A message's text: None -> "", OpenAI content parts -> their text joined. Tool results may be JSON values."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text") or "" for p in content)
    if role == "tool":
        return json.dumps(content, ensure_ascii=False)
    raise MalformedRow("bad_message", f"{role} content is not text: {str(content)[:80]}")


def turn_role(turn, roles):
    """(role, value) of a sharegpt-style turn {from, value}, the role mapped through `roles`."""
    if not isinstance(turn, dict) or turn.get("from") not in roles:
        raise MalformedRow("bad_message", f"unknown turn: {str(turn)[:80]}")
    value = turn.get("value")
    if value is None:
        value = ""
    return roles[turn["from"]], value


def make_call(name, arguments, call_id=None, python_literals=False):
    """A normal-form call; MalformedRow for a missing name or arguments that are not an object."""
    if not isinstance(name, str) or not name.strip():
        raise MalformedRow("bad_call", f"call without a function name: {str(name)[:80]}")
    call = {"type": "function", "function": {"name": name, "arguments": decode_arguments(arguments, python_literals)}}
    if call_id:
        call["id"] = str(call_id)
    return call


def tool_message(content, name=None):
    message = {"role": "tool", "content": content_text(content, "tool")}
    if name:
        message["name"] = name
    return message


# ----------------------------------------------------------------------------------------------------------------
# Tool specs -> JSON-schema function specs
# ----------------------------------------------------------------------------------------------------------------


def strip_nulls(value):
    """Drop None values of dicts, recursively: Arrow fills a key that one row lacks with null when another row has it
    (trl#5118), and ToolACE writes a stray `"required": null`."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def json_schema_types(schema):
    """A parameter schema with BFCL or Python type names ("dict", "float", "int", "List[str]") turned into JSON-schema
    types, recursively through properties, items, additionalProperties and anyOf/oneOf/allOf."""
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if isinstance(kind, str) and kind not in JSON_SCHEMA_TYPES:
        mapped = {"type": BFCL_TO_JSON_SCHEMA[kind]} if kind in BFCL_TO_JSON_SCHEMA else python_type_to_schema(kind)
        schema = {**mapped, **{k: v for k, v in schema.items() if k != "type"}}
    schema = dict(schema)
    if isinstance(schema.get("properties"), dict):
        schema["properties"] = {k: json_schema_types(v) for k, v in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = json_schema_types(schema[key])
    for key in ("items", "anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            schema[key] = [json_schema_types(s) for s in schema[key]]
    return schema


def _is_json_schema(parameters):
    return not parameters or parameters.get("type") in ("object", "dict") or isinstance(parameters.get("properties"), dict)


def tool_spec_to_schema(spec):
    """One tool spec as any layout writes it -> {"type": "function", "function": {name, description, parameters}}.
    Takes the OpenAI wrapper or a bare function; JSON-schema parameters (BFCL types mapped) or xLAM-style
    {param: {"type": "str"}} ones; Arrow's null fills dropped; other keys of the spec dropped."""
    if isinstance(spec, dict) and isinstance(spec.get("function"), dict):
        spec = spec["function"]
    spec = strip_nulls(spec)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise MalformedRow("bad_tool_spec", f"tool without a name: {str(spec)[:80]}")
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise MalformedRow("bad_tool_spec", f"parameters of {spec['name']} is not an object")
    if _is_json_schema(parameters):
        parameters = json_schema_types({**parameters, "type": "object"})
        parameters.setdefault("properties", {})
        required = parameters.get("required")
        parameters["required"] = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
    else:
        parameters = xlam_tool_to_schema({"name": spec["name"], "parameters": parameters})["function"]["parameters"]
    description = spec.get("description") if isinstance(spec.get("description"), str) else ""
    return {"type": "function", "function": {"name": spec["name"], "description": description, "parameters": parameters}}


def tool_name(tool):
    return tool["function"]["name"]


def tools_to_schema(specs):
    """A row's tools, each normalised; the first spec of a name wins."""
    tools, seen = [], set()
    for spec in specs:
        tool = tool_spec_to_schema(spec)
        if tool["function"]["name"] not in seen:
            seen.add(tool["function"]["name"])
            tools.append(tool)
    return tools


# ----------------------------------------------------------------------------------------------------------------
# The checks every converted row passes
# ----------------------------------------------------------------------------------------------------------------


def is_trained(message):
    return message["role"] == "assistant" and message.get("weight") != 0


def check_message(message):
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
        raise MalformedRow("bad_message", str(message)[:80])
    if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
        raise MalformedRow("empty_reply", "an assistant turn with neither text nor calls")


def check_call(call, tool_names):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MalformedRow("bad_call", str(call)[:80])
    if not isinstance(function.get("arguments"), dict):
        raise MalformedRow("bad_arguments", f"{function['name']}: {str(function.get('arguments'))[:80]!r}")
    if function["name"] not in tool_names:
        raise MalformedRow("unknown_tool", function["name"])


def pair_tool_results(messages):
    """{index of each tool message: the call it answers, or None}. A result answers a call of the latest assistant
    turn not answered yet: the one with its tool_call_id when the calls carry ids, else the next in order."""
    pending, pairs = [], {}
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            pending = list(message.get("tool_calls") or [])
        elif message["role"] == "tool":
            wanted = message.get("tool_call_id")
            if wanted and any("id" in call for call in pending):
                match = next((call for call in pending if call.get("id") == wanted), None)
            else:
                match = pending[0] if pending else None
            if match is not None:
                pending.remove(match)
            pairs[index] = match
    return pairs


def check_example(example):
    """The row itself when it passes every check, else MalformedRow with the first failing reason: bad_message,
    empty_reply, bad_call, bad_arguments, unknown_tool, orphan_tool_result, no_trained_turn."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MalformedRow("missing_messages")
    for message in messages:
        check_message(message)
    tool_names = {tool["function"]["name"] for tool in example.get("tools") or []}
    for message in messages:
        for call in message.get("tool_calls") or []:
            check_call(call, tool_names)
    orphans = [index for index, call in pair_tool_results(messages).items() if call is None]
    if orphans:
        raise MalformedRow("orphan_tool_result", f"message {orphans[0]}: {messages[orphans[0]]['content'][:60]!r}")
    if not any(is_trained(m) for m in messages):
        raise MalformedRow("no_trained_turn")
    return example


def name_tool_results(messages):
    """Give each tool message without a name the name of the call it answers."""
    for index, call in pair_tool_results(messages).items():
        if call is not None and not messages[index].get("name"):
            messages[index]["name"] = call["function"]["name"]
    return messages


def finish(messages, tools):
    """The normal-form row of a converter: tool results named after their calls, then every check."""
    return check_example({"messages": name_tool_results(messages), "tools": tools or None})


def unanswered_calls(messages):
    """The calls of the latest assistant turn that no tool message after it answers yet."""
    answered = 0
    for message in reversed(messages):
        if message["role"] == "tool":
            answered += 1
        elif message["role"] == "assistant":
            return (message.get("tool_calls") or [])[answered:]
        else:
            return []
    return []


# ----------------------------------------------------------------------------------------------------------------
# openai / messages
# ----------------------------------------------------------------------------------------------------------------

OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                "function": "tool"}  # "function": the legacy functions API's result message


def weight_of(message):
    """None for a trained turn, 0 for a turn shown but not trained (OpenAI's `weight`)."""
    weight = message.get("weight")
    if weight is None or (weight == 1 and not isinstance(weight, str)):
        return None
    if weight == 0 and not isinstance(weight, str):
        return 0
    raise MalformedRow("bad_weight", f"weight {weight!r}")


def openai_call(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise MalformedRow("bad_call", str(call)[:80])
    return make_call(function.get("name"), function.get("arguments"), call.get("id"))


def openai_assistant(message):
    calls = [openai_call(call) for call in message.get("tool_calls") or []]
    if isinstance(message.get("function_call"), dict):  # the legacy functions API
        calls.append(make_call(message["function_call"].get("name"), message["function_call"].get("arguments")))
    out = {"role": "assistant", "content": content_text(message.get("content"), "assistant")}
    if calls:
        out["tool_calls"] = calls
    if weight_of(message) == 0:
        out["weight"] = 0
    return out


def openai_message(message):
    if not isinstance(message, dict) or message.get("role") not in OPENAI_ROLES:
        raise MalformedRow("bad_message", str(message)[:80])
    role = OPENAI_ROLES[message["role"]]
    if role == "assistant":
        return openai_assistant(message)
    out = {"role": role, "content": content_text(message.get("content"), role)}
    if role == "tool" and message.get("name"):
        out["name"] = message["name"]
    if role == "tool" and message.get("tool_call_id"):
        out["tool_call_id"] = str(message["tool_call_id"])
    return out


def drop_argument_fills(messages, tools):
    """Remove null arguments that the called function does not declare: read from Parquet/Arrow structs, every row's
    argument dicts have the keys of all rows, as nulls (trl#5118)."""
    declared = {tool_name(t): set(t["function"]["parameters"].get("properties", {})) for t in tools}
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call["function"]
            keep = declared.get(function["name"], set(function["arguments"]))
            function["arguments"] = {k: v for k, v in function["arguments"].items() if v is not None or k in keep}
    return messages


def openai_to_messages(row):
    """OpenAI chat fine-tuning rows (`messages` + `tools`; also the legacy `functions` / `function_call`): string
    arguments decoded, `content` null or absent -> "", `weight: 0` kept, `tool_call_id` kept."""
    tools = tools_to_schema(list_column(row, "tools") or list_column(row, "functions"))
    messages = [openai_message(message) for message in list_column(row, "messages", required=True)]
    return finish(drop_argument_fills(messages, tools), tools)


# ----------------------------------------------------------------------------------------------------------------
# sharegpt (LLaMA-Factory) and apigen_mt
# ----------------------------------------------------------------------------------------------------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "call", "observation": "tool", "tool": "tool", "system": "system"}


def sharegpt_calls(value):
    """A function_call turn's value: {"name", "arguments"} or a list of them (parallel calls), as JSON text."""
    try:
        parsed = parse_json_or_python(value) if isinstance(value, str) else value
    except ValueError as err:
        raise MalformedRow("bad_function_call", str(err)) from None
    parsed = parsed if isinstance(parsed, list) else [parsed]
    if not parsed or not all(isinstance(call, dict) for call in parsed):
        raise MalformedRow("bad_function_call", str(value)[:80])
    return [make_call(call.get("name"), call.get("arguments")) for call in parsed]


def add_calls(messages, calls):
    """Calls join the assistant turn just before them (its text, or the calls of an adjacent function_call turn: one
    turn that says something and calls, or parallel calls), else start an assistant turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).extend(calls)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


def observation_messages(value, pending):
    """One observation turn -> tool messages: one per pending call when it holds a JSON list of that many results,
    else one message (named after its call when the conversion finishes)."""
    if len(pending) > 1 and isinstance(value, str):
        try:
            results = json.loads(value)
        except json.JSONDecodeError:
            results = None
        if isinstance(results, list) and len(results) == len(pending):
            return [tool_message(result) for result in results]
    return [tool_message(value)]


def sharegpt_to_messages(row):
    """LLaMA-Factory's sharegpt: `conversations` [{from: human|gpt|function_call|observation|system, value}], `tools`
    (JSON string), optional `system`; a function_call value may be a list of calls (parallel)."""
    tools = tools_to_schema(list_column(row, "tools"))
    system = row.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    for turn in list_column(row, "conversations", required=True):
        role, value = turn_role(turn, SHAREGPT_ROLES)
        if role == "call":
            add_calls(messages, sharegpt_calls(value))
        elif role == "tool":
            messages += observation_messages(value, unanswered_calls(messages))
        else:
            messages.append({"role": role, "content": content_text(value, role)})
    return finish(messages, tools)


def apigen_mt_to_messages(row):
    """Salesforce/APIGen-MT-5k: sharegpt's layout (one call per function_call turn, each followed by its observation,
    `tools` without the wrapper); the domain policy in `system` is required and kept as the system message."""
    if not isinstance(row.get("system"), str) or not row["system"].strip():
        raise MalformedRow("missing_system")
    return sharegpt_to_messages(row)


# ----------------------------------------------------------------------------------------------------------------
# hermes (NousResearch/hermes-function-calling-v1)
# ----------------------------------------------------------------------------------------------------------------

HERMES_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}
TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.S)
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>(.*?)</tool_response>", re.S)


def tool_list_text(text):
    """A <tools> block: a JSON or Python-literal list (or one spec), or one spec per line."""
    try:
        value = parse_json_or_python(text)
    except ValueError:
        try:
            value = [parse_json_or_python(line) for line in text.splitlines() if line.strip()]
        except ValueError as err:
            raise MalformedRow("bad_tools_block", str(err)) from None
    return value if isinstance(value, list) else [value]


def hermes_system(text):
    """(tool specs, the text left) of a system turn that lists tools in <tools>: the boilerplate around the list (the
    lead-in and the call-format instructions, up to the last </tool_call>) is dropped, since the chat template writes
    its own; any text after it is kept."""
    if text.count("<tools>") != len(TOOLS_BLOCK.findall(text)):
        raise MalformedRow("bad_tools_block", "unclosed <tools>")
    specs = [spec for block in TOOLS_BLOCK.findall(text) for spec in tool_list_text(block)]
    tail = text[text.rfind("</tools>") + len("</tools>"):] if "</tools>" in text else ""
    if "</tool_call>" in tail:
        tail = tail[tail.rfind("</tool_call>") + len("</tool_call>"):]
    return specs, tail.strip()


def hermes_call(block):
    try:
        call = parse_json_or_python(block.strip())
    except ValueError as err:
        raise MalformedRow("bad_tool_call", str(err)) from None
    if not isinstance(call, dict):
        raise MalformedRow("bad_tool_call", block[:80])
    return make_call(call.get("name"), call.get("arguments"), python_literals=True)


def hermes_assistant(value):
    blocks = TOOL_CALL_BLOCK.findall(value)
    if value.count("<tool_call>") != len(blocks):
        raise MalformedRow("bad_tool_call", "unclosed <tool_call>")
    if not blocks:
        return {"role": "assistant", "content": value}
    calls = [hermes_call(block) for block in blocks]
    return {"role": "assistant", "content": TOOL_CALL_BLOCK.sub("", value).strip(), "tool_calls": calls}


def hermes_results(value):
    """A tool turn -> one tool message per <tool_response> block {"name", "content"} (the whole text without blocks)."""
    messages = []
    for block in TOOL_RESPONSE_BLOCK.findall(value) or [value]:
        try:
            result = parse_json_or_python(block.strip())
        except ValueError:
            result = None
        if isinstance(result, dict) and "content" in result:
            messages.append(tool_message(result["content"], result.get("name")))
        else:
            messages.append(tool_message(block.strip()))
    return messages


def hermes_to_messages(row):
    """hermes-function-calling-v1: `conversations` [{from: system|human|gpt|tool}] + `tools`. Tools are the column's
    plus those the system prompt lists only there; the boilerplate system prompt is dropped; <tool_call> blocks
    (Python-quoted JSON read too) become calls, <tool_response> blocks tool messages."""
    specs, messages = list_column(row, "tools"), []
    for turn in list_column(row, "conversations", required=True):
        role, value = turn_role(turn, HERMES_ROLES)
        value = content_text(value, role)
        if role == "system" and "<tools>" in value:
            prompt_specs, rest = hermes_system(value)
            specs += prompt_specs
            messages += [{"role": "system", "content": rest}] if rest else []
        elif role == "assistant":
            messages.append(hermes_assistant(value))
        elif role == "tool":
            messages += hermes_results(value)
        else:
            messages.append({"role": role, "content": value})
    return finish(messages, tools_to_schema(specs))


# ----------------------------------------------------------------------------------------------------------------
# glaive (glaiveai/glaive-function-calling-v2)
# ----------------------------------------------------------------------------------------------------------------

GLAIVE_SPEAKER = re.compile(r"(?:^|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]*")
GLAIVE_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
# {"name": "f", "arguments": '<JSON>'}: the arguments are a JSON object in single quotes, and the JSON may hold
# apostrophes ('{"title": "Don't Stop"}'), so the quoted text runs to the last quote before the closing brace.
GLAIVE_QUOTED_CALL = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*\'(?P<arguments>.*)\'\s*\}', re.S)


def glaive_system(text):
    """(function specs, system text to keep) of glaive's `system`: "SYSTEM: <lead-in> -" then every function as an
    indented JSON object (all of them, not only the first). With functions, the lead-in is dropped (it only
    introduces the list the chat template writes itself); without, the text is kept as the system message."""
    text = re.sub(r"^\s*SYSTEM:\s*", "", text or "")
    start = text.find("{")
    if start < 0:
        return [], text.strip()
    specs, position, decoder = [], start, json.JSONDecoder()
    while position < len(text) and text[position] == "{":
        try:
            spec, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise MalformedRow("bad_json_system", str(err)) from None
        specs.append(spec)
        while position < len(text) and text[position].isspace():
            position += 1
    return specs, text[position:].strip()


def glaive_turns(chat):
    """[(role, text)] of glaive's `chat`, <|endoftext|> removed."""
    parts = GLAIVE_SPEAKER.split(chat)
    if parts[0].strip() or len(parts) < 3:
        raise MalformedRow("bad_chat", chat[:80])
    return [(GLAIVE_ROLES[speaker], text.replace("<|endoftext|>", "").strip())
            for speaker, text in zip(parts[1::2], parts[2::2])]


def glaive_call(text):
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        call = None
    if isinstance(call, dict) and "name" in call:
        return make_call(call["name"], call.get("arguments"))
    match = GLAIVE_QUOTED_CALL.fullmatch(text)
    if not match:
        raise MalformedRow("bad_function_call", text[:80])
    return make_call(match["name"], match["arguments"])


def glaive_assistant(text):
    if "<functioncall>" not in text:
        return {"role": "assistant", "content": text}
    prose, _, call = text.partition("<functioncall>")
    return {"role": "assistant", "content": prose.strip(), "tool_calls": [glaive_call(call.strip())]}


def glaive_to_messages(row):
    """glaive-function-calling-v2: `system` (the functions) + `chat` text (USER: / ASSISTANT: <functioncall> ... /
    FUNCTION RESPONSE:). Single-quoted argument strings are parsed as JSON without stripping quotes."""
    chat = row.get("chat")
    if not isinstance(chat, str) or not chat.strip():
        raise MalformedRow("missing_chat")
    specs, system = glaive_system(row.get("system"))
    messages = [{"role": "system", "content": system}] if system else []
    for role, text in glaive_turns(chat):
        if role == "assistant":
            messages.append(glaive_assistant(text))
        elif role == "tool":
            messages.append(tool_message(text))
        else:
            messages.append({"role": "user", "content": text})
    return finish(messages, tools_to_schema(specs))


# ----------------------------------------------------------------------------------------------------------------
# toolace (Team-ACE/ToolACE): Python-syntax call lists, read with ast (never eval)
# ----------------------------------------------------------------------------------------------------------------

TOOLACE_ROLES = {"user": "user", "assistant": "assistant", "tool": "tool", "system": "system"}
CALL_LIST_START = re.compile(r"\s*\[\s*[A-Za-z_][\w .\-]*\(")
CALL_NAME = re.compile(r"[A-Za-z_][\w .\-]*")
_LITERAL_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


def _literal(node):
    """The value of a literal expression node: constants, lists, tuples, sets, dicts, signed numbers, and the
    names true/false/null/True/False/None. ValueError for anything else (no name lookups, no calls)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")


def _closing_paren(text, start):
    """Index of the ')' that closes the '(' at `start`, skipping quoted strings."""
    depth, index, quote = 0, start, None
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise ValueError("unbalanced parentheses")


def _keyword_arguments(text):
    call = ast.parse(f"f({text})", mode="eval").body
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        raise ValueError("positional arguments")
    return {keyword.arg: _literal(keyword.value) for keyword in call.keywords}


def parse_python_calls(text):
    """'[Get Weather(city="Zürich"), B(x=1)]' -> [("Get Weather", {"city": "Zürich"}), ("B", {"x": 1})]. Names may
    contain spaces, dots and hyphens; arguments must be keyword=literal. ValueError (or SyntaxError) otherwise."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError("not a [...] list")
    body, calls, index = body[1:-1], [], 0
    while True:
        while index < len(body) and (body[index].isspace() or (body[index] == "," and calls)):
            index += 1
        if index >= len(body):
            return calls
        paren = body.find("(", index)
        name = body[index:paren].strip() if paren >= 0 else ""
        if not CALL_NAME.fullmatch(name):
            raise ValueError(f"no function name at {body[index:index + 40]!r}")
        close = _closing_paren(body, paren)
        calls.append((name, _keyword_arguments(body[paren + 1:close])))
        index = close + 1
        rest = body[index:].lstrip()
        if rest and not rest.startswith(","):
            raise ValueError(f"unexpected text after a call: {rest[:40]!r}")


def toolace_system(text):
    """(function specs, system text to keep): the system prompt lists the functions as a JSON list after ToolACE's
    fixed instructions for its Python-syntax output; the normal form replaces those, so the turn is dropped."""
    match = re.search(r"\[\s*\{", text or "")
    if not match:
        return [], (text or "").strip()
    try:
        specs, _ = json.JSONDecoder().raw_decode(text, match.start())
    except json.JSONDecodeError as err:
        raise MalformedRow("bad_json_system", str(err)) from None
    return specs, ""


def toolace_assistant(value):
    if not CALL_LIST_START.match(value):
        return {"role": "assistant", "content": value}
    try:
        calls = parse_python_calls(value)
    except (ValueError, SyntaxError) as err:
        raise MalformedRow("bad_call_syntax", f"{err}: {value[:80]!r}") from None
    return {"role": "assistant", "content": "", "tool_calls": [make_call(name, args) for name, args in calls]}


def toolace_results(value):
    """A tool turn: a JSON list of {"name", "results"} -> one tool message each (else the whole text)."""
    try:
        results = json.loads(value)
    except json.JSONDecodeError:
        results = None
    if isinstance(results, list) and results and all(isinstance(r, dict) and "results" in r for r in results):
        return [tool_message(r["results"], r.get("name")) for r in results]
    return [tool_message(value)]


def toolace_to_messages(row):
    """Team-ACE/ToolACE: `system` (instructions + a JSON list of functions with BFCL types such as "dict" and a stray
    `"required": null`) + `conversations` [{from: user|assistant|tool}], calls as `[Func Name(a="x"), B(y=1)]`."""
    specs, system = toolace_system(row.get("system"))
    messages = [{"role": "system", "content": system}] if system else []
    for turn in list_column(row, "conversations", required=True):
        role, value = turn_role(turn, TOOLACE_ROLES)
        value = content_text(value, role)
        if role == "assistant":
            messages.append(toolace_assistant(value))
        elif role == "tool":
            messages += toolace_results(value)
        else:
            messages.append({"role": role, "content": value})
    return finish(messages, tools_to_schema(specs))


# ----------------------------------------------------------------------------------------------------------------
# xlam, the table, format detection, a whole source
# ----------------------------------------------------------------------------------------------------------------


def xlam_row_to_messages(row):
    """xlam-function-calling-60k rows through chat_formats.xlam_to_messages, then the same checks."""
    example = xlam_to_messages(row)
    return finish(example["messages"], example["tools"])


CONVERTERS = {
    "openai": openai_to_messages,
    "messages": openai_to_messages,  # the generic conversational format: same rules (arguments decoded, weight kept)
    "sharegpt": sharegpt_to_messages,
    "hermes": hermes_to_messages,
    "glaive": glaive_to_messages,
    "toolace": toolace_to_messages,
    "apigen_mt": apigen_mt_to_messages,
    "xlam": xlam_row_to_messages,
}
FORMATS = ("auto", *CONVERTERS)
NOT_CONVERSATIONAL = ("prompt_completion", "dolly")  # detect_format names them; training_data converts them


def conversations_format(row):
    """sharegpt, hermes or toolace, for a `conversations` row whose columns do not say which."""
    turns = row.get("conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            turns = []
    turns = [t for t in turns or [] if isinstance(t, dict)]
    speakers = {t.get("from") for t in turns}
    text = " ".join(str(t.get("value")) for t in turns)
    if speakers & {"function_call", "observation"}:
        return "sharegpt"
    if "<tool_call>" in text or "<tools>" in text:
        return "hermes"
    if speakers & {"assistant", "user"} and (CALL_LIST_START.search(text) or "[{" in str(row.get("system"))):
        return "toolace"
    return "sharegpt"


def detect_format(columns, first_row=None):
    """The layout of a dataset from its column names; where columns alone are ambiguous (several layouts read
    `conversations`), from its first row when given. ValueError when nothing fits. apigen_mt is never guessed: its
    columns are sharegpt's, and sharegpt converts it the same way (without requiring the policy)."""
    cols = set(columns)
    if {"query", "tools", "answers"} <= cols:
        return "xlam"
    if "messages" in cols:
        return "openai"
    if {"system", "chat"} <= cols:
        return "glaive"
    if "conversations" in cols:
        if cols & {"category", "subcategory", "task"}:
            return "hermes"
        if first_row is not None:
            return conversations_format(first_row)
        return "toolace" if "system" in cols and "tools" not in cols else "sharegpt"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "response"} <= cols:
        return "dolly"
    raise ValueError(f"cannot tell the data format from the columns {sorted(cols)}: set format to one of {FORMATS}")


def resolve_format(dataset_format, columns, first_row=None):
    """The concrete format for a recipe's `format`: "auto" detected, a known name as is; ValueError otherwise."""
    if dataset_format == "auto":
        return detect_format(columns, first_row)
    if dataset_format not in CONVERTERS and dataset_format not in NOT_CONVERSATIONAL:
        raise ValueError(f"format '{dataset_format}' is not one of {FORMATS + NOT_CONVERSATIONAL}")
    return dataset_format


@dataclass
class Conversion:
    """One source converted: its format (detected when "auto"), the rows that passed, and the skipped ones counted
    per reason with the first offending row of each."""

    format: str
    examples: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_bad: dict = field(default_factory=dict)


def convert_rows(rows, dataset_format="auto"):
    """Every row of a source (a datasets.Dataset or a list of dicts) converted to the normal form."""
    first = next(iter(rows), None)
    columns = getattr(rows, "column_names", None) or list(first or {})
    result = Conversion(resolve_format(dataset_format, columns, first))
    if result.format not in CONVERTERS:
        raise ValueError(f"format '{result.format}' is not conversational: training_data converts it")
    convert = CONVERTERS[result.format]
    for index, row in enumerate(rows):
        try:
            result.examples.append(convert(row))
        except MalformedRow as err:
            result.skipped[err.reason] += 1
            result.first_bad.setdefault(err.reason, f"row {index}: {err}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Transforms on normal-form rows: pure functions of the row and a random.Random
# ----------------------------------------------------------------------------------------------------------------


def called_names(example):
    return {call["function"]["name"] for m in example["messages"] for call in m.get("tool_calls") or []}


def is_single_call(example):
    """One user turn and one assistant turn, which calls (system turns aside): what irrelevance and extra tools take."""
    turns = [m for m in example["messages"] if m["role"] != "system"]
    return [m["role"] for m in turns] == ["user", "assistant"] and bool(turns[1].get("tool_calls"))


def tool_pool(examples):
    """Every distinct tool (by name) of the rows, first spec of each name: what irrelevance and extra tools draw from."""
    pool = {}
    for example in examples:
        for tool in example.get("tools") or []:
            pool.setdefault(tool_name(tool), tool)
    return list(pool.values())


def random_identifier(rng, low, high, taken):
    """A new identifier of low-high characters (letter first), not in `taken`, which it joins."""
    while True:
        name = rng.choice(string.ascii_lowercase) + "".join(
            rng.choices(string.ascii_lowercase + string.digits + "_", k=rng.randint(low, high) - 1))
        if name not in taken:
            taken.add(name)
            return name


def _masked_tool(tool, names, params):
    function = tool["function"]
    mapping = params[function["name"]]
    parameters = dict(function["parameters"])
    parameters["properties"] = {mapping[p]: spec for p, spec in parameters.get("properties", {}).items()}
    parameters["required"] = [mapping.get(p, p) for p in parameters.get("required", [])]
    return {**tool, "function": {**function, "name": names[function["name"]], "parameters": parameters}}


def _masked_call(call, names, params):
    name = call["function"]["name"]
    mapping = params.get(name, {})
    arguments = {mapping.get(k, k): v for k, v in call["function"]["arguments"].items()}
    return {**call, "function": {"name": names.get(name, name), "arguments": arguments}}


def _masked_message(message, names, params):
    if message.get("tool_calls"):
        return {**message, "tool_calls": [_masked_call(call, names, params) for call in message["tool_calls"]]}
    if message["role"] == "tool" and message.get("name"):
        return {**message, "name": names.get(message["name"], message["name"])}
    return message


def mask_functions(example, rng):
    """Every function name -> random 5-15 characters and every parameter name -> random 4-10, the same in the tool
    list, in every call of every assistant turn and in the tool results' names (Hammer's function masking, across
    all turns of the conversation). A new row; the input is not changed."""
    tools, taken = example.get("tools") or [], set()
    names = {tool_name(t): random_identifier(rng, 5, 15, taken) for t in tools}
    params = {tool_name(t): {p: random_identifier(rng, 4, 10, taken) for p in t["function"]["parameters"].get("properties", {})}
              for t in tools}
    return {**example, "tools": [_masked_tool(t, names, params) for t in tools] or None,
            "messages": [_masked_message(m, names, params) for m in example["messages"]]}


def make_irrelevant(example, rng, pool, reply=NO_TOOL_FITS_REPLY):
    """A single-call row made "no listed tool fits": the called tools leave the list (1-3 other tools from `pool`
    listed if none is left) and the answer becomes `reply`, no call. None for other rows, or with nothing to list."""
    if not is_single_call(example):
        return None
    called = called_names(example)
    tools = [t for t in example["tools"] if tool_name(t) not in called]
    if not tools:
        others = [t for t in pool if tool_name(t) not in called]
        tools = rng.sample(others, min(len(others), rng.randint(1, 3)))
    if not tools:
        return None
    messages = [{"role": "assistant", "content": reply} if m["role"] == "assistant" else m for m in example["messages"]]
    return {**example, "messages": messages, "tools": tools}


def add_extra_tools(example, rng, pool, n):
    """A single-call row with n tools from `pool` (none sharing a listed name) shuffled into its list. None for other
    rows."""
    if not is_single_call(example):
        return None
    listed = {tool_name(t) for t in example["tools"]}
    candidates = [t for t in pool if tool_name(t) not in listed]
    tools = example["tools"] + rng.sample(candidates, min(n, len(candidates)))
    rng.shuffle(tools)
    return {**example, "tools": tools}


def user_texts(example):
    """Every user turn's text of a conversation, for decontamination (a row is dropped if any turn matches)."""
    return [m["content"] for m in example["messages"] if m["role"] == "user" and isinstance(m.get("content"), str)]


def complexity(example):
    """(calls in the conversation, at least 1; tools listed): the curriculum's sort key, as for `messages` rows."""
    calls = sum(len(m.get("tool_calls") or []) for m in example["messages"])
    return max(calls, 1), len(example.get("tools") or [])


def untrained_turns(example):
    """How many assistant turns carry weight 0 (shown as context, not trained)."""
    return sum(1 for m in example["messages"] if m["role"] == "assistant" and m.get("weight") == 0)


# ----------------------------------------------------------------------------------------------------------------
# What the model is shown and trained on
# ----------------------------------------------------------------------------------------------------------------

GENERATION_BLOCK = re.compile(r"(\{%-?\s*generation\s*-?%\})(.*?)(\{%-?\s*endgeneration\s*-?%\})", re.S)
JINJA_COMMENT = re.compile(r"(\{#.*?#\})", re.S)


def weighted_training_template(training_template):
    """A training chat template (one with {% generation %} markers, e.g. TRL's get_training_chat_template for
    Qwen2.5) that leaves assistant messages with `weight: 0` out of the assistant mask: each generation block is
    rendered without the markers when `message.weight == 0`. The rendered text does not change, so TRL's own
    assistant_only_loss (labels -100 outside the mask) trains every other assistant turn and not those.
    ValueError when the template has no generation block inside a loop over `message`."""
    parts = JINJA_COMMENT.split(training_template)  # comments may mention the markers: leave them as they are
    blocks = [block for part in parts if not part.startswith("{#") for block in GENERATION_BLOCK.findall(part)]
    if not blocks or not all("message" in body for _, body, _ in blocks):
        raise ValueError("the chat template has no {% generation %} block over `message`: weight 0 cannot be honoured")

    def weigh(match):
        start, body, end = match.groups()
        return ("{%- if message.weight is defined and message.weight == 0 %}" + body + "{%- else %}"
                + start + body + end + "{%- endif %}")

    return "".join(part if part.startswith("{#") else GENERATION_BLOCK.sub(weigh, part) for part in parts)


def to_trainable_text_check(example, tokenizer, **template_kwargs):
    """The text the model is shown for a normal-form row: the tokenizer's chat template over its messages and tools
    (`tools` may be the JSON string the training dataset stores)."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tokenizer.apply_chat_template(example["messages"], tools=tools or None, tokenize=False, **template_kwargs)
