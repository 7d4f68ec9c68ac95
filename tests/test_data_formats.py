"""fcsft/data_formats.py: rows written in each public layout (openai, sharegpt, hermes, glaive, toolace, apigen_mt)
converted and compared with hand-written normal-form rows; what the Qwen2.5 template shows; weight 0 out of the
assistant mask; every check reason; format detection; the transforms on multi-turn rows."""

import copy
import json
import random
from pathlib import Path

import pytest

import fcsft.chat_formats as fc
from fcsft import data_formats as df

# --- shared helpers: normal-form pieces, and a tiny tokenizer with the real Qwen2.5 chat template ------------------


def tool(name, description, properties, required=()):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(required)}}}


def call(name, arguments, call_id=None):
    made = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**made, "id": call_id} if call_id else made


WEATHER = tool("get_weather", "Current weather in a city",
               {"city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
CONVERT = tool("convert_currency", "Convert an amount between currencies",
               {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
               ["amount", "from", "to"])
WEATHER_FN, CONVERT_FN = WEATHER["function"], CONVERT["function"]  # the same specs without the wrapper


def qwen25_chat_template():
    """Qwen2.5-Instruct's real template as TRL ships it (what make_demo_assets.qwen25_chat_template reads)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """Byte-level tokenizer (no merges) with Qwen's special tokens and chat template: enough for rendering and for
    the assistant mask, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=qwen25_chat_template())


# --- openai / messages ------------------------------------------------------------------------------------------------


def test_openai_string_arguments_are_decoded_and_null_content_becomes_empty():
    row = {"messages": [
        {"role": "user", "content": "What's the weather in Zürich, in celsius?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"unit\": \"celsius\"}"}}]},
    ], "tools": [WEATHER], "parallel_tool_calls": False}
    assert df.openai_to_messages(row) == {"messages": [
        {"role": "user", "content": "What's the weather in Zürich, in celsius?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Zürich", "unit": "celsius"}, "call_1")]},
    ], "tools": [WEATHER]}


def test_openai_multi_turn_parallel_calls_weight_and_tool_call_ids():
    row = {"messages": [
        {"role": "system", "content": "You are a travel assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
        {"role": "user", "content": "Weather in Oslo, and 100 EUR in NOK?"},
        {"role": "assistant", "tool_calls": [  # content absent
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
            {"id": "b", "type": "function", "function": {"name": "convert_currency",
                                                          "arguments": "{\"amount\": 100, \"from\": \"EUR\", \"to\": \"NOK\"}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "{\"result\": 1172.5}"},  # answered out of order
        {"role": "tool", "tool_call_id": "a", "content": "{\"temp\": -3}"},
        {"role": "assistant", "content": "It is -3 °C in Oslo; 100 EUR is 1172.50 NOK.", "weight": 1},
    ], "tools": json.dumps([WEATHER, CONVERT])}
    assert df.openai_to_messages(row) == {"messages": [
        {"role": "system", "content": "You are a travel assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
        {"role": "user", "content": "Weather in Oslo, and 100 EUR in NOK?"},
        {"role": "assistant", "content": "", "tool_calls": [
            call("get_weather", {"city": "Oslo"}, "a"), call("convert_currency", {"amount": 100, "from": "EUR", "to": "NOK"}, "b")]},
        {"role": "tool", "content": "{\"result\": 1172.5}", "tool_call_id": "b", "name": "convert_currency"},
        {"role": "tool", "content": "{\"temp\": -3}", "tool_call_id": "a", "name": "get_weather"},
        {"role": "assistant", "content": "It is -3 °C in Oslo; 100 EUR is 1172.50 NOK."},
    ], "tools": [WEATHER, CONVERT]}
    assert df.untrained_turns(df.openai_to_messages(row)) == 1


def test_openai_no_tool_fits_and_the_legacy_functions_api():
    no_fit = {"messages": [{"role": "user", "content": "Book me a table for two."},
                           {"role": "assistant", "content": [{"type": "text", "text": "I cannot book tables."}]}],
              "tools": [WEATHER]}
    assert df.openai_to_messages(no_fit) == {"messages": [
        {"role": "user", "content": "Book me a table for two."},
        {"role": "assistant", "content": "I cannot book tables."}], "tools": [WEATHER]}
    legacy = {"functions": [WEATHER_FN], "messages": [
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}},
        {"role": "function", "name": "get_weather", "content": "{\"temp\": 19}"},
        {"role": "assistant", "content": "19 °C."}]}
    assert df.openai_to_messages(legacy) == {"messages": [
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Lima"})]},
        {"role": "tool", "content": "{\"temp\": 19}", "name": "get_weather"},
        {"role": "assistant", "content": "19 °C."}], "tools": [WEATHER]}


def test_messages_rows_loaded_through_arrow_lose_the_null_fills(tmp_path):
    """`messages` rows with dict arguments in a Parquet file of structs (as hub datasets are stored), read by
    `datasets`: Arrow gives each row the other rows' keys as nulls (trl#5118). The converter drops them from the tool
    specs and from the arguments."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_dataset

    rows = [
        {"messages": [{"role": "user", "content": "Weather in Rome"},
                      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}],
         "tools": [WEATHER]},
        {"messages": [{"role": "user", "content": "5 USD in JPY"},
                      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                          "name": "convert_currency", "arguments": {"amount": 5, "from": "USD", "to": "JPY"}}}]}],
         "tools": [CONVERT]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    loaded = load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train")
    assert loaded[0]["tools"][0]["function"]["parameters"]["properties"]["amount"] is None  # the fills are there
    assert loaded[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]["amount"] is None
    converted = df.convert_rows(loaded, "messages")
    assert converted.format == "messages" and not converted.skipped
    assert [e["tools"] for e in converted.examples] == [[WEATHER], [CONVERT]]
    assert converted.examples[0]["messages"][1]["tool_calls"] == [call("get_weather", {"city": "Rome"})]
    assert converted.examples[1]["messages"][1]["tool_calls"] == [call("convert_currency", {"amount": 5, "from": "USD", "to": "JPY"})]


def test_string_arguments_render_as_a_json_object_through_the_qwen25_template(qwen_tokenizer):
    row = {"messages": [{"role": "user", "content": "Wetter in Zürich? 東京も"},
                        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                            "name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]}], "tools": [WEATHER]}
    text = df.to_trainable_text_check(df.openai_to_messages(row), qwen_tokenizer)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\nWetter in Zürich? 東京も<|im_end|>" in text
    assert "\n<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text  # the spec as the template writes it
    # the old `messages` check kept the string, which the template encodes a second time
    old = fc.check_messages_row(row)
    old_text = qwen_tokenizer.apply_chat_template(old["messages"], tools=old["tools"], tokenize=False)
    assert '"arguments": "{\\"city\\": \\"Z' in old_text
    # tools stored as the JSON string the training dataset holds render the same
    assert df.to_trainable_text_check({**df.openai_to_messages(row), "tools": json.dumps([WEATHER])}, qwen_tokenizer) == text


def test_weight_zero_turns_are_shown_but_left_out_of_the_assistant_mask(qwen_tokenizer):
    from trl.chat_template_utils import get_training_chat_template

    training = get_training_chat_template(qwen_tokenizer)
    weighted = df.weighted_training_template(training)
    example = df.openai_to_messages({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there.", "weight": 0},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 °C in Paris."}], "tools": [WEATHER]})

    def trained_text(template):
        out = qwen_tokenizer.apply_chat_template(example["messages"], tools=example["tools"], chat_template=template,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        return qwen_tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])

    assert df.to_trainable_text_check(example, qwen_tokenizer, chat_template=weighted) == \
        df.to_trainable_text_check(example, qwen_tokenizer, chat_template=training)  # the text shown does not change
    assert "Hello there." in df.to_trainable_text_check(example, qwen_tokenizer, chat_template=weighted)
    call_text = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    assert trained_text(training) == "\nHello there.<|im_end|>\n" + call_text + "\n21 °C in Paris.<|im_end|>\n"
    assert trained_text(weighted) == call_text + "\n21 °C in Paris.<|im_end|>\n"
    with pytest.raises(ValueError, match="generation"):
        df.weighted_training_template(qwen25_chat_template())  # no markers: nothing to honour weight 0 with


def test_sft_trainer_leaves_weight_zero_turns_out_of_the_labels(qwen_tokenizer, tmp_path):
    """The wiring's route: the tokenizer's template set to the weighted training template, rows stored as
    training_data.to_dataset stores them (messages as Json, tools as a JSON string); TRL's own tokenization then
    labels every assistant turn but the weight-0 one."""
    from datasets import Dataset, Features, Json, List, Value
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    tokenizer = copy.deepcopy(qwen_tokenizer)
    tokenizer.chat_template = df.weighted_training_template(get_training_chat_template(tokenizer))
    example = df.openai_to_messages({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there.", "weight": 0},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "assistant", "content": "21 °C in Paris."}], "tools": [WEATHER]})
    features = Features({"messages": List(Json()), "tools": Value("string")})
    dataset = Dataset.from_list([{"messages": example["messages"], "tools": json.dumps(example["tools"])}], features=features)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, use_cpu=True, bf16=False,
                     activation_checkpointing=False, report_to=[])
    row = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset[0]
    labelled = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert labelled == ('\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                        "\n21 °C in Paris.<|im_end|>\n")
    assert "Hello there." in tokenizer.decode(row["input_ids"])


# --- sharegpt (LLaMA-Factory) and apigen_mt ---------------------------------------------------------------------------


def test_sharegpt_multi_turn_with_a_call_an_observation_and_a_system():
    row = {"conversations": [
        {"from": "human", "value": "Hi, what's the weather like in Berlin?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Berlin\"}}"},
        {"from": "observation", "value": "{\"temp\": 12, \"sky\": \"cloudy\"}"},
        {"from": "gpt", "value": "It is 12 °C and cloudy in Berlin."},
        {"from": "human", "value": "Thanks! Can you also book me a taxi?"},
        {"from": "gpt", "value": "Sorry, I cannot book taxis: I can only look up the weather."},
    ], "system": "Answer briefly.", "tools": json.dumps([WEATHER_FN])}
    assert df.sharegpt_to_messages(row) == {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi, what's the weather like in Berlin?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Berlin"})]},
        {"role": "tool", "content": "{\"temp\": 12, \"sky\": \"cloudy\"}", "name": "get_weather"},
        {"role": "assistant", "content": "It is 12 °C and cloudy in Berlin."},
        {"role": "user", "content": "Thanks! Can you also book me a taxi?"},
        {"role": "assistant", "content": "Sorry, I cannot book taxis: I can only look up the weather."},
    ], "tools": [WEATHER]}


def test_sharegpt_parallel_calls_in_one_function_call_turn_non_ascii():
    row = {"conversations": [
        {"from": "human", "value": "北京和上海的天气怎么样？"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                       {"name": "get_weather", "arguments": {"city": "上海"}}],
                                                      ensure_ascii=False)},
        {"from": "observation", "value": "[{\"temp\": 5}, {\"temp\": 11}]"},  # one result per call
        {"from": "gpt", "value": "北京5度，上海11度。"},
    ], "tools": json.dumps([WEATHER], ensure_ascii=False)}  # the wrapped spec is read too
    assert df.sharegpt_to_messages(row) == {"messages": [
        {"role": "user", "content": "北京和上海的天气怎么样？"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "北京"}), call("get_weather", {"city": "上海"})]},
        {"role": "tool", "content": "{\"temp\": 5}", "name": "get_weather"},
        {"role": "tool", "content": "{\"temp\": 11}", "name": "get_weather"},
        {"role": "assistant", "content": "北京5度，上海11度。"},
    ], "tools": [WEATHER]}


def test_sharegpt_text_then_call_is_one_assistant_turn():
    row = {"conversations": [
        {"from": "human", "value": "Convert 10 GBP to EUR"},
        {"from": "gpt", "value": "Let me check the rate."},
        {"from": "function_call",  # arguments as a JSON string inside the JSON value
         "value": json.dumps({"name": "convert_currency", "arguments": json.dumps({"amount": 10, "from": "GBP", "to": "EUR"})})},
    ], "tools": json.dumps([CONVERT_FN])}
    assert df.sharegpt_to_messages(row)["messages"][1:] == [
        {"role": "assistant", "content": "Let me check the rate.",
         "tool_calls": [call("convert_currency", {"amount": 10, "from": "GBP", "to": "EUR"})]}]


APIGEN_POLICY = "# Retail agent policy\nAuthenticate the user by email before any action. Never invent order ids."
APIGEN_TOOLS = [
    {"name": "find_user_id_by_email", "description": "Find a user id by email.",
     "parameters": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}},
    {"name": "get_order_details", "description": "Details of an order.",
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}},
]


def apigen_row():
    return {"conversations": [
        {"from": "human", "value": "Hi, I want to check order #W123. My email is ana@example.com."},
        {"from": "function_call", "value": "{\"name\": \"find_user_id_by_email\", \"arguments\": {\"email\": \"ana@example.com\"}}"},
        {"from": "observation", "value": "ana_4821"},
        {"from": "function_call", "value": "{\"name\": \"get_order_details\", \"arguments\": {\"order_id\": \"#W123\"}}"},
        {"from": "observation", "value": "{\"order_id\": \"#W123\", \"status\": \"delivered\"}"},
        {"from": "gpt", "value": "Thanks Ana, order #W123 was delivered."},
        {"from": "human", "value": "Great, what's the status of #W999 then?"},
        {"from": "function_call", "value": "{\"name\": \"get_order_details\", \"arguments\": {\"order_id\": \"#W999\"}}"},
        {"from": "observation", "value": "Error: order not found"},
        {"from": "gpt", "value": "I could not find order #W999 in your account."},
    ], "tools": json.dumps(APIGEN_TOOLS), "system": APIGEN_POLICY}


def test_apigen_mt_multi_turn_keeps_the_policy_as_system():
    find, details = (tool(t["name"], t["description"], t["parameters"]["properties"], t["parameters"]["required"])
                     for t in APIGEN_TOOLS)
    assert df.apigen_mt_to_messages(apigen_row()) == {"messages": [
        {"role": "system", "content": APIGEN_POLICY},
        {"role": "user", "content": "Hi, I want to check order #W123. My email is ana@example.com."},
        {"role": "assistant", "content": "", "tool_calls": [call("find_user_id_by_email", {"email": "ana@example.com"})]},
        {"role": "tool", "content": "ana_4821", "name": "find_user_id_by_email"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_order_details", {"order_id": "#W123"})]},
        {"role": "tool", "content": "{\"order_id\": \"#W123\", \"status\": \"delivered\"}", "name": "get_order_details"},
        {"role": "assistant", "content": "Thanks Ana, order #W123 was delivered."},
        {"role": "user", "content": "Great, what's the status of #W999 then?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_order_details", {"order_id": "#W999"})]},
        {"role": "tool", "content": "Error: order not found", "name": "get_order_details"},
        {"role": "assistant", "content": "I could not find order #W999 in your account."},
    ], "tools": [find, details]}
    assert df.sharegpt_to_messages(apigen_row()) == df.apigen_mt_to_messages(apigen_row())


# --- hermes -------------------------------------------------------------------------------------------------------

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools> </tools> XML tags. "
    "You may call one or more functions to assist with the user query. Don't make assumptions about what values to "
    "plug into functions.\n<tools>\n"
    "[{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Current weather in a city', "
    "'parameters': {'type': 'object', 'properties': {'city': {'type': 'string', 'description': 'City name'}, "
    "'unit': {'type': 'string', 'enum': ['celsius', 'fahrenheit']}}, 'required': ['city']}}}, "
    "{'type': 'function', 'function': {'name': 'convert_currency', 'description': 'Convert an amount between "
    "currencies', 'parameters': {'type': 'object', 'properties': {'amount': {'type': 'number'}, 'from': {'type': "
    "'string'}, 'to': {'type': 'string'}}, 'required': ['amount', 'from', 'to']}}}]\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call> </tool_call> "
    "tags with the following schema:\n<tool_call>\n{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>\n")


def test_hermes_parallel_calls_python_quoted_and_tools_listed_only_in_the_prompt():
    row = {"id": "h1", "category": "Travel", "subcategory": "Weather", "task": "weather and money",
           "tools": json.dumps([WEATHER]),  # convert_currency is listed only in the system prompt
           "conversations": [
               {"from": "system", "value": HERMES_SYSTEM},
               {"from": "human", "value": "Weather in Köln, and 50 USD in EUR please."},
               {"from": "gpt", "value": "<tool_call>\n{'arguments': {'city': 'Köln'}, 'name': 'get_weather'}\n</tool_call>\n"
                                        "<tool_call>\n{'arguments': {'amount': 50, 'from': 'USD', 'to': 'EUR'}, 'name': 'convert_currency'}\n</tool_call>"},
               {"from": "tool", "value": "<tool_response>\n{\"name\": \"get_weather\", \"content\": {\"temp\": 8}}\n</tool_response>\n"
                                         "<tool_response>\n{\"name\": \"convert_currency\", \"content\": {\"result\": 46.1}}\n</tool_response>"},
               {"from": "gpt", "value": "It is 8 °C in Köln, and 50 USD is 46.10 EUR."},
           ]}
    assert df.hermes_to_messages(row) == {"messages": [
        {"role": "user", "content": "Weather in Köln, and 50 USD in EUR please."},
        {"role": "assistant", "content": "", "tool_calls": [
            call("get_weather", {"city": "Köln"}), call("convert_currency", {"amount": 50, "from": "USD", "to": "EUR"})]},
        {"role": "tool", "content": "{\"temp\": 8}", "name": "get_weather"},
        {"role": "tool", "content": "{\"result\": 46.1}", "name": "convert_currency"},
        {"role": "assistant", "content": "It is 8 °C in Köln, and 50 USD is 46.10 EUR."},
    ], "tools": [WEATHER, CONVERT]}


def test_hermes_no_tool_fits_and_text_after_the_boilerplate_is_kept():
    row = {"tools": "", "conversations": [
        {"from": "system", "value": HERMES_SYSTEM + "Always answer in English."},
        {"from": "human", "value": "Order me a pizza."},
        {"from": "gpt", "value": "I can't order food; I can check the weather or convert currencies."},
    ]}
    assert df.hermes_to_messages(row) == {"messages": [
        {"role": "system", "content": "Always answer in English."},
        {"role": "user", "content": "Order me a pizza."},
        {"role": "assistant", "content": "I can't order food; I can check the weather or convert currencies."},
    ], "tools": [WEATHER, CONVERT]}


# --- glaive -------------------------------------------------------------------------------------------------------

GLAIVE_SYSTEM = ("SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
                 + json.dumps({"name": "search_song", "description": "Search a song by title",
                               "parameters": {"type": "object", "properties": {"title": {"type": "string", "description": "The title"}},
                                              "required": ["title"]}}, indent=4)
                 + "\n\n" + json.dumps(CONVERT_FN, indent=4))


def test_glaive_every_function_and_quoted_arguments_with_an_apostrophe():
    row = {"system": GLAIVE_SYSTEM, "chat": (
        "USER: Can you find the song \"Don't Stop Me Now\"?\n\n\n"
        "ASSISTANT: <functioncall> {\"name\": \"search_song\", \"arguments\": '{\"title\": \"Don't Stop Me Now\"}'} <|endoftext|>\n\n\n"
        "FUNCTION RESPONSE: {\"artist\": \"Queen\", \"year\": 1978}\n\n\n"
        "ASSISTANT: \"Don't Stop Me Now\" is by Queen (1978). <|endoftext|>\n\n\n"
        "USER: And 20 CHF in EUR?\n\n\n"
        "ASSISTANT: Let me convert that. <functioncall> {\"name\": \"convert_currency\", "
        "\"arguments\": '{\"amount\": 20, \"from\": \"CHF\", \"to\": \"EUR\"}'} <|endoftext|>\n\n\n"
        "FUNCTION RESPONSE: {\"result\": 21.3}\n\n\n"
        "ASSISTANT: 20 CHF is 21.30 EUR. <|endoftext|>\n\n\n"
        "USER: Can you order me a pizza?\n\n\n"
        "ASSISTANT: I'm sorry, but I can't order food. <|endoftext|>")}
    song = tool("search_song", "Search a song by title", {"title": {"type": "string", "description": "The title"}}, ["title"])
    assert df.glaive_to_messages(row) == {"messages": [
        {"role": "user", "content": "Can you find the song \"Don't Stop Me Now\"?"},
        {"role": "assistant", "content": "", "tool_calls": [call("search_song", {"title": "Don't Stop Me Now"})]},
        {"role": "tool", "content": "{\"artist\": \"Queen\", \"year\": 1978}", "name": "search_song"},
        {"role": "assistant", "content": "\"Don't Stop Me Now\" is by Queen (1978)."},
        {"role": "user", "content": "And 20 CHF in EUR?"},
        {"role": "assistant", "content": "Let me convert that.", "tool_calls": [call("convert_currency", {"amount": 20, "from": "CHF", "to": "EUR"})]},
        {"role": "tool", "content": "{\"result\": 21.3}", "name": "convert_currency"},
        {"role": "assistant", "content": "20 CHF is 21.30 EUR."},
        {"role": "user", "content": "Can you order me a pizza?"},
        {"role": "assistant", "content": "I'm sorry, but I can't order food."},
    ], "tools": [song, CONVERT]}


def test_glaive_without_functions_is_a_plain_chat_with_its_system_text():
    row = {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.",
           "chat": "USER: Tell me a joke about cats.\n\n\n"
                   "ASSISTANT: Why did the cat sit on the computer? To keep an eye on the mouse! <|endoftext|>\n\n\n"}
    assert df.glaive_to_messages(row) == {"messages": [
        {"role": "system", "content": "You are a helpful assistant, with no access to external functions."},
        {"role": "user", "content": "Tell me a joke about cats."},
        {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse!"},
    ], "tools": None}


# --- toolace ------------------------------------------------------------------------------------------------------

TOOLACE_FUNCTIONS = [
    {"name": "Market Trends API", "description": "Latest market trends for a country.",
     "parameters": {"type": "dict", "properties": {
         "trend_type": {"description": "Trend type.", "type": "string", "enum": ["MARKET_INDEXES", "MOST_ACTIVE"]},
         "country": {"description": "2-letter country code.", "type": "string", "default": "us"}},
         "required": ["trend_type"]}, "required": None},
    {"name": "Currency Convert", "description": "Convert money.",
     "parameters": {"type": "dict", "properties": {
         "amount": {"description": "Amount.", "type": "float"},
         "pair": {"description": "From and to.", "type": "dict", "properties": {
             "from": {"type": "string"}, "to": {"type": "string"}}},
         "round": {"description": "Round the result.", "type": "boolean"},
         "history_days": {"description": "Days of history.", "type": "array", "items": {"type": "integer"}}},
         "required": ["amount", "pair"]}, "required": None},
]
TOOLACE_SYSTEM = (
    "You are an expert in composing functions. You are given a question and a set of possible functions. \nBased on the "
    "question, you will need to make one or more function/tool calls to achieve the purpose. \nIf none of the function "
    "can be used, point it out. If the given question lacks the parameters required by the function,\nalso point it "
    "out. You should only return the function call in tools call sections.\nHere is a list of functions in JSON format "
    "that you can invoke:\n" + json.dumps(TOOLACE_FUNCTIONS) + ". \nShould you decide to return the function call(s). "
    "\nPut it in the format of [func1(params_name=params_value, params_name2=params_value2...), func2(params)]\n\n"
    "NO other text MUST be included. \n")
TOOLACE_TOOLS = [
    tool("Market Trends API", "Latest market trends for a country.", {
        "trend_type": {"description": "Trend type.", "type": "string", "enum": ["MARKET_INDEXES", "MOST_ACTIVE"]},
        "country": {"description": "2-letter country code.", "type": "string", "default": "us"}}, ["trend_type"]),
    tool("Currency Convert", "Convert money.", {
        "amount": {"type": "number", "description": "Amount."},
        "pair": {"type": "object", "description": "From and to.", "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "round": {"description": "Round the result.", "type": "boolean"},
        "history_days": {"description": "Days of history.", "type": "array", "items": {"type": "integer"}}}, ["amount", "pair"]),
]


def test_toolace_python_call_lists_names_with_spaces_and_bfcl_types():
    row = {"system": TOOLACE_SYSTEM, "conversations": [
        {"from": "user", "value": "Show the market indexes in Germany and convert 12.5 EUR to JPY, rounded."},
        {"from": "assistant", "value": "[Market Trends API(trend_type=\"MARKET_INDEXES\", country=\"de\"), "
                                       "Currency Convert(amount=12.5, pair={\"from\": \"EUR\", \"to\": \"JPY\"}, round=true, history_days=[1, -2])]"},
        {"from": "tool", "value": "[{\"name\": \"Market Trends API\", \"results\": {\"DAX\": \"+0.4%\"}}, "
                                  "{\"name\": \"Currency Convert\", \"results\": {\"value\": 2010}}]"},
        {"from": "assistant", "value": "The DAX is up 0.4%; 12.5 EUR is about 2010 JPY."},
        {"from": "user", "value": "And the weather in Paris, s'il te plaît?"},
        {"from": "assistant", "value": "None of the functions can get the weather."},
    ]}
    assert df.toolace_to_messages(row) == {"messages": [
        {"role": "user", "content": "Show the market indexes in Germany and convert 12.5 EUR to JPY, rounded."},
        {"role": "assistant", "content": "", "tool_calls": [
            call("Market Trends API", {"trend_type": "MARKET_INDEXES", "country": "de"}),
            call("Currency Convert", {"amount": 12.5, "pair": {"from": "EUR", "to": "JPY"}, "round": True, "history_days": [1, -2]})]},
        {"role": "tool", "content": "{\"DAX\": \"+0.4%\"}", "name": "Market Trends API"},
        {"role": "tool", "content": "{\"value\": 2010}", "name": "Currency Convert"},
        {"role": "assistant", "content": "The DAX is up 0.4%; 12.5 EUR is about 2010 JPY."},
        {"role": "user", "content": "And the weather in Paris, s'il te plaît?"},
        {"role": "assistant", "content": "None of the functions can get the weather."},
    ], "tools": TOOLACE_TOOLS}


def test_python_call_lists_are_read_without_eval():
    assert df.parse_python_calls('[A b.c-d(x="a, b)", y=[1, {"k": None}], z=-0.5), E()]') == [
        ("A b.c-d", {"x": "a, b)", "y": [1, {"k": None}], "z": -0.5}), ("E", {})]
    for text in ('[f(x=__import__("os").system("echo hacked"))]', "[f(x=open('/etc/passwd'))]", "[f(1)]", "[f(x=1) g(y=2)]"):
        with pytest.raises((ValueError, SyntaxError)):
            df.parse_python_calls(text)


# --- xlam through the same table ---------------------------------------------------------------------------------


def test_xlam_rows_convert_through_the_table():
    row = {"id": 1, "query": "Weather in Quito?", "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Quito"}}]),
           "tools": json.dumps([{"name": "get_weather", "description": "Current weather in a city",
                                 "parameters": {"city": {"type": "str", "description": "City name"}}}])}
    assert df.CONVERTERS["xlam"](row) == {"messages": [
        {"role": "user", "content": "Weather in Quito?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Quito"})]},
    ], "tools": [tool("get_weather", "Current weather in a city", {"city": {"type": "string", "description": "City name"}}, ["city"])]}


# --- every check reason, and the source-level counts ------------------------------------------------------------------

USER = {"role": "user", "content": "Weather in Oslo?"}


def oa_call(arguments, name="get_weather"):
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


MALFORMED = [
    ("openai", {"messages": [USER, oa_call("{'city': 'Oslo'}")], "tools": [WEATHER]}, "bad_arguments"),  # not JSON
    ("openai", {"messages": [USER, oa_call("[\"Oslo\"]")], "tools": [WEATHER]}, "bad_arguments"),  # JSON, not an object
    ("openai", {"messages": [USER, oa_call("{}", "get_forecast")], "tools": [WEATHER]}, "unknown_tool"),
    ("openai", {"messages": [USER, oa_call("{\"city\": \"Oslo\"}")]}, "unknown_tool"),  # no tools at all
    ("openai", {"messages": [USER, {"role": "tool", "content": "{\"temp\": 1}"}, {"role": "assistant", "content": "1 °C"}],
                "tools": [WEATHER]}, "orphan_tool_result"),  # a tool result before any call
    ("openai", {"messages": [USER, oa_call("{\"city\": \"Oslo\"}"), {"role": "tool", "content": "1"},
                             {"role": "tool", "content": "2"}, {"role": "assistant", "content": "ok"}],
                "tools": [WEATHER]}, "orphan_tool_result"),  # two results for one call
    ("openai", {"messages": [USER, {"role": "assistant", "content": "Hi", "weight": 0}]}, "no_trained_turn"),
    ("messages", {"messages": [USER]}, "no_trained_turn"),
    ("openai", {"messages": [USER, {"role": "assistant", "content": "Hi", "weight": 0.5}]}, "bad_weight"),
    ("openai", {"messages": [USER, {"role": "assistant", "content": None}]}, "empty_reply"),
    ("openai", {"messages": [{"role": "robot", "content": "beep"}]}, "bad_message"),
    ("openai", {"messages": "[not json"}, "bad_json_messages"),
    ("openai", {"messages": [USER, {"role": "assistant", "content": "ok"}], "tools": [{"description": "no name"}]}, "bad_tool_spec"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "get_weather(Oslo)"}],
                  "tools": json.dumps([WEATHER_FN])}, "bad_function_call"),
    ("sharegpt", {"conversations": [{"from": "observation", "value": "{}"}, {"from": "gpt", "value": "ok"}]}, "orphan_tool_result"),
    ("sharegpt", {"tools": "[]"}, "missing_conversations"),
    ("apigen_mt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "missing_system"),
    ("hermes", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<tool_call>\n{'name': 'get_weather'"}]},
     "bad_tool_call"),
    ("hermes", {"conversations": [{"from": "system", "value": "<tools>\n[{'name': 'x',\n</tools>"}, {"from": "gpt", "value": "ok"}]},
     "bad_tools_block"),
    ("hermes", {"conversations": [{"from": "system", "value": "You may call: <tools>\n[]"}, {"from": "gpt", "value": "ok"}]},
     "bad_tools_block"),  # unclosed: not silently dropped with its tools
    ("hermes", {"conversations": [{"from": "human", "value": "Weather?"},
                                  {"from": "gpt", "value": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>"}],
                "tools": json.dumps([WEATHER])}, None),  # fine: shows that the row above fails only on its block
    ("glaive", {"system": "SYSTEM: no functions", "chat": "Hello there\nASSISTANT: hi"}, "bad_chat"),
    ("glaive", {"system": GLAIVE_SYSTEM,
                "chat": "USER: Hi\nASSISTANT: <functioncall> {\"name\": \"search_song\", \"arguments\": '{\"title\": }'} <|endoftext|>"},
     "bad_arguments"),
    ("glaive", {"system": GLAIVE_SYSTEM, "chat": "USER: Hi\nASSISTANT: <functioncall> search_song('x') <|endoftext|>"}, "bad_function_call"),
    ("toolace", {"system": TOOLACE_SYSTEM, "conversations": [{"from": "user", "value": "x"},
                                                             {"from": "assistant", "value": "[Currency Convert(12.5)]"}]},
     "bad_call_syntax"),
    ("toolace", {"system": TOOLACE_SYSTEM, "conversations": [{"from": "user", "value": "x"},
                                                             {"from": "assistant", "value": "[Get Weather(city=\"Oslo\")]"}]},
     "unknown_tool"),
]


@pytest.mark.parametrize("dataset_format,row,reason", MALFORMED, ids=[f"{f}-{r}" for f, _, r in MALFORMED])
def test_each_reason_is_raised(dataset_format, row, reason):
    if reason is None:
        df.CONVERTERS[dataset_format](row)
        return
    with pytest.raises(fc.MalformedRow) as err:
        df.CONVERTERS[dataset_format](row)
    assert err.value.reason == reason


def test_every_documented_check_is_in_reasons():
    assert {"bad_arguments", "unknown_tool", "orphan_tool_result", "no_trained_turn"} <= set(df.REASONS)
    assert {r for _, _, r in MALFORMED if r and not r.startswith(("missing_", "bad_json_"))} <= set(df.REASONS)


def test_a_source_is_counted_per_reason_with_the_first_offending_row():
    good = {"messages": [USER, oa_call("{\"city\": \"Oslo\"}")], "tools": [WEATHER]}
    rows = [good, {"messages": [USER, oa_call("{oops")], "tools": [WEATHER]}, good,
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": [WEATHER]},
            {"messages": [USER, oa_call("{oops")], "tools": [WEATHER]}]
    result = df.convert_rows(rows, "auto")
    assert result.format == "openai" and len(result.examples) == 2
    assert result.skipped == {"bad_arguments": 2, "orphan_tool_result": 1}
    assert result.first_bad["bad_arguments"].startswith("row 1: bad_arguments")
    assert result.first_bad["orphan_tool_result"].startswith("row 3: orphan_tool_result")
    with pytest.raises(ValueError, match="not conversational"):
        df.convert_rows([{"prompt": "a", "completion": "b"}], "auto")
    with pytest.raises(ValueError, match="not one of"):
        df.convert_rows(rows, "sharegtp")


def test_detect_format_from_columns_and_the_first_row():
    assert df.detect_format(["id", "query", "tools", "answers"]) == "xlam"
    assert df.detect_format(["messages", "tools", "parallel_tool_calls"]) == "openai"
    assert df.detect_format(["system", "chat"]) == "glaive"
    assert df.detect_format(["id", "conversations", "tools", "category", "subcategory", "task"]) == "hermes"
    assert df.detect_format(["conversations", "tools", "system"]) == "sharegpt"  # APIGen-MT's columns convert the same
    assert df.detect_format(["system", "conversations"]) == "toolace"
    assert df.detect_format(["prompt", "completion"]) == "prompt_completion"
    assert df.detect_format(["instruction", "context", "response", "category"]) == "dolly"
    hermes_like = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<tool_call>{}</tool_call>"}], "tools": "[]"}
    assert df.detect_format(["conversations", "tools"], hermes_like) == "hermes"
    assert df.detect_format(["conversations", "tools", "system"], apigen_row()) == "sharegpt"
    toolace_like = {"system": TOOLACE_SYSTEM, "conversations": [{"from": "user", "value": "x"}, {"from": "assistant", "value": "[A(b=1)]"}]}
    assert df.detect_format(["conversations", "system"], toolace_like) == "toolace"
    with pytest.raises(ValueError, match="cannot tell"):
        df.detect_format(["text"])
    assert df.resolve_format("auto", ["system", "chat"]) == "glaive" and df.resolve_format("hermes", []) == "hermes"


# --- transforms on normal-form rows ---------------------------------------------------------------------------------


def test_masking_renames_consistently_across_every_turn():
    example = df.apigen_mt_to_messages(apigen_row())
    before = json.loads(json.dumps(example))
    masked = df.mask_functions(example, random.Random(3))
    assert example == before  # pure
    df.check_example(masked)  # still valid: every call names a listed tool, every result follows a call
    renamed = {old["function"]["name"]: new["function"]["name"] for old, new in zip(example["tools"], masked["tools"])}
    assert not set(renamed) & set(renamed.values()) and all(5 <= len(n) <= 15 for n in renamed.values())
    properties = {t["function"]["name"]: t["function"]["parameters"] for t in masked["tools"]}
    for old, new in zip(example["messages"], masked["messages"]):
        assert old["role"] == new["role"] and old["content"] == new["content"]
        for old_call, new_call in zip(old.get("tool_calls", []), new.get("tool_calls", [])):
            assert new_call["function"]["name"] == renamed[old_call["function"]["name"]]
            schema = properties[new_call["function"]["name"]]
            assert set(new_call["function"]["arguments"]) <= set(schema["properties"]) == set(schema["required"])
            assert list(new_call["function"]["arguments"].values()) == list(old_call["function"]["arguments"].values())
        if old["role"] == "tool":
            assert new["name"] == renamed[old["name"]]
    # the same function gets the same name in its two calls (turns 2 and 3 of the conversation)
    details = [m["tool_calls"][0]["function"]["name"] for m in masked["messages"] if m.get("tool_calls")]
    assert details[1] == details[2] == renamed["get_order_details"]
    assert df.mask_functions(example, random.Random(3)) == masked


def test_irrelevance_and_extra_tools_take_single_call_rows_only():
    single = df.openai_to_messages({"messages": [{"role": "system", "content": "Be brief."}, USER, oa_call("{\"city\": \"Oslo\"}")],
                                    "tools": [WEATHER, CONVERT]})
    multi = df.apigen_mt_to_messages(apigen_row())
    pool = df.tool_pool([single, multi])
    assert [df.tool_name(t) for t in pool] == ["get_weather", "convert_currency", "find_user_id_by_email", "get_order_details"]
    irrelevant = df.make_irrelevant(single, random.Random(0), pool)
    assert irrelevant == {"messages": [{"role": "system", "content": "Be brief."}, USER,
                                       {"role": "assistant", "content": fc.NO_TOOL_FITS_REPLY}], "tools": [CONVERT]}
    df.check_example(irrelevant)
    only_called = {**single, "tools": [WEATHER]}  # nothing left: 1-3 other tools from the pool are listed instead
    listed = df.make_irrelevant(only_called, random.Random(0), pool)["tools"]
    assert listed and "get_weather" not in {df.tool_name(t) for t in listed}
    assert df.make_irrelevant(only_called, random.Random(0), [WEATHER]) is None
    assert df.make_irrelevant(multi, random.Random(0), pool) is None
    extra = df.add_extra_tools(single, random.Random(0), pool, 2)
    names = [df.tool_name(t) for t in extra["tools"]]
    assert len(names) == 4 == len(set(names)) and extra["messages"] == single["messages"]
    assert df.add_extra_tools(multi, random.Random(0), pool, 2) is None
    assert df.is_single_call(single) and not df.is_single_call(multi) and not df.is_single_call(irrelevant)


def test_user_texts_and_complexity_of_a_conversation():
    example = df.apigen_mt_to_messages(apigen_row())
    assert df.user_texts(example) == ["Hi, I want to check order #W123. My email is ana@example.com.",
                                      "Great, what's the status of #W999 then?"]
    assert df.complexity(example) == (3, 2)
