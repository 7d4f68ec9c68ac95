"""Training rows -> what the model is shown: TRL's conversational rows (messages + JSON-schema tools) or
prompt/completion pairs.

xLAM rows (Python-style tool specs, JSON answers) become JSON-schema tools and OpenAI-style assistant `tool_calls`,
so the model's own chat template renders them exactly as at inference (bfcl_prompts.py does the same for BFCL
entries). `messages` and prompt/completion rows are checked; Dolly rows become prompt/completion pairs.
"""

import json
import re

# ----------------------------------------------------------------------------------------------------------------
# xLAM -> chat messages
# ----------------------------------------------------------------------------------------------------------------


class MalformedRow(ValueError):
    """A data row that cannot be trained on; `reason` is the short key it is counted under."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_PY_SCALARS = {
    "str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
    "number": "number", "bool": "boolean", "boolean": "boolean", "any": "string", "object": "object",
    "dict": "object", "list": "array", "array": "array", "tuple": "array", "set": "array", "none": "null",
}


def _split_top_level(text):
    """Split 'int, List[str], Dict[str, Any]' on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def python_type_to_schema(type_str):
    """'List[int]' -> {"type": "array", "items": {"type": "integer"}}. Unknown names become strings."""
    text = type_str.strip()
    match = re.fullmatch(r"([A-Za-z_.]+)\s*(?:\[(.*)\])?", text, re.S)
    if not match:
        return {"type": "string"}
    name, inner = match.group(1).split(".")[-1].lower(), match.group(2)
    args = _split_top_level(inner) if inner else []
    if name == "optional" and args:
        return python_type_to_schema(args[0])
    if name == "union" and args:
        non_null = [a for a in args if a.lower() != "none"]
        return python_type_to_schema(non_null[0]) if len(non_null) == 1 else {"anyOf": [python_type_to_schema(a) for a in non_null]}
    if name == "literal" and args:
        values = [json.loads(a.replace("'", '"')) if a[:1] in "'\"" else a for a in args]
        return {"type": "string", "enum": values}
    if name in ("list", "set", "sequence", "iterable") and args:
        return {"type": "array", "items": python_type_to_schema(args[0])}
    if name == "tuple" and args:
        return {"type": "array", "items": python_type_to_schema(args[0])}
    if name in ("dict", "mapping") and len(args) == 2:
        return {"type": "object", "additionalProperties": python_type_to_schema(args[1])}
    if name == "callable":
        return {"type": "string"}
    return {"type": _PY_SCALARS.get(name, "string")}


def xlam_tool_to_schema(tool):
    """One xLAM tool spec -> an OpenAI/JSON-schema tool the chat template renders with `tools=`."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise MalformedRow("bad_tool_spec", f"tool without a name: {str(tool)[:80]}")
    params = tool.get("parameters") or {}
    if not isinstance(params, dict):
        raise MalformedRow("bad_tool_spec", f"parameters of {tool['name']} is not an object")
    # Some rows already carry JSON schema ({"type": "object", "properties": ...}): keep it as is.
    if params.get("type") in ("object", "dict") and isinstance(params.get("properties"), dict):
        schema = {"type": "object", "properties": params["properties"], "required": list(params.get("required", []))}
    else:
        properties, required = {}, []
        for pname, spec in params.items():
            if not isinstance(spec, dict):
                raise MalformedRow("bad_tool_spec", f"parameter {tool['name']}.{pname} is not an object")
            raw_type = str(spec.get("type", "str"))
            optional = bool(re.search(r",\s*optional\s*$", raw_type)) or raw_type.startswith("Optional[")
            prop = python_type_to_schema(re.sub(r",\s*optional\s*$", "", raw_type))
            if spec.get("description"):
                prop["description"] = spec["description"]
            if "default" in spec:
                prop["default"] = spec["default"]
            properties[pname] = prop
            if not optional and "default" not in spec:
                required.append(pname)
        schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description", ""), "parameters": schema}}


def _load_json_field(row, key):
    if key not in row or row[key] is None:
        raise MalformedRow(f"missing_{key}")
    value = row[key]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise MalformedRow(f"bad_json_{key}", str(err)) from None
    if not isinstance(value, list):
        raise MalformedRow(f"bad_json_{key}", f"{key} is not a list")
    return value


# The assistant's reply when no listed tool fits (an xLAM row with `answers: []`, the form of the public
# xlam-irrelevance-7.5k set): plain text, no tool call, which is what BFCL's irrelevance categories reward.
NO_TOOL_FITS_REPLY = "None of the available functions can do this, so I cannot make a call for this request."


def parse_xlam_row(row):
    """{query, tools, answers} with the JSON fields decoded; MalformedRow when a field is missing or not a list."""
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        raise MalformedRow("missing_query")
    return {"query": query, "tools": _load_json_field(row, "tools"), "answers": _load_json_field(row, "answers")}


def xlam_to_messages(row, no_call_reply=NO_TOOL_FITS_REPLY):
    """An xLAM row {query, tools, answers} -> {"messages": [user, assistant(tool_calls)], "tools": [...]}.

    An empty `answers` list means no listed tool fits: the assistant replies `no_call_reply` in plain text.
    Raises MalformedRow for bad JSON, missing fields, or an answer calling a tool that is not listed.
    """
    parsed = parse_xlam_row(row)
    query, answers = parsed["query"], parsed["answers"]
    tools = [xlam_tool_to_schema(t) for t in parsed["tools"]]
    if not tools:
        raise MalformedRow("no_tools")
    if not answers:
        return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": no_call_reply}],
                "tools": tools}
    names = {t["function"]["name"] for t in tools}
    tool_calls = []
    for call in answers:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments", {}), dict):
            raise MalformedRow("bad_answer_shape", str(call)[:80])
        if call["name"] not in names:
            raise MalformedRow("unknown_tool", call["name"])
        tool_calls.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
    return {
        "messages": [
            {"role": "user", "content": query},
            {"role": "assistant", "content": "", "tool_calls": tool_calls},
        ],
        "tools": tools,
    }


def check_messages_row(row):
    """Validate a row of the generic conversational format; returns it with `tools` decoded."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MalformedRow("missing_messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise MalformedRow("bad_message", str(message)[:80])
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRow("no_assistant_turn")
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise MalformedRow("bad_json_tools", str(err)) from None
    return {"messages": messages, "tools": tools or None}


def check_prompt_completion_row(row):
    prompt, completion = row.get("prompt"), row.get("completion")
    if not prompt:
        raise MalformedRow("missing_prompt")
    if not completion:
        raise MalformedRow("missing_completion")
    return {"prompt": prompt, "completion": completion}


DOLLY_PROMPT = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"


def dolly_to_prompt_completion(row):
    """A Dolly-15k row {instruction, context, response} -> prompt/completion (OPT has no chat template)."""
    instruction, response = (row.get("instruction") or "").strip(), (row.get("response") or "").strip()
    if not instruction:
        raise MalformedRow("empty_instruction")
    if not response:
        raise MalformedRow("empty_response")
    context = (row.get("context") or "").strip()
    context_block = f"### Context:\n{context}\n\n" if context else ""
    return {"prompt": DOLLY_PROMPT.format(instruction=instruction, context_block=context_block), "completion": response}
