"""BFCL scoring: decode a model's raw output into calls and check them as the official leaderboard does.

Our own implementation of the Berkeley Function-Calling Leaderboard's single-turn rules, as in bfcl-eval 2026.3.23
(model_handler/utils.py, eval_checker/eval_runner.py, eval_checker/ast_eval/ast_checker.py and its Java/JavaScript
type converters). tests/test_bfcl_checker.py requires the official code's verdict on every candidate of a large
corpus, so the odd corners below are deliberate: "fixing" one moves scores away from the leaderboard's. Where the
official code would crash on an output, score_bfcl_entry reports it invalid instead. Model output is parsed (json,
ast), never evaluated.
"""

import ast
import json
import operator
import re

# The Python type a decoded value must have, per declared BFCL type and language.
BFCL_PYTHON_TYPES = {
    "string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list, "dict": dict,
    "any": str,
}
BFCL_JAVA_TYPES = {
    "byte": int, "short": int, "integer": int, "float": float, "double": float, "long": int, "boolean": bool,
    "char": str, "Array": list, "ArrayList": list, "Set": set, "HashMap": dict, "Hashtable": dict, "Queue": list,
    "Stack": list, "String": str, "any": str,
}
BFCL_JS_TYPES = {
    "String": str, "integer": int, "float": float, "Bigint": int, "Boolean": bool, "dict": dict, "array": list,
    "any": str,
}
_LIST_TYPES_WITH_ITEMS = ("Array", "ArrayList", "array")  # Java/JS types whose items are converted one by one


def bfcl_language(category):
    """The language a category's functions are written in; BFCL decides by the category name."""
    if "javascript" in category:
        return "javascript"
    return "java" if "java" in category else "python"


def is_relevance_category(category):
    """irrelevance / live_irrelevance / live_relevance: only whether a call was made is scored."""
    return "relevance" in category  # also matches "irrelevance"



# --- Decoding model output into [{function_name: {param: value}}] --------------------------------------------------


class DecodeError(ValueError):
    """The model output is not a call list in the decoder's format."""


def decode_qwen_tool_calls(text):
    """The official Qwen FC handler: every `<tool_call>\\n{json}\\n</tool_call>` block, unparsable blocks skipped.
    No block at all decodes to [] (no call)."""
    calls = []
    for block in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL):
        try:
            calls.append(json.loads(block))
        except Exception:  # noqa: BLE001 - the official handler skips any block that fails to parse
            continue
    decoded = []
    for call in calls:
        if not isinstance(call, dict):
            raise DecodeError(f"tool call is not a JSON object: {str(call)[:200]}")
        if "name" not in call or not isinstance(call.get("arguments"), dict):
            raise DecodeError(f"tool call without a name or an arguments object: {str(call)[:200]}")
        if isinstance(call["name"], (list, dict)):
            raise DecodeError(f"tool call name is not a scalar: {str(call)[:200]}")
        decoded.append({call["name"]: dict(call["arguments"])})
    return decoded


def decode_xlam_json(text):
    """The official xLAM handler: a JSON array of {"name", "arguments"} (a single object is a list of one);
    failing that, `;`-separated JSON objects."""
    try:
        calls = json.loads(text)
        if not isinstance(calls, list):
            calls = [calls]
    except json.JSONDecodeError:
        calls = [json.loads(part.strip()) for part in text.split(";")]
    decoded = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
            raise DecodeError(f"not a {{name, arguments}} object: {str(call)[:200]}")
        if isinstance(call["name"], (list, dict)):
            raise DecodeError(f"call name is not a scalar: {str(call)[:200]}")
        decoded.append({call["name"]: call["arguments"]})
    return decoded


_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.BitAnd: operator.and_,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}


MAX_RESULT_BITS = 100_000  # an integer of ~30,000 digits: far beyond any BFCL answer, computed in microseconds
MAX_RESULT_ITEMS = 100_000  # characters of a repeated string, elements of a repeated list


def _size(value):
    """(bits of an int, items of a sequence): what an operation on it costs."""
    if isinstance(value, bool):
        return 1, 0
    if isinstance(value, int):
        return value.bit_length(), 0
    if isinstance(value, (str, bytes, list, tuple)):
        return 0, len(value)
    return 64, 0  # a float (or complex): fixed size; its overflow raises OverflowError, a decode error


def _result_too_large(op, left, right):
    """Whether `left op right` would build a huge number or sequence, judged from both operands before computing it,
    so that `("a"*10000)*10000` or `(9**9999)**999` cost nothing. The limits are far above anything an answer holds."""
    (left_bits, left_items), (right_bits, right_items) = _size(left), _size(right)
    if isinstance(op, ast.Mult):
        if left_items or right_items or isinstance(left, (str, bytes, list, tuple)) or isinstance(right, (str, bytes, list, tuple)):
            count = right if isinstance(left, (str, bytes, list, tuple)) else left
            items = left_items or right_items
            return isinstance(count, int) and items * max(count, 0) > MAX_RESULT_ITEMS
        return left_bits + right_bits > MAX_RESULT_BITS
    if isinstance(op, ast.Pow):
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            return max(left_bits, 1) * right > MAX_RESULT_BITS
        return isinstance(right, int) and abs(right) > MAX_RESULT_BITS  # a float base: few steps, but bound them
    if isinstance(op, ast.LShift):
        return isinstance(right, int) and left_bits + max(right, 0) > MAX_RESULT_BITS
    return False


def _evaluate_arithmetic(node):
    """`2 * 3.5`, `"a" + "b"` and the like, on literals only. The official decoder runs Python evaluation on any binary
    expression; we never eval model output, so names and calls inside one are a decode error."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _evaluate_arithmetic(node.left), _evaluate_arithmetic(node.right)
        if _result_too_large(node.op, left, right):
            raise DecodeError("arithmetic result too large")
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate_arithmetic(node.operand))
    return ast.literal_eval(node)


def _python_call(node):
    """ast.Call -> {dotted.name: {keyword: value}}. Positional arguments are ignored, as in BFCL."""
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return {".".join(reversed(parts)): {kw.arg: _python_value(kw.value) for kw in node.keywords}}


def _python_value(node):
    """A literal argument value, following the official resolve_ast_by_type case by case."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, ast.UnaryOp):
        # BFCL negates the operand's constant whatever the operator is (`+5` gives -5) and fails on anything else.
        if not isinstance(node.operand, ast.Constant):
            raise DecodeError(f"unsupported unary operand: {ast.unparse(node)}")
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_python_value(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise DecodeError("`**` inside a dict literal")
        return {_python_value(k): _python_value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BinOp):
        return _evaluate_arithmetic(node)
    if isinstance(node, ast.Name):
        return node.id  # a bare name stands for a variable; BFCL compares its name as a string
    if isinstance(node, ast.Call):
        return _python_call(node) if node.keywords else ast.unparse(node)
    if isinstance(node, ast.Tuple):
        return tuple(_python_value(v) for v in node.elts)
    if isinstance(node, ast.Subscript):
        return ast.unparse(node.value) + "[" + ast.unparse(node.slice) + "]"
    raise DecodeError(f"unsupported value: {type(node).__name__}")


def decode_python_calls(text):
    """BFCL's prompt-mode format `[func(a=1, b="x"), other(c=[1, 2])]`, parsed with `ast` (never evaluated)."""
    text = text.strip("`\n ")
    if not text.startswith("["):
        text = "[" + text
    if not text.endswith("]"):
        text = text + "]"
    try:
        body = ast.parse(text.strip().strip("'"), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise DecodeError(f"not a Python call list: {err}") from None
    if isinstance(body, ast.Call):
        nodes = [body]
    elif isinstance(body, (ast.List, ast.Tuple, ast.Set)):
        nodes = body.elts
    else:
        raise DecodeError(f"not a list of calls: {type(body).__name__}")
    if not all(isinstance(n, ast.Call) for n in nodes):
        raise DecodeError("list element that is not a function call")
    return [_python_call(n) for n in nodes]


BFCL_DECODERS = {"qwen": decode_qwen_tool_calls, "xlam": decode_xlam_json, "python": decode_python_calls}


def is_call_list(decoded):
    """[{name: {param: value}}, ...] (empty allowed): what the AST checker can read."""
    return isinstance(decoded, list) and all(
        type(call) is dict and len(call) == 1 and type(next(iter(call.values()))) is dict for call in decoded)


def contains_call(decoded):
    """BFCL's relevance test: a decoded list with at least one non-empty call."""
    return is_call_list(decoded) and len(decoded) > 0 and not (len(decoded) == 1 and len(decoded[0]) == 0)


# --- Java / JavaScript values: source text -> Python values, by declared type ---------------------------------------
# Same regexes and fallbacks as the official converters: text that does not look like the declared type stays a
# string (and then fails the type or value check).


def _java_literal(text):
    if text in ("true", "false"):
        return text == "true"
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1]
    if re.match(r"^-?\d+[lL]$", text):
        return int(text[:-1])
    if re.match(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?[fF]$", text):
        return float(re.sub(r"[fF]$", "", text))
    return _number_or_text(text)


def _number_or_text(text):
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _java_element(text, item_type):
    if item_type in ("char", "String"):
        return text[1:-1]  # drop the quotes
    return java_value(text, item_type) if item_type else _java_literal(text)


def java_value(text, java_type, item_type=None):
    """Java source text (as the model writes it) -> a Python value, by the parameter's declared Java type."""
    if java_type not in BFCL_JAVA_TYPES:
        raise ValueError(f"Unsupported Java type: {java_type}")
    if java_type in ("byte", "short", "integer"):
        return int(text) if re.match(r"^-?\d+$", text) else str(text)
    if java_type == "float":
        return float(re.sub(r"[fF]$", "", text)) if re.match(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?[fF]$", text) else str(text)
    if java_type == "double":
        return float(text) if re.match(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$", text) else str(text)
    if java_type == "long":
        return int(re.sub(r"[lL]$", "", text)) if re.match(r"^-?\d+[lL]$", text) else str(text)
    if java_type == "boolean":
        return text == "true" if text in ("true", "false") else str(text)
    if java_type in ("char", "String", "any"):
        return str(text)  # the official char pattern r"^\'.$\'" can never match, so a char stays as written
    if java_type == "ArrayList":
        match = re.search(r"new\s+ArrayList<\w*>\(Arrays\.asList\((.+?)\)\)", text)
        if match:
            return [_java_element(part.strip(), item_type) for part in match.group(1).split(",")]
        match = re.search(r"new\s+ArrayList<\w*>\(\)\s*\{\{\s*(.+?)\s*\}\}", text, re.DOTALL)
        if match:
            return [_java_element(part.strip(), item_type) for part in re.findall(r"add\((.+?)\)", match.group(1))]
        return [] if re.search(r"new\s+ArrayList<\w*>\(\)", text) else text
    if java_type == "Array":
        match = re.search(r"new\s+\w+\[\]\s*\{(.*?)\}", text)
        if not match:
            return text
        parts = [p.strip() for p in match.group(1).split(",") if p.strip()]
        return [java_value(p, item_type) if item_type else _java_literal(p) for p in parts]
    if java_type == "HashMap":
        match = re.search(r"new\s+HashMap<.*?>\s*\(\)\s*\{\s*\{?\s*(.*?)\s*\}?\s*\}", text, re.DOTALL)
        if match:
            pairs = re.findall(r"put\(\"(.*?)\",\s*(.*?)\)", match.group(1)) if match.group(1).strip() else []
            return {key: _java_literal(value.strip()) for key, value in pairs}
        return {} if re.search(r"new\s+HashMap<.*?>\s*\(\)", text) else text
    raise NotImplementedError(f"{java_type} conversion is not implemented")  # Set, Hashtable, Queue, Stack


def _js_literal(text):
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if len(text) >= 1 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return _number_or_text(text)


def _js_array(code, item_type):
    two_d = re.match(r"\[\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\]|\bnew\s+Array\(\s*\[.*?\]\s*(,\s*\[.*?\]\s*)*\)", code)
    if two_d:
        rows = []
        for i, inner in enumerate(re.findall(r"\[(.*?)\]", two_d.group(0))):
            inner = inner.strip()
            if i == 0 and inner.startswith("["):
                inner = inner[1:]
            rows.append([_js_literal(e.strip()) for e in inner.split(",")])
        return rows
    match = re.match(r"\[(.*?)\]|\bnew\s+Array\((.*?)\)", code)
    if not match:
        return code
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    elements = inner.strip().split(",") if inner is not None and inner.strip() else []
    if not item_type:
        return [_js_literal(e.strip()) for e in elements]
    return [js_value(e.strip(), item_type) for e in elements]


def _js_object(code):
    if code == "{}":
        return {}
    match = re.match(r"\{(.*?)\}", code)
    if not match:
        return code
    result = {}
    for key, value in re.findall(r"([^:]+):\s*(.*?)(?:,\s*(?=[^,]+:)|$)", match.group(1)):
        key, value = key.strip().strip("'\""), value.strip()
        if value.startswith("[") and value.endswith("]"):
            result[key] = js_value(value, "array")
        elif value.startswith("{") and value.endswith("}"):
            result[key] = js_value(value, "dict")
        else:
            result[key] = _js_literal(value.strip("'\""))
    return result


def js_value(text, js_type, item_type=None):
    """JavaScript source text (as the model writes it) -> a Python value, by the parameter's declared JS type."""
    if js_type not in BFCL_JS_TYPES:
        raise ValueError(f"Unsupported JavaScript type: {js_type}")
    if js_type == "String":
        quoted = (text.startswith('"') and text.endswith('"')) or (text.startswith("'") and text.endswith("'"))
        return text[1:-1] if quoted else str(text)
    if js_type == "integer":
        return int(text) if re.match(r"^-?\d+$", text) else str(text)
    if js_type == "float":
        return float(text) if re.match(r"^-?\d+(\.\d+)?$", text) else str(text)
    if js_type == "Bigint":
        return int(text[:-1]) if re.match(r"^-?\d+n$", text) else str(text)
    if js_type == "Boolean":
        return text == "true" if text in ("true", "false") else str(text)
    if js_type in ("array", "dict"):
        code = text.strip()
        try:  # the official parser falls back to the raw text on any error
            return _js_array(code, item_type) if js_type == "array" else _js_object(code)
        except Exception:  # noqa: BLE001
            return code
    return str(text)  # any


# --- The AST checker ------------------------------------------------------------------------------------------------


def _valid():
    return {"valid": True, "error": []}


def _invalid(error_type, *messages):
    return {"valid": False, "error": list(messages), "error_type": error_type}


def _invalid_value(error_type, param, value, allowed):
    return _invalid(error_type, f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}.")


def standardize_bfcl_string(text):
    """BFCL compares strings without spaces and ,./-_*^, case-insensitively, with ' and " alike."""
    return re.sub(r"[ \,\.\/\-\_\*\^]", "", text).lower().replace("'", '"')


def _standardize_if_str(value):
    return standardize_bfcl_string(value) if type(value) is str else value


def _answer_type(allowed):
    """The type of the first non-optional allowed value (None when all are the optional marker "")."""
    for value in allowed:
        if value != "":
            return type(value)
    return None


def _check_type(param, value, allowed, type_name, expected_type, item_type):
    """The official type_checker, including its notion of a "variable": an answer given as a string for a
    non-string parameter (a name standing for the value), in which case a string output is accepted here and
    compared literally afterwards. Item types are checked one level deep."""
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type != expected_type
    nested_failed = False
    if type(value) == expected_type:
        if item_type is None:
            return {**_valid(), "is_variable": is_variable}
        for candidate in allowed:
            if type(candidate) != list or all(
                    _check_type(param, item, candidate, str(item_type), item_type, None)["valid"] for item in value):
                return {**_valid(), "is_variable": is_variable}
        nested_failed = True
    if answer_type is not None and type(value) == answer_type:
        if nested_failed:
            return _invalid("type_error:nested", f"Nested type checking failed for parameter {param!r}: {value!r}.")
        return {**_valid(), "is_variable": True}
    return _invalid("type_error:simple", f"Incorrect type for parameter {param!r}. Expected type {type_name}, "
                    f"got {type(value).__name__}. Parameter value: {value!r}.")


def _check_string(param, value, allowed):
    if standardize_bfcl_string(value) not in [standardize_bfcl_string(a) for a in allowed if type(a) is str]:
        return _invalid_value("value_error:string", param, value, allowed)
    return _valid()


def _check_list(param, value, allowed):
    """Element-wise, in order; string elements standardized. (An optional "" answer equals the empty list.)"""
    if [_standardize_if_str(v) for v in value] not in [[_standardize_if_str(v) for v in c] for c in allowed]:
        return _invalid_value("value_error:list/tuple", param, value, allowed)
    return _valid()


def _check_dict(param, value, allowed):
    """Key by key against each allowed dict: no unknown keys, values among the allowed ones, required keys present."""
    result = _invalid("dict_checker:unclear")
    for candidate in allowed:
        if candidate == "":
            continue
        errors, error_type = [], "dict_checker:unclear"
        for key, item in value.items():
            if key not in candidate:
                errors.append(f"Unexpected dict key parameter: {key!r}.")
                error_type = "value_error:dict_key"
                break
            if _standardize_if_str(item) not in [_standardize_if_str(a) for a in candidate[key]]:
                errors.append(f"Invalid value for parameter {key!r}: {item!r}. Expected one of {candidate[key]}.")
                error_type = "value_error:dict_value"
                break
        for key, allowed_values in candidate.items():  # runs even after a failure above, as in BFCL
            if key not in value and "" not in allowed_values:
                errors.append(f"Missing dict key parameter: {key!r}.")
                error_type = "value_error:dict_key"
                break
        if not errors:
            return _valid()
        result = _invalid(error_type, *errors)
    return result


def _check_list_of_dicts(param, value, allowed):
    result = _invalid("list_dict_checker:unclear")
    for candidate in allowed:
        if len(value) != len(candidate):
            result = _invalid("value_error:list_dict_count", "Wrong number of dictionaries in the list.")
            continue
        for item, expected in zip(value, candidate):
            result = _check_dict(param, item, [expected])
            if not result["valid"]:
                break
        else:
            return _valid()
    return result


def check_bfcl_call(function, call, expected, language="python"):
    """One decoded call {name: args} against one function doc and its expected {name: {param: [allowed values]}}:
    the official simple_function_checker."""
    allowed_by_param = next(iter(expected.values()))
    name = function["name"]
    properties = function["parameters"]["properties"]
    if name not in call:
        return _invalid("simple_function_checker:wrong_func_name", f"Function name {name!r} not found in model output.")
    args = call[name]
    for param in function["parameters"]["required"]:
        if param not in args:
            return _invalid("simple_function_checker:missing_required", f"Missing required parameter: {param!r}.")

    for param, value in args.items():
        if param not in properties or param not in allowed_by_param:
            return _invalid("simple_function_checker:unexpected_param", f"Unexpected parameter: {param!r}.")
        type_name, item_type = properties[param]["type"], None
        if language in ("java", "javascript"):
            # The model wrote source text; convert it by the declared type, then check it like a Python value.
            types, convert = (BFCL_JAVA_TYPES, java_value) if language == "java" else (BFCL_JS_TYPES, js_value)
            expected_type = types[type_name]
            if type(value) != str:
                return _invalid(f"type_error:{'java' if language == 'java' else 'js'}",
                                f"Incorrect type for parameter {param!r}. Expected type String, got {type(value).__name__}.")
            if type_name in _LIST_TYPES_WITH_ITEMS:
                item_type_name = properties[param]["items"]["type"]
                item_type = types[item_type_name]
                value = convert(value, type_name, item_type_name)
            else:
                value = convert(value, type_name)
        else:
            expected_type = BFCL_PYTHON_TYPES[type_name]
            if type_name in ("array", "tuple"):
                item_type = BFCL_PYTHON_TYPES[properties[param]["items"]["type"]]
        if type_name == "tuple" and type(value) == tuple:
            value = list(value)  # answers went through JSON, where tuples become lists
        if language == "python" and type_name == "float" and type(value) == int:
            value = float(value)  # the one promotion BFCL allows

        allowed = allowed_by_param[param]
        result = _check_type(param, value, allowed, type_name, expected_type, item_type)
        if not result["valid"]:
            return result
        if not result["is_variable"]:
            if expected_type == dict:
                result = _check_dict(param, value, allowed)
            elif expected_type == list and item_type == dict:
                result = _check_list_of_dicts(param, value, allowed)
            elif expected_type == str:
                result = _check_string(param, value, allowed)
            elif expected_type == list:
                result = _check_list(param, value, allowed)
            else:
                result = None
            if result is not None:
                if not result["valid"]:
                    return result
                continue
        if value not in allowed:
            return _invalid_value("value_error:others", param, value, allowed)

    for param, allowed in allowed_by_param.items():
        if param not in args and "" not in allowed:
            return _invalid("simple_function_checker:missing_optional",
                            f"Optional parameter {param!r} not provided and not marked as optional.")
    return _valid()


def _function_named(functions, name):
    return next((f for f in functions if f["name"] == name), None)


def check_bfcl_calls(functions, calls, ground_truth, category):
    """The official ast_checker: a category named *parallel* matches calls to answers in any order (counts must be
    equal); *multiple* needs exactly one call, of the expected function; anything else exactly one call."""
    language = bfcl_language(category)
    if "parallel" in category:
        if len(calls) != len(ground_truth):
            return _invalid("parallel_function_checker_no_order:wrong_count", "Wrong number of functions.")
        matched = set()
        for i, expected in enumerate(ground_truth):
            function = _function_named(functions, next(iter(expected)))
            for index, call in enumerate(calls):
                if index not in matched and check_bfcl_call(function, call, expected, language)["valid"]:
                    matched.add(index)
                    break
            else:
                return _invalid("parallel_function_checker_no_order:cannot_find_match",
                                f"Could not find a matching function in the model output for index {i} of possible answers.")
        return _valid()
    if "multiple" in category:
        if len(calls) != len(ground_truth):
            return _invalid("multiple_function_checker:wrong_count", "Wrong number of functions.")
        expected = ground_truth[0]
        return check_bfcl_call(_function_named(functions, next(iter(expected))), calls[0], expected, language)
    if len(calls) != 1:
        return _invalid("simple_function_checker:wrong_count", "Wrong number of functions.")
    return check_bfcl_call(functions[0], calls[0], ground_truth[0], language)


def score_bfcl_entry(entry, model_output, category, ground_truth=None, decoder="qwen"):
    """Score one raw model output as the official eval_runner does. `entry` is the BFCL entry (its raw function
    docs), `ground_truth` the possible-answer list (None for (ir)relevance categories). Never raises: undecodable
    or unexpected output is an invalid entry. Returns {"valid", and when invalid "error_type", "error"} plus
    "decoded" when decoding succeeded."""
    decode = BFCL_DECODERS[decoder]
    try:
        decoded = decode(model_output)
    except Exception as err:  # noqa: BLE001 - anything undecodable, including non-string results
        decoded, decode_error = None, f"{type(err).__name__}: {err}"
    else:
        decode_error = None

    if is_relevance_category(category):
        has_call = decode_error is None and contains_call(decoded)
        if "irrelevance" in category:
            result = _valid() if not has_call else _invalid(
                "irrelevance_error:decoder_success", "Valid syntax. Successfully decode AST when it should not.")
        else:
            result = _valid() if has_call else _invalid(
                "relevance_error:decoder_failed",
                f"Invalid syntax. Failed to decode AST when it should have. {decode_error or ''}".strip())
    elif decode_error is not None:
        result = _invalid("ast_decoder:decoder_failed", f"Invalid syntax. Failed to decode AST. {decode_error}")
    elif not is_call_list(decoded):
        result = _invalid("ast_decoder:decoder_wrong_output_format", "Did not output in the specified format.")
    else:
        try:
            result = check_bfcl_calls(entry["function"], decoded, ground_truth, category)
        except Exception as err:  # noqa: BLE001 - inputs on which the official checker itself would crash
            result = _invalid("ast_checker:exception", f"{type(err).__name__}: {err}")
    if decoded is not None:
        result["decoded"] = decoded
    return result


# --- Error analysis: how far an answer got --------------------------------------------------------------------------


def call_outcome(verdict, category, ground_truth=None):
    """Three nested steps for reading progress when exact accuracy does not move yet, from score_bfcl_entry's verdict:
    - decodes_as_calls: the output decoded into at least one call (in irrelevance categories that is the mistake);
    - right_functions: the functions called are the expected ones, as many times each (None where only relevance
      is scored);
    - correct: the official verdict (for AST categories: right functions with right arguments)."""
    decoded = verdict.get("decoded")
    decodes = contains_call(decoded)
    right_functions = None
    if not is_relevance_category(category):
        called = sorted(str(next(iter(call))) for call in decoded) if decodes else []
        right_functions = decodes and called == sorted(next(iter(expected)) for expected in ground_truth)
    return {"decodes_as_calls": decodes, "right_functions": right_functions, "correct": verdict["valid"]}
