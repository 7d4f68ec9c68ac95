"""The official BFCL scoring code from the pinned bfcl-eval, imported for agreement tests only.

bfcl-eval is installed with --no-deps (its dependencies are 6 GB). To import its checker we
- replace `bfcl_eval.constants.model_config` (it imports every model handler, hence every vendor SDK) with a
  stand-in holding one model entry, with `underscore_to_dot=False` as for local Qwen-style FC models;
- point BFCL_PROJECT_ROOT at a temporary folder (importing creates result/ and score/ folders there);
- stub, only when they are not installed, modules that the official single-turn scoring path imports but never
  calls: the tree-sitter Java/JS parsers (prompt-mode Java/JS decoding, which we do not compare), tenacity
  (retry decorators on API calls), openai (the local-server client), dotenv (.env loading), and overrides (its
  decorators become no-ops).
Nothing is installed or downloaded at run time.
"""

import importlib
import importlib.util
import os
import sys
import types
from unittest import mock

MODEL_NAME = "agreement-test-model"
STUBBED_WHEN_MISSING = ("tree_sitter", "tree_sitter_java", "tree_sitter_javascript", "tenacity", "openai", "dotenv")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


_LOADED = []  # the official modules are imported once per process: later calls get the same namespace


def load_official_bfcl(project_root):
    """Returns a namespace with the official pieces: evaluate_ast, evaluate_relevance (the eval_runner per-entry
    functions), the handlers' decoders and prompts, convert_to_tool and the default system prompt. The first
    call's project_root stays in effect (bfcl_eval reads BFCL_PROJECT_ROOT when it is imported)."""
    if not _LOADED:
        _LOADED.append(_load_official_bfcl(project_root))
    return _LOADED[0]


def _load_official_bfcl(project_root):
    os.environ["BFCL_PROJECT_ROOT"] = str(project_root)
    config = types.ModuleType("bfcl_eval.constants.model_config")
    config.MODEL_CONFIG_MAPPING = {MODEL_NAME: types.SimpleNamespace(underscore_to_dot=False)}
    sys.modules["bfcl_eval.constants.model_config"] = config
    stubbed = []
    for name in STUBBED_WHEN_MISSING:
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _StubModule(name)
            stubbed.append(name)
    if importlib.util.find_spec("overrides") is None:
        overrides = types.ModuleType("overrides")
        overrides.override = overrides.final = lambda f: f
        overrides.EnforceOverrides = object
        sys.modules["overrides"] = overrides
        stubbed.append("overrides")

    enums = importlib.import_module("bfcl_eval.constants.enums")
    eval_runner = importlib.import_module("bfcl_eval.eval_checker.eval_runner")
    handler_utils = importlib.import_module("bfcl_eval.model_handler.utils")
    bfcl_utils = importlib.import_module("bfcl_eval.utils")
    type_mappings = importlib.import_module("bfcl_eval.constants.type_mappings")
    default_prompts = importlib.import_module("bfcl_eval.constants.default_prompts")
    qwen_fc = importlib.import_module("bfcl_eval.model_handler.local_inference.qwen_fc")
    salesforce_qwen = importlib.import_module("bfcl_eval.model_handler.local_inference.salesforce_qwen")

    class PromptModeHandler:  # OSSHandler.decode_ast, without the server machinery of its constructor
        @staticmethod
        def decode_ast(result, language, has_tool_call_tag):
            return handler_utils.default_decode_ast_prompting(result, language, has_tool_call_tag)

    handlers = {
        "qwen": object.__new__(qwen_fc.QwenFCHandler),
        "xlam": object.__new__(salesforce_qwen.SalesforceQwenHandler),
        "python": PromptModeHandler(),
    }

    def language_of(category):
        if bfcl_utils.is_js(category):
            return enums.Language.JAVASCRIPT, enums.ReturnFormat.JAVASCRIPT
        if bfcl_utils.is_java(category):
            return enums.Language.JAVA, enums.ReturnFormat.JAVA
        return enums.Language.PYTHON, enums.ReturnFormat.PYTHON

    def evaluate(decoder, entry, raw_output, category, ground_truth=None):
        """The official verdict as {"valid", "error_type"?}, or {"crash": repr} where the official code raises."""
        try:
            if bfcl_utils.is_relevance_or_irrelevance(category):
                result = eval_runner._evaluate_single_relevance_entry(
                    handlers[decoder], entry["id"], raw_output, entry, MODEL_NAME, category)
            else:
                language, return_format = language_of(category)
                result = eval_runner._evaluate_single_ast_entry(
                    handlers[decoder], entry["id"], raw_output, ground_truth, entry, MODEL_NAME, category,
                    language=language, return_format=return_format, has_tool_call_tag=False)
        except Exception as err:  # noqa: BLE001
            return {"crash": f"{type(err).__name__}: {err}"}
        return {"valid": result["valid"], "error_type": result.get("error_type")}

    class _RecordingClient:
        """Stands in for the OpenAI client of the local vLLM/SGLang server: records the prompt it is sent."""

        def __init__(self):
            self.prompts = []
            self.completions = self

        def create(self, prompt, **kwargs):
            self.prompts.append(prompt)
            usage = types.SimpleNamespace(prompt_tokens=0, completion_tokens=0)
            return types.SimpleNamespace(choices=[types.SimpleNamespace(text="")], usage=usage)

    def official_prompts(handler_name, category):
        """{id: prompt} as the official harness sends it to the model server for every entry of `category`: the
        entries loaded by bfcl_eval.utils.load_dataset_entry (language hints included), then the handler's real
        single-turn inference path (inference_single_turn_prompting), with only the network call replaced."""
        module, cls = {"qwen_fc": ("qwen_fc", "QwenFCHandler"), "qwen": ("qwen", "QwenHandler")}[handler_name]
        handler_class = getattr(importlib.import_module(f"bfcl_eval.model_handler.local_inference.{module}"), cls)
        handler = handler_class(model_name="Qwen/Qwen3-8B", temperature=0.001, registry_name="Qwen/Qwen3-8B",
                                is_fc_model=handler_name.endswith("_fc"))
        handler.client = _RecordingClient()
        handler.tokenizer = types.SimpleNamespace(tokenize=lambda text: [])
        handler.max_context_length, handler.model_path_or_id = 32768, "Qwen/Qwen3-8B"
        prompts = {}
        for entry in bfcl_utils.load_dataset_entry(category):
            handler.inference_single_turn_prompting(entry, include_input_log=False)
            prompts[entry["id"]] = handler.client.prompts[-1]
        return prompts

    return types.SimpleNamespace(
        evaluate=evaluate,
        official_prompts=official_prompts,
        stubbed=stubbed,
        convert_to_tool=handler_utils.convert_to_tool,
        language_hints=bfcl_utils._func_doc_language_specific_pre_processing,
        formulate_system_prompt=handler_utils.formulate_system_prompt,
        default_prompt_format=default_prompts.DEFAULT_SYSTEM_PROMPT_FORMAT,
        gorilla_to_openapi=type_mappings.GORILLA_TO_OPENAPI,
        model_style=enums.ModelStyle,
        calculate_weighted_accuracy=importlib.import_module("bfcl_eval.eval_checker.eval_runner_helper").calculate_weighted_accuracy,
        calculate_unweighted_accuracy=importlib.import_module("bfcl_eval.eval_checker.eval_runner_helper").calculate_unweighted_accuracy,
    )
