"""BFCL entries -> what the model is shown: chat messages + JSON-schema tools for the model's chat template, or the
exact prompt text the official leaderboard harness writes for the model's family. Scoring the answers is
bfcl_checker.py's job.
"""

import copy
import json

from fcsft.bfcl_checker import bfcl_language

# ----------------------------------------------------------------------------------------------------------------
# BFCL prompts: what the model is shown for a BFCL entry (the scorer is bfcl_checker.py)
# ----------------------------------------------------------------------------------------------------------------

# BFCL parameter types -> JSON-schema types, for FC-mode tool lists (the official GORILLA_TO_OPENAPI).
BFCL_TO_JSON_SCHEMA = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
    "any": "string", "byte": "integer", "short": "integer", "long": "integer", "double": "number", "char": "string",
    "ArrayList": "array", "Array": "array", "HashMap": "object", "Hashtable": "object", "Queue": "array",
    "Stack": "array", "Any": "string", "String": "string", "Bigint": "integer",
}


def add_language_hints(functions, category):
    """Copy of `functions` with BFCL's language hint appended to each description, exactly as the official harness
    does before any handler sees them (bfcl_eval/utils.py, _func_doc_language_specific_pre_processing). Java and
    JavaScript parameters become strings: the model writes Java/JS source text, which the checker converts back."""
    functions = copy.deepcopy(functions)
    language = bfcl_language(category)
    hint = {"java": " Note that the provided function is in Java 8 SDK syntax.",
            "javascript": " Note that the provided function is in JavaScript syntax."}.get(
        language, " Note that the provided function is in Python 3 syntax.")
    lang_name = {"java": "Java", "javascript": "JavaScript"}.get(language)
    list_types = {"java": ("ArrayList", "Array"), "javascript": ("array",)}.get(language)
    for function in functions:
        function["description"] = function.get("description", "") + hint
        if lang_name is None:
            continue
        for spec in function["parameters"]["properties"].values():
            spec.setdefault("description", "")
            if spec["type"] == "any":
                spec["description"] += (f" This parameter can be of any type of {lang_name} object in string"
                                        " representation.")
            else:
                spec["description"] += f" This is {lang_name} {spec['type']} type parameter in string representation."
            if spec["type"] in list_types:
                spec["description"] += (f" The list elements are of type {spec['items']['type']}; they are not in"
                                        " string representation.")
                del spec["items"]
            if language == "javascript" and spec["type"] == "dict" and "properties" in spec:
                spec["description"] += (" The dictionary entries have the following schema; they are not in string"
                                        f" representation. {json.dumps(spec['properties'])}")
                del spec["properties"]
            spec["type"] = "string"
    return functions


def _properties_to_json_schema(properties):
    for spec in properties.values():
        bfcl_type = spec.get("type")
        if bfcl_type == "float":
            spec["format"] = "float"
            spec["description"] = spec.get("description", "") + " This is a float type value."
        spec["type"] = BFCL_TO_JSON_SCHEMA.get(bfcl_type, "string")
        if spec["type"] in ("array", "object"):
            if "properties" in spec:
                spec["properties"] = _properties_to_json_schema(spec["properties"])
            elif "items" in spec:
                items = spec["items"]
                items["type"] = BFCL_TO_JSON_SCHEMA.get(items.get("type"), "string")
                if items["type"] == "array" and "items" in items:
                    items["items"]["type"] = BFCL_TO_JSON_SCHEMA.get(items["items"].get("type"), "string")
                elif items["type"] == "object" and "properties" in items:
                    items["properties"] = _properties_to_json_schema(items["properties"])
    return properties


def bfcl_functions_to_tools(functions, category):
    """BFCL function docs -> OpenAI-style tools for `apply_chat_template(tools=...)`, converted as the official
    FC handlers do (language hints, then convert_to_tool: dict->object, float->number + format, tuple->array, ...).
    Names keep their dots: Qwen-style templates accept them, and the checker then compares names verbatim."""
    tools = []
    for function in add_language_hints(functions, category):
        function["parameters"]["type"] = "object"
        function["parameters"]["properties"] = _properties_to_json_schema(function["parameters"]["properties"])
        tools.append({"type": "function", "function": function})
    return tools


# BFCL's default system prompt for prompt-mode models (ret_fmt=python, func_doc_fmt=json, plaintext, classic).
BFCL_PROMPT_MODE_SYSTEM = (
    "You are an expert in composing functions."
    "You are given a question and a set of possible functions. Based on the question, you will need to make one or "
    "more function/tool calls to achieve the purpose. If none of the functions can be used, point it out. If the "
    "given question lacks the parameters required by the function, also point it out.\n\n"
    "You should only return the function calls in your response.\n\nIf you decide to invoke any of the function(s), "
    "you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), "
    "func_name2(params)].  You SHOULD NOT include any other text in the response.\n\n"
    "At each turn, you should try your best to complete the tasks requested by the user within the current turn. "
    "Continue to output functions to call until you have fulfilled the user's request to the best of your ability. "
    "Once you have no more functions to call, the system will consider the current turn complete and proceed to the "
    "next turn or task.\n\n"
    "Here is a list of functions in json format that you can invoke.\n{functions}\n"
)


def bfcl_chat(entry, category, mode="fc"):
    """(messages, tools) for one BFCL entry. mode "fc": the functions go to the chat template as tools; mode
    "prompt": BFCL's default system prompt lists them and asks for a Python-style call list, no tools."""
    messages = copy.deepcopy(entry["question"][0])  # single-turn categories have exactly one turn
    if mode == "fc":
        return messages, bfcl_functions_to_tools(entry["function"], category)
    system = BFCL_PROMPT_MODE_SYSTEM.format(functions=json.dumps(add_language_hints(entry["function"], category), indent=4))
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = system + "\n\n" + messages[0]["content"]
    else:
        messages.insert(0, {"role": "system", "content": system})
    return messages, None


# --- The official harness's prompt text (--prompt-format bfcl) -------------------------------------------------------
# The leaderboard does not render local models' prompts through their chat templates: each family's handler
# (bfcl_eval/model_handler/local_inference/*.py, `_format_prompt`) writes the text by hand, from the function docs
# with only the language hints above (BFCL's own types such as "dict" and "float", no {"type": "function"} wrapper,
# json.dumps with ASCII escapes, no default system message). The functions below write the same text for the pinned
# bfcl-eval 2026.3.23; tests/test_bfcl_prompts.py requires byte identity with its handlers on all 3,641 single-turn
# entries. To add a family (Llama 3.x, Hammer, xLAM, ...): one function (messages, functions) -> text written from
# its handler, an entry in BFCL_PROMPT_BUILDERS, a rule in bfcl_family(), and the handler in the identity test.

QWEN_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                     "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")


def _is_tool_response(content):
    return content.startswith("<tool_response>") and content.endswith("</tool_response>")


def _qwen_turns(messages, render_tool_calls):
    """The turns after the system block, as the official Qwen handlers write them (Qwen3's template, by hand)."""
    last_query = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"
                       and isinstance(messages[i]["content"], str) and not _is_tool_response(messages[i]["content"])),
                      len(messages) - 1)
    text = ""
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "user" or (role == "system" and i != 0):
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        elif role == "assistant":
            reasoning = message.get("reasoning_content") or ""
            if not reasoning and "</think>" in content:
                parts = content.split("</think>")
                reasoning = parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = parts[-1].lstrip("\n")
            if i > last_query and (i == len(messages) - 1 or reasoning):
                text += f"<|im_start|>{role}\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            else:
                text += f"<|im_start|>{role}\n{content}"
            for call in message.get("tool_calls", []) if render_tool_calls else []:
                if (call == message["tool_calls"][0] and content) or call != message["tool_calls"][0]:  # as written there
                    text += "\n"
                call = call.get("function", call)
                arguments = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"])
                text += f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'
            text += "<|im_end|>\n"
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                text += "<|im_start|>user"
            text += f"\n<tool_response>\n{content}\n</tool_response>"
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                text += "<|im_end|>\n"
    return text


def qwen_fc_prompt(messages, functions):
    """QwenFCHandler (qwen_fc.py; registered for Qwen3 FC models, and what a Qwen2.5 FC entry uses): a system turn
    with the entry's own system text, then "# Tools" and one json.dumps(function) per line, then the turns."""
    text = ""
    if functions:
        text += "<|im_start|>system\n"
        if messages[0]["role"] == "system":
            text += messages[0]["content"] + "\n\n"
        text += QWEN_TOOLS_HEADER + "".join(f"\n{json.dumps(function)}" for function in functions) + QWEN_TOOLS_FOOTER
    elif messages[0]["role"] == "system":
        text += f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n"
    return text + _qwen_turns(messages, render_tool_calls=True) + "<|im_start|>assistant\n"


def qwen_prompt(messages, functions):
    """QwenHandler (qwen.py, prompt mode): the functions are already in BFCL's system prompt (see bfcl_chat)."""
    text = f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n" if messages[0]["role"] == "system" else ""
    return text + _qwen_turns(messages, render_tool_calls=False) + "<|im_start|>assistant\n"


BFCL_PROMPT_BUILDERS = {("qwen", "fc"): qwen_fc_prompt, ("qwen", "prompt"): qwen_prompt}

# Hammer and xLAM-2 models are Qwen2/Llama architectures with official handlers of their own, so their hub ids are
# recognised by organisation; any other model (a local fine-tune included) by its config's model_type.
_FAMILY_BY_HUB_ORGANISATION = {"madeagents": "hammer", "salesforce": "xlam"}
_FAMILY_BY_MODEL_TYPE = {"qwen2": "qwen", "qwen3": "qwen", "qwen2_moe": "qwen", "qwen3_moe": "qwen", "llama": "llama"}


def bfcl_family(model_name, model_type):
    """The official handler family for a model, or None when unknown."""
    organisation = str(model_name).split("/")[0].lower() if str(model_name).count("/") == 1 else ""
    return _FAMILY_BY_HUB_ORGANISATION.get(organisation) or _FAMILY_BY_MODEL_TYPE.get(model_type)


def bfcl_prompt(entry, category, mode, family):
    """The exact prompt text the official harness feeds a model of `family` for one single-turn entry."""
    if mode == "prompt":
        messages, _ = bfcl_chat(entry, category, mode="prompt")
    else:
        messages = copy.deepcopy(entry["question"][0])
    return BFCL_PROMPT_BUILDERS[(family, mode)](messages, add_language_hints(entry["function"], category))
