"""BFCL v4 multi-turn evaluation, done as the official harness (bfcl-eval 2026.3.23) does it for a Qwen FC model.

Four categories of 200 entries each: multi_turn_base, multi_turn_miss_func, multi_turn_miss_param,
multi_turn_long_context. An entry is a conversation of several user turns against stateful Python environments
(a file system, a trading bot, ...). In each turn the model may call tools over several steps; every call is executed
and its result shown to the model, until a step has no call. The checker then replays the model's calls and the ground
truth on fresh environments and compares, turn by turn, the environments' states and the call results.

Official sources this module follows (paths under bfcl_eval/):
- loading: utils.py (load_dataset_entry, populate_test_cases_with_predefined_functions, language hints);
- the loop: model_handler/base_handler.py (inference_multi_turn_prompting), model_handler/local_inference/qwen_fc.py
  and base_oss_handler.py (prompt text, response parsing, decode_execute, token budget);
- execution: eval_checker/multi_turn_eval/multi_turn_utils.py (execute_multi_turn_func_call);
- checking: eval_checker/eval_runner.py (_evaluate_single_multi_turn_entry), multi_turn_eval/multi_turn_checker.py;
- aggregation: eval_checker/eval_runner_helper.py (generate_leaderboard_csv).

Execution never evaluates model output. The official harness turns a decoded call into Python text,
`name(key=repr(value),...)`, prefixes method names with the global name of their environment instance by a regular
expression applied to the whole text (string arguments included), and runs it with Python's `eval`. We build the same text (so that the
prefixing inside string arguments, Python's syntax errors for odd keys and `nan`/`inf` arguments give the official
results), then only parse it (compile/ast, nothing runs) and dispatch the call to a public method of the entry's
instances with literal arguments. Where the official `eval` would run Python that is not such a call, we do not:
a name that is not a method of the entry's classes is undefined here, where `eval` would find Python builtins
(print, open, ...) and the imports of its module; a callee or argument that is more than a method and literal
values (only strange function names produce one) gets an error result.

Environments are the classes of the installed bfcl_eval (pure Python, seeded), imported when first needed, so that
importing this module does not require bfcl_eval.
"""

import ast
import copy
import functools
import importlib
import inspect
import json
import re
import warnings
from collections import Counter
from pathlib import Path

from fcsft.bfcl_data import MULTI_TURN, package_data_dir, read_jsonl
from fcsft.bfcl_prompts import add_language_hints, qwen_fc_prompt
from fcsft.errors import UserError

MULTI_TURN_CATEGORIES = tuple(MULTI_TURN)

# --- Official constants (tests/test_bfcl_multi_turn.py checks each against the installed bfcl_eval) ---------------
# constants/default_prompts.py
MAXIMUM_STEP_LIMIT = 20
HELD_OUT_FUNCTIONS_MESSAGE = "{functions}\nI have updated some more functions you can choose from. What about now?"
# constants/executable_backend_config.py
ENVIRONMENT_MODULES = {
    "GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api",
    "TwitterAPI": "posting_api", "TicketAPI": "ticket_api", "TradingBot": "trading_bot", "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
ENVIRONMENT_PACKAGE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
FUNCTION_DOC_FILES = {name: f"{module}.json" for name, module in ENVIRONMENT_MODULES.items()}
STATELESS_CLASSES = ("MathAPI",)  # no scenario to load
# multi_turn_utils.py: names refused before eval, the method-prefixing pattern
BLOCKED_FUNCTION_NAMES = ("kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run")
METHOD_NAME_PATTERN = re.compile(r"\b([a-zA-Z_]\w*)\s*(?=\()")
# qwen_fc.py
TOOL_CALL_PATTERN = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
# base_oss_handler.py: tokens requested per step, min(4096, context length - prompt tokens - 2)
STEP_TOKEN_CAP = 4096

# Stands in for the model name in the environments' global instance names (see EntryEnvironment). It shows only
# where a string argument contains text like `ls(`: the official harness rewrites it with that name.
DEFAULT_MODEL_NAME = "fcsft_model"

INFERENCE_ERROR = "multi_turn:inference_error"
FORCE_TERMINATED = "multi_turn:force_terminated"
EMPTY_TURN = "multi_turn:empty_turn_model_response"
STATE_MISMATCH = "multi_turn:instance_state_mismatch"
RESPONSE_MISMATCH = "multi_turn:execution_response_mismatch"


# ---------------------------------------------------------------------------------------------------------------
# Loading: entries with their tool lists, as utils.load_dataset_entry builds them
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _function_docs(data_dir):
    """class name -> its function docs (multi_turn_func_doc/<file>.json, one doc per line)."""
    folder = Path(data_dir) / "multi_turn_func_doc"
    return {name: read_jsonl(folder / file) for name, file in FUNCTION_DOC_FILES.items()}


def prepare_entry(entry, docs_by_class):
    """A copy of a raw multi-turn entry with `function` (the tool list) and `missed_function` ({turn index as str:
    [held-out docs]}), as the official code builds them: every involved class's docs in order; each held-out
    function moved out of the list; then the Python language hint added to the remaining docs only."""
    entry = copy.deepcopy(entry)
    functions = [copy.deepcopy(doc) for name in entry["involved_classes"] for doc in docs_by_class[name]]
    held_out = {}
    for turn, names in entry.get("missed_function", {}).items():
        held_out[turn] = []
        for name in names:
            index = next((i for i, doc in enumerate(functions) if doc["name"] == name), None)
            if index is not None:  # the official loop skips a name it does not find
                held_out[turn].append(functions.pop(index))
    entry["function"] = add_language_hints(functions, category_of(entry["id"]))
    if "missed_function" in entry:
        entry["missed_function"] = held_out
    return entry


def load_multi_turn_category(category, data_dir=None):
    """(entries, answers) of one multi-turn category, aligned by position. Entries are prepared (prepare_entry);
    answers are {"id", "ground_truth": per turn, a list of call strings}."""
    if category not in MULTI_TURN_CATEGORIES:
        raise UserError(f"{category!r} is not a multi-turn category ({', '.join(MULTI_TURN_CATEGORIES)})")
    data_dir = Path(data_dir) if data_dir is not None else package_data_dir()
    raw = read_jsonl(data_dir / f"BFCL_v4_{category}.json")
    answers = read_jsonl(data_dir / "possible_answer" / f"BFCL_v4_{category}.json")
    if [e["id"] for e in raw] != [a["id"] for a in answers]:
        raise UserError(f"{category}: the entries and possible answers in {data_dir} do not list the same ids")
    docs = _function_docs(str(data_dir))
    return [prepare_entry(entry, docs) for entry in raw], answers


def category_of(entry_id):
    """The official test category of an entry id: everything before the last underscore."""
    return entry_id.rsplit("_", 1)[0]


def _is_long_context(entry_id):
    category = category_of(entry_id)
    return "long_context" in category or "composite" in category


# ---------------------------------------------------------------------------------------------------------------
# Execution (multi_turn_utils.execute_multi_turn_func_call, without eval)
# ---------------------------------------------------------------------------------------------------------------


def _environment_class(class_name):
    if class_name not in ENVIRONMENT_MODULES:
        raise ValueError(f"unknown multi-turn environment class {class_name!r}")
    try:
        module = importlib.import_module(f"{ENVIRONMENT_PACKAGE}.{ENVIRONMENT_MODULES[class_name]}")
    except ImportError as err:
        raise ImportError(f"the BFCL environments come from bfcl-eval (`make setup` installs it): {err}") from err
    return getattr(module, class_name)


@functools.lru_cache(maxsize=None)
def _public_method_names(cls):
    return tuple(name for name, _ in inspect.getmembers(cls(), predicate=inspect.ismethod) if not name.startswith("_"))


def _public_methods(instance):
    """The public methods the official maps to an instance (inspect.getmembers with ismethod, sorted by name); the
    same for every instance of a class, so listed once per class."""
    return _public_method_names(type(instance))


def official_instance_name(model_tag, entry_id, class_name):
    """The global variable name the official harness gives an environment instance."""
    return re.sub(r"[-./:]", "_", f"{model_tag}_{entry_id}_{class_name}_instance")


def inference_model_tag(model_name):
    """The model part of instance names during inference (BaseHandler.model_name_underline_replaced)."""
    return model_name.replace("/", "_").replace("-", "_").replace(".", "_")


def harness_model_name(folder_name):
    """The model name for a result folder (the official checker names a model by its result folder). It only names
    the environments' global instances, so it matters only where a string argument holds text like `ls(`. The
    harness needs a Python name once -./: are replaced; other characters become _ here."""
    name = re.sub(r"[^\w\-./:]", "_", folder_name) or "model"
    return name if re.sub(r"[-./:]", "_", name).isidentifier() else f"m_{name}"


def _as_result_text(value):
    """Results as the official keeps them: a str as is, a dict as JSON (str() if not serialisable), else str()."""
    if type(value) is str:  # the exact type, as the official checks it
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except Exception:  # noqa: BLE001 - the official falls back to str() on any failure
            return str(value)
    return str(value)


class UnsupportedCall(Exception):
    """Call text that is more than `method(literal arguments)`: the official `eval` would run it as Python."""


class EntryEnvironment:
    """Fresh instances of an entry's environment classes, loaded from its initial_config, and the execution of call
    text on them. `model_tag` is the model part of the official global instance names: inference_model_tag(model) in
    the generation loop, f"{model}_eval" and f"{model}_ground_truth_eval" in the checker."""

    def __init__(self, entry, model_tag):
        self.instances = {}  # class name -> instance, in involved_classes order
        self._by_global_name = {}  # official global instance name -> instance
        self._owner_of_method = {}  # public method name -> global instance name (a later class wins, as officially)
        initial_config = entry.get("initial_config", {})
        for class_name in entry["involved_classes"]:
            instance = _environment_class(class_name)()
            if class_name not in STATELESS_CLASSES:
                # deep copy: _load_scenario may keep and mutate parts of the config
                instance._load_scenario(copy.deepcopy(initial_config.get(class_name, {})),
                                        long_context=_is_long_context(entry["id"]))
            global_name = official_instance_name(model_tag, entry["id"], class_name)
            if not global_name.isidentifier():
                raise UserError(f"model name {model_tag!r} gives the instance name {global_name!r}, which is not a "
                                 "Python name: the official harness could not execute any call with it")
            self.instances[class_name] = instance
            self._by_global_name[global_name] = instance
            for method_name in _public_methods(instance):
                self._owner_of_method[method_name] = global_name

    def execute(self, call_texts):
        """Execute call texts in order (decode_execute's output, or ground-truth strings); returns one result text
        per call, exactly as the official execution writes it."""
        return [self._execute_one(text) for text in call_texts]

    def public_state(self):
        """class name -> {public attribute: value}: what the checker compares."""
        return {name: {k: v for k, v in vars(instance).items() if not k.startswith("_")}
                for name, instance in self.instances.items()}

    def _execute_one(self, text):
        text = METHOD_NAME_PATTERN.sub(self._prefix_method, text)
        try:
            _refuse_blocked_name(text)
            return _as_result_text(self._call(text))
        except Exception as err:  # noqa: BLE001 - every failure becomes a result text, as officially
            return f"Error during execution: {err}"

    def _prefix_method(self, match):
        name = match.group(1)
        return f"{self._owner_of_method[name]}.{name}" if name in self._owner_of_method else name

    def _call(self, text):
        source = text.lstrip(" \t")  # Python's `eval` ignores leading spaces and tabs
        tree = ast.parse(source, filename="<string>", mode="eval")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "'int' object is not callable; perhaps you missed a comma?"
            compile(tree, "<string>", "eval")  # the compiler's own errors (a repeated keyword); nothing is run
        call = tree.body
        if not isinstance(call, ast.Call):
            raise UnsupportedCall(f"not a call: {text[:200]}")
        target = self._callee(call.func)  # Python evaluates the callee, then the arguments, then calls it
        args = [_literal(node) for node in call.args]
        if any(keyword.arg is None for keyword in call.keywords):
            raise UnsupportedCall(f"** arguments: {text[:200]}")
        kwargs = {keyword.arg: _literal(keyword.value) for keyword in call.keywords}
        if not callable(target):
            raise TypeError(f"'{type(target).__name__}' object is not callable")
        return target(**_keyword_arguments(target, args, kwargs))

    def _callee(self, node):
        """The function a call text names, resolved as `eval` would, among the entry's instances only: a name that
        is not an instance is undefined (the official namespace also holds Python builtins and its module's imports,
        which we never run); a dotted name resolves from the left, so `functions.ls` is undefined as officially."""
        if isinstance(node, ast.Name):
            if node.id not in self._by_global_name:
                raise NameError(f"name '{node.id}' is not defined")
            return self._by_global_name[node.id]
        if isinstance(node, ast.Attribute):
            owner = self._callee(node.value)
            if not node.attr.startswith("_"):
                return getattr(owner, node.attr)  # an AttributeError as Python writes it
        if isinstance(node, ast.Constant):  # a number, true or null as the function name
            return node.value
        raise UnsupportedCall(f"callee {ast.unparse(node)[:200]}")


def _refuse_blocked_name(text):
    """The official check before eval: the text before "(" (after the first "." if any) must not be a blocked name."""
    name = text.split("(")[0] if "(" in text else text
    if "." in name:
        name = name.split(".")[1]
    if name in BLOCKED_FUNCTION_NAMES:
        raise Exception(f"Function call {name} is not allowed.")  # a bare Exception, as officially


def _literal(node):
    """The value of a literal argument, evaluated in Python's order; a name (repr() writes non-finite floats as
    `nan`/`inf`) raises the NameError `eval` raises."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        raise NameError(f"name '{node.id}' is not defined")
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        values = [_literal(element) for element in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](values)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float, complex)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else +operand
    raise UnsupportedCall(f"argument {ast.unparse(node)[:200]}")


def _keyword_arguments(method, args, kwargs):
    """Positional arguments (ground truth has some, e.g. `sort('final_report.pdf')`) named by the method's
    signature, bound as Python binds them."""
    if not args:
        return kwargs
    return dict(inspect.signature(method).bind(*args, **kwargs).arguments)


# ---------------------------------------------------------------------------------------------------------------
# Decoding a step's output (QwenFCHandler: _extract_tool_calls, decode_execute; utils.convert_to_function_call)
# ---------------------------------------------------------------------------------------------------------------


def extract_tool_calls(text):
    """Every `<tool_call>\\n...\\n</tool_call>` block that parses as JSON (any JSON value); the rest are skipped."""
    calls = []
    for block in TOOL_CALL_PATTERN.findall(text):
        try:
            calls.append(json.loads(block))
        except Exception:  # noqa: BLE001 - the official skips a block on any parse failure
            continue
    return calls


def call_text(name, arguments):
    """The official text of a decoded call: `name(key=repr(value),...)`; string arguments are parsed as JSON."""
    if type(arguments) is str:
        arguments = json.loads(arguments)
    return f"{name}({','.join(f'{key}={value!r}' for key, value in arguments.items())})"


def decode_execute(text):
    """A step's output -> the official call texts, in order ([] when there is no call). Raises, as the official
    decoder does, when a block is not a JSON object, lacks `name` or `arguments`, or its arguments are not an
    object (or a JSON string of one)."""
    calls = extract_tool_calls(text)
    if any(type(call) is not dict for call in calls):
        raise ValueError(f"Model did not return a list of function calls: {text}")
    named = [{call["name"]: call["arguments"]} for call in calls]  # KeyError / TypeError as officially
    return [call_text(name, arguments) for item in named for name, arguments in item.items()]


def _decodes_to_calls(step_output):
    """decode_execute's calls, or [] where it fails (the checker skips such steps)."""
    try:
        return decode_execute(step_output)
    except Exception:  # noqa: BLE001 - any failure: the official checker ignores the step
        return []


# ---------------------------------------------------------------------------------------------------------------
# The generation loop (BaseHandler.inference_multi_turn_prompting with QwenFCHandler), all entries in step
# ---------------------------------------------------------------------------------------------------------------


def split_reasoning(output):
    """(output without its reasoning, reasoning): the text after the last `</think>` and the text inside the first
    block, as QwenFCHandler._parse_query_response_prompting splits them."""
    if "</think>" not in output:
        return output, ""
    parts = output.split("</think>")
    return parts[-1].lstrip("\n"), parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n")


def assistant_message(output):
    """The history message for a step's raw output. With any JSON block in <tool_call> tags (reasoning included),
    the blocks replace the text; else the text without its reasoning."""
    answer, reasoning = split_reasoning(output)
    calls = extract_tool_calls(output)
    if calls:
        return {"role": "assistant", "content": "", "tool_calls": calls, "reasoning_content": reasoning}
    return {"role": "assistant", "content": answer, "reasoning_content": reasoning}


def _check_renderable(messages):
    """QwenFCHandler._format_prompt reads each stored tool call as {"name": str, "arguments": ...} (after unwrapping
    a "function" key). Any other JSON in <tool_call> tags (a list, a string, an object without a name, ...) makes it
    raise at the next prompt, and the official harness records the entry as "Error during inference: <error>". The
    same operations, in the same order, raise the same error here."""
    for message in messages:
        for call in message.get("tool_calls", ()):
            if "function" in call:
                call = call["function"]
            _ = "" + call["name"]
            _ = call["arguments"]


class _EntryRun:
    """One entry's conversation in the loop: history, environments and the official result layout."""

    def __init__(self, entry, model_tag):
        self.entry = entry
        self.environment = EntryEnvironment(entry, model_tag)
        self.messages = []
        self.result, self.input_tokens, self.output_tokens = [], [], []
        self.steps = 0
        self.error = None
        self.finished = False
        self.turn = -1
        self._start_next_turn()

    def record(self):
        return {"id": self.entry["id"], "result": self.error if self.error is not None else self.result,
                "input_token_count": self.input_tokens, "output_token_count": self.output_tokens,
                "steps": self.steps}

    def prompt(self):
        """The official prompt for the next step, or None after an error that ends the entry."""
        try:
            _check_renderable(self.messages)
            return qwen_fc_prompt(self.messages, self.entry["function"])
        except Exception as err:  # noqa: BLE001 - the official handler raises here; its runner records the error
            self.fail(str(err))
            return None

    def fail(self, error):
        self.error, self.finished = f"Error during inference: {error}", True

    def take_output(self, output, prompt_tokens, output_tokens):
        """Record one step's raw output; execute its calls, or end the turn when it has none."""
        self.steps += 1
        self.messages.append(assistant_message(output))
        answer, _ = split_reasoning(output)
        self.turn_outputs.append(answer)
        self.turn_input_tokens.append(prompt_tokens)
        self.turn_output_tokens.append(output_tokens)
        try:
            calls = decode_execute(answer)
        except Exception:  # noqa: BLE001 - undecodable: the official handler ends the turn
            calls = []
        if not calls:
            self._end_turn()
            return
        results = self.environment.execute(calls)
        self.messages += [{"role": "tool", "name": call, "content": result} for call, result in zip(calls, results)]
        self.steps_with_calls += 1
        if self.steps_with_calls > MAXIMUM_STEP_LIMIT:  # counted per turn; the entry stops here
            self._end_turn(force_quit=True)

    def _start_next_turn(self):
        self.turn += 1
        if self.turn == len(self.entry["question"]):
            self.finished = True
            return
        self.messages += copy.deepcopy(self._turn_messages(self.turn))
        self.turn_outputs, self.turn_input_tokens, self.turn_output_tokens = [], [], []
        self.steps_with_calls = 0

    def _turn_messages(self, turn):
        held_out = self.entry.get("missed_function", {})
        if str(turn) not in held_out:
            return self.entry["question"][turn]
        if self.entry["question"][turn]:
            raise ValueError(f"{self.entry['id']}: turn {turn} adds held-out functions but also has a user message")
        return [{"role": "user", "content": HELD_OUT_FUNCTIONS_MESSAGE.format(functions=held_out[str(turn)])}]

    def _end_turn(self, force_quit=False):
        self.result.append(self.turn_outputs)
        self.input_tokens.append(self.turn_input_tokens)
        self.output_tokens.append(self.turn_output_tokens)
        if force_quit:
            self.finished = True
        else:
            self._start_next_turn()


def official_context_length(config, tokenizer):
    """The context length the official handler works with (OSSHandler.spin_up_local_server): the model config's
    max_position_embeddings, else the tokenizer's model_max_length."""
    if hasattr(config, "max_position_embeddings"):
        return config.max_position_embeddings
    if getattr(tokenizer, "model_max_length", None) is not None:
        return tokenizer.model_max_length
    raise ValueError("the model config has no max_position_embeddings and the tokenizer no model_max_length")


def step_token_budget(prompt_tokens, context_length, cap=STEP_TOKEN_CAP):
    """Tokens the official handler requests for a step: min(cap, context - prompt - 2). Below 1 the request fails
    (the server rejects a prompt at or over the context length, and max_tokens < 1)."""
    return min(cap, context_length - prompt_tokens - 2)


def generate_multi_turn(entries, generate, count_tokens, context_length, model_name=DEFAULT_MODEL_NAME,
                        step_token_cap=STEP_TOKEN_CAP):
    """Run the official multi-turn loop for prepared entries, all active entries advancing one step at a time.

    generate(prompts, max_new_tokens) -> raw outputs: one call per round with the prompts of every active entry and
    each prompt's token budget (step_token_budget); count_tokens(text) -> int (the prompt tokens officially counted
    with the model's tokenizer; also used for the outputs). model_name: the model's name as the official harness
    gets it (it only shows where a string argument contains text like `ls(`).

    Yields, per entry as it finishes (entries in input order within a round), the official result record:
    {"id", "result": per turn the list of step outputs (reasoning removed) or "Error during inference: ...",
    "input_token_count", "output_token_count": per turn per step, "steps": generation calls}. A prompt without
    room to generate ends its entry with an inference error, as the official server's refusal does."""
    model_tag = inference_model_tag(model_name)
    active = [_EntryRun(entry, model_tag) for entry in entries]
    while active:
        waiting, prompts, budgets, counts = [], [], [], []
        for run in active:
            prompt = None if run.finished else run.prompt()
            if prompt is None:
                continue
            tokens = count_tokens(prompt)
            budget = step_token_budget(tokens, context_length, step_token_cap)
            if budget < 1:
                run.fail(f"the prompt has {tokens} tokens, no room to generate within the model's context length of "
                         f"{context_length} tokens")
                continue
            waiting.append(run)
            prompts.append(prompt)
            budgets.append(budget)
            counts.append(tokens)
        outputs = list(generate(prompts, budgets)) if prompts else []
        if len(outputs) != len(prompts):
            raise ValueError(f"generate returned {len(outputs)} outputs for {len(prompts)} prompts")
        for run, output, tokens in zip(waiting, outputs, counts):
            run.take_output(output, tokens, count_tokens(output))
        yield from (run.record() for run in active if run.finished)
        active = [run for run in active if not run.finished]


# ---------------------------------------------------------------------------------------------------------------
# Checking (eval_runner._evaluate_single_multi_turn_entry + multi_turn_checker.multi_turn_checker)
# ---------------------------------------------------------------------------------------------------------------


def _failure(error_type, message, turn=None, **details):
    verdict = {"valid": False, "error_type": error_type, "error": message}
    if turn is not None:
        verdict["turn"] = turn
    return {**verdict, **details}


def _state_differences(model, truth):
    """(class name, differing public attributes) for the first class whose state differs, else None. Attributes are
    those of the ground-truth instance, compared with !=, as _compare_instances does."""
    for class_name, truth_instance in truth.instances.items():
        model_instance = model.instances[class_name]
        differing = [attr for attr in vars(truth_instance) if not attr.startswith("_")
                     and getattr(model_instance, attr) != getattr(truth_instance, attr)]
        if differing:
            return class_name, differing
    return None


def _missing_results(expected, produced):
    """The expected results not found in `produced`, each produced result matching at most one (order ignored)."""
    remaining, missing = list(produced), []
    for item in expected:
        if item in remaining:
            remaining.remove(item)
        else:
            missing.append(item)
    return missing


def _decoded_turns(result):
    """Per turn, the decoded calls of each step that has any (undecodable and call-less steps are skipped)."""
    turns = []
    for turn in result:
        if not isinstance(turn, list):
            raise UserError(f"a result turn is not a list of step outputs: {str(turn)[:200]}")
        turns.append([calls for calls in map(_decodes_to_calls, turn) if calls])
    return turns


def check_multi_turn_entry(entry, ground_truth, result, model_name=DEFAULT_MODEL_NAME):
    """The official verdict for one entry: {"valid": True} or {"valid": False, "error_type", "error" (the official
    message), "turn" (where the check failed, for state/response/empty-turn errors), details}."""
    if not isinstance(result, list):
        return _failure(INFERENCE_ERROR,
                        "Error during inference phase. Model did not output a list of model responses.")
    if len(result) != len(ground_truth):
        return _failure(FORCE_TERMINATED, "Model was force-terminated during inference phase. The length of the model "
                        f"result turns ({len(result)}) does not match the length of the ground truth turns "
                        f"({len(ground_truth)}).")
    model = EntryEnvironment(entry, f"{model_name}_eval")
    truth = EntryEnvironment(entry, f"{model_name}_ground_truth_eval")
    produced = []  # every model result so far: a call made in an earlier turn counts for a later one
    for turn, (expected_calls, steps) in enumerate(zip(ground_truth, _decoded_turns(result))):
        for calls in steps:  # executed even in a turn expecting no call, so that later states are right
            produced += model.execute(calls)
        expected = truth.execute(expected_calls)
        if not expected_calls:
            continue
        if not steps:
            return _failure(EMPTY_TURN, f"Model response list is empty for turn {turn}", turn)
        differences = _state_differences(model, truth)
        if differences:
            class_name, attributes = differences
            return _failure(STATE_MISMATCH, f"Model instance for {class_name} does not match the state with ground "
                            "truth instance.", turn, differing_attributes=attributes)
        missing = _missing_results(expected, produced)
        if missing:
            return _failure(RESPONSE_MISMATCH, "Model response execution results so far does not contain all the "
                            f"ground truth response execution results for turn {turn}.", turn, missing_results=missing)
    return {"valid": True}


def count_turns_with_calls(result):
    """(turns in the result, turns in which some step decodes to at least one call); (0, 0) for an error string."""
    if not isinstance(result, list):
        return 0, 0
    return len(result), sum(any(_decodes_to_calls(step) for step in turn) for turn in result if isinstance(turn, list))


def score_multi_turn_entry(entry, ground_truth, result, model_name=DEFAULT_MODEL_NAME):
    """A score row like the single-turn ones: {"id", "valid", "turns", "turns_with_call"} and, when invalid,
    "error_type", "error", "turn" (if any), details and "model_result" (the raw result)."""
    verdict = check_multi_turn_entry(entry, ground_truth, result, model_name)
    turns, with_call = count_turns_with_calls(result)
    row = {"id": entry["id"], "valid": verdict["valid"], "turns": turns, "turns_with_call": with_call}
    if not verdict["valid"]:
        row.update({k: v for k, v in verdict.items() if k != "valid"}, model_result=result)
    return row


def score_multi_turn_category(category, results, entries, answers, model_name=DEFAULT_MODEL_NAME):
    """Rows (dataset order, entries with a result only) and {accuracy, correct, total, expected, error_types}.
    `results` maps id -> raw result (the official result files' "result", ours or the official harness's)."""
    if category not in MULTI_TURN_CATEGORIES:
        raise UserError(f"{category!r} is not a multi-turn category")
    rows = [score_multi_turn_entry(entry, answer["ground_truth"], results[entry["id"]], model_name)
            for entry, answer in zip(entries, answers) if entry["id"] in results]
    correct = sum(row["valid"] for row in rows)
    errors = Counter(row["error_type"] for row in rows if not row["valid"])
    return rows, {"accuracy": correct / len(rows) if rows else None, "correct": correct, "total": len(rows),
                  "expected": len(entries), "error_types": dict(errors.most_common())}


# ---------------------------------------------------------------------------------------------------------------
# Aggregates (eval_runner_helper.generate_leaderboard_csv)
# ---------------------------------------------------------------------------------------------------------------

OVERALL_WEIGHTS = {"Non-Live": 10, "Live": 10, "Irrelevance": 10, "Multi-Turn": 30, "Agentic": 40}
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
# The official Overall's parts: (name, how its categories combine, categories or sub-parts).
OVERALL_PARTS = {
    "Non-Live": ("unweighted", ["simple", "multiple", "parallel", "parallel_multiple"]),
    "Live": ("weighted", list(LIVE_AST)),
    "Irrelevance": ("unweighted", ["irrelevance", "live_irrelevance"]),
    "Multi-Turn": ("unweighted", list(MULTI_TURN_CATEGORIES)),
    "Agentic": ("unweighted", ["web_search", "memory"]),
}
SUB_PARTS = {"simple": ["simple_python", "simple_java", "simple_javascript"],
             "web_search": ["web_search_base", "web_search_no_snippet"],
             "memory": ["memory_kv", "memory_vector", "memory_rec_sum"]}


def multi_turn_accuracy(scores):
    """Multi-Turn = unweighted mean of the four categories, reported only when all four were run:
    {"accuracy", "status", "formula"}. scores: category -> {"accuracy", ...}."""
    missing = [c for c in MULTI_TURN_CATEGORIES if (scores.get(c) or {}).get("accuracy") is None]
    formula = "unweighted mean of " + ", ".join(MULTI_TURN_CATEGORIES)
    if missing:
        status = ("not run" if len(missing) == len(MULTI_TURN_CATEGORIES)
                  else f"incomplete (missing {', '.join(missing)})")
        return {"accuracy": None, "status": status, "formula": formula}
    return {"accuracy": sum(scores[c]["accuracy"] for c in MULTI_TURN_CATEGORIES) / len(MULTI_TURN_CATEGORIES),
            "status": "ok", "formula": formula}


def _official_part(name, scores, sizes):
    """(accuracy, entry count, categories run) of a category or group as the official table computes it: a category
    not run counts as accuracy 0 with its data set's size (None when not known: only entry-weighted groups need it);
    groups are unweighted or entry-weighted means of their members."""
    if name not in OVERALL_PARTS and name not in SUB_PARTS:
        score = scores.get(name)
        if score is None or score.get("accuracy") is None:
            return 0.0, sizes.get(name), []
        return score["accuracy"], score["total"], [name]
    how, members = OVERALL_PARTS.get(name) or ("unweighted", SUB_PARTS[name])
    parts = [_official_part(member, scores, sizes) for member in members]
    run = [category for _, _, categories in parts for category in categories]
    counts = [count for _, count, _ in parts]
    total = None if None in counts else sum(counts)
    if how == "unweighted":
        return sum(accuracy for accuracy, _, _ in parts) / len(parts), total, run
    if total is None:
        unknown = [member for member, count in zip(members, counts) if count is None]
        raise ValueError(f"{name} weights its categories by size: the size of {', '.join(unknown)} (not run) is needed")
    return sum(accuracy * count for accuracy, count, _ in parts) / total, total, run


def official_dataset_sizes(data_dir=None):
    """Entries per category in the BFCL data (what the official table uses for a category not run). Only the live
    AST categories' sizes change a result (Live is entry-weighted)."""
    data_dir = Path(data_dir) if data_dir is not None else package_data_dir()
    return {c: sum(1 for line in (data_dir / f"BFCL_v4_{c}.json").read_text(encoding="utf-8").splitlines()
                   if line.strip()) for c in LIVE_AST}


def leaderboard_overall(scores, sizes=None):
    """The leaderboard's Overall accuracy: Non-Live 10, Live 10, Irrelevance 10, Multi-Turn 30, Agentic 40
    (normalised), every part as the official table composes it and every category not run counted as 0.

    scores: category -> {"accuracy", "total"} (total = entries scored). sizes: category -> data set size, needed
    for live AST categories not run (default: counted in the installed BFCL data).
    Returns {"accuracy", "parts": {part: {"accuracy", "weight", "status": "run" | "partly run" | "not run",
    "categories_run"}}, "complete": every category of every part was run}."""
    if sizes is None:
        missing_live = [c for c in LIVE_AST if (scores.get(c) or {}).get("accuracy") is None]
        sizes = official_dataset_sizes() if missing_live else {}
    weight_sum = sum(OVERALL_WEIGHTS.values())
    parts, overall = {}, 0.0
    for name, weight in OVERALL_WEIGHTS.items():
        accuracy, _, run = _official_part(name, scores, sizes)
        expected = _leaf_categories(name)
        status = "run" if len(run) == len(expected) else ("partly run" if run else "not run")
        parts[name] = {"accuracy": accuracy, "weight": weight / weight_sum, "status": status, "categories_run": run}
        overall += accuracy * weight / weight_sum
    return {"accuracy": overall, "parts": parts, "complete": all(p["status"] == "run" for p in parts.values())}


def _leaf_categories(name):
    members = OVERALL_PARTS[name][1] if name in OVERALL_PARTS else SUB_PARTS.get(name)
    return [leaf for member in members for leaf in _leaf_categories(member)] if members else [name]


# ---------------------------------------------------------------------------------------------------------------
# Error analysis
# ---------------------------------------------------------------------------------------------------------------


def multi_turn_error_analysis(rows_by_category):
    """Per category (rows from score_multi_turn_category): {"entries", "failed_turns": {error type: {turn index:
    entries}} ("-" for errors without a turn: inference errors, force termination), "turns", "turns_with_call",
    "turns_with_call_share": share of the turns run in which some step decodes to a call}."""
    analysis = {}
    for category, rows in rows_by_category.items():
        failed = {}
        for row in rows:
            if not row["valid"]:
                by_turn = failed.setdefault(row["error_type"], Counter())
                by_turn[row.get("turn", "-")] += 1
        turns = sum(row["turns"] for row in rows)
        with_call = sum(row["turns_with_call"] for row in rows)
        analysis[category] = {
            "entries": len(rows),
            "failed_turns": {kind: dict(sorted(counts.items(), key=_turns_first))
                             for kind, counts in sorted(failed.items())},
            "turns": turns, "turns_with_call": with_call,
            "turns_with_call_share": with_call / turns if turns else None,
        }
    return analysis


def _turns_first(item):
    """Sort key: turn indexes in order, then "-" (errors without a turn)."""
    turn = item[0]
    return (0, turn) if isinstance(turn, int) else (1, 0)
