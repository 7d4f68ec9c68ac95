"""Build the offline default: xLAM-schema sample data, a BFCL-format held-out split, a tiny tokenizer and a tiny
Qwen2-architecture model with random weights. Deterministic: the same seed gives byte-identical files.

make_demo_assets.py is the command line, and its docstring lists the files written.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import (
    GPT2Tokenizer,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)

from fcsft.chat_formats import xlam_to_messages

# ---------------------------------------------------------------------------------------------------------------
# A small tool library: each tool knows its xLAM spec and how to draw (arguments, the phrase that asks for them).
# ---------------------------------------------------------------------------------------------------------------

CITIES = ["Paris", "Tokyo", "Berlin", "Lima", "Cairo", "Oslo", "Austin", "Seoul", "Madrid", "Nairobi", "Toronto", "Hanoi"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "INR", "CAD", "CHF", "BRL"]
SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOG", "META", "IBM"]
LANGS = ["French", "German", "Spanish", "Japanese", "Korean", "Italian"]
WORDS = ["hello world", "good morning", "thank you very much", "where is the station", "see you tomorrow"]
PRODUCTS = ["running shoes", "laptop stand", "coffee grinder", "desk lamp", "yoga mat", "water bottle"]


@dataclass
class Param:
    type: str  # xLAM's Python-style type string; no description: the compact specs leave it out
    default: object = None  # a default makes the parameter optional, as in xLAM
    has_default: bool = False


@dataclass
class Tool:
    name: str
    description: str
    params: dict
    draw: object = field(repr=False)  # rng -> (arguments, phrase)

    def xlam_spec(self):
        """Compact: the parameters' types and defaults, no descriptions (the names say it), so every training
        sequence is shorter and the demo's few CPU minutes see more examples."""
        params = {}
        for name, p in self.params.items():
            spec = {"type": p.type}
            if p.has_default:
                spec["default"] = p.default
            params[name] = spec
        return {"name": self.name, "description": self.description, "parameters": params}


def _weather(rng):
    city = rng.choice(CITIES)
    if rng.random() < 0.4:
        unit = rng.choice(["celsius", "fahrenheit"])
        return {"city": city, "unit": unit}, f"the weather in {city} in {unit}"
    return {"city": city}, f"the current weather in {city}"


def _currency(rng):
    amount = float(rng.choice([10, 25, 50, 99.5, 120, 250, 1000, 12.75]))
    a, b = rng.sample(CURRENCIES, 2)
    return {"amount": amount, "from_currency": a, "to_currency": b}, f"convert {amount:g} {a} to {b}"


def _stock(rng):
    symbol = rng.choice(SYMBOLS)
    return {"symbol": symbol}, f"the latest stock price of {symbol}"


def _primes(rng):
    limit = rng.choice([10, 20, 50, 100, 200, 500])
    return {"limit": limit}, f"all prime numbers below {limit}"


def _sort(rng):
    numbers = rng.sample(range(1, 60), rng.randint(3, 6))
    if rng.random() < 0.5:
        return {"numbers": numbers, "descending": True}, f"the numbers {numbers} sorted in descending order"
    return {"numbers": numbers}, f"the numbers {numbers} sorted"


def _bmi(rng):
    weight, height = float(rng.choice([55, 62.5, 70, 81, 95])), rng.choice([1.6, 1.72, 1.8, 1.85, 1.9])
    return {"weight_kg": weight, "height_m": height}, f"the BMI of someone weighing {weight:g} kg at {height} m"


def _translate(rng):
    text, lang = rng.choice(WORDS), rng.choice(LANGS)
    if rng.random() < 0.3:
        return {"text": text, "target_language": lang, "source_language": "English"}, f"a translation of '{text}' from English to {lang}"
    return {"text": text, "target_language": lang}, f"a translation of '{text}' into {lang}"


def _products(rng):
    query = rng.choice(PRODUCTS)
    if rng.random() < 0.5:
        n = rng.choice([3, 5, 8, 20])
        return {"query": query, "max_results": n}, f"the top {n} results for {query}"
    return {"query": query}, f"search results for {query}"


def _timezone(rng):
    city = rng.choice(CITIES)
    return {"city": city}, f"the local time in {city}"


def _flight(rng):
    a, b = rng.sample(CITIES, 2)
    day = rng.randint(1, 28)
    date = f"2025-0{rng.randint(1, 9)}-{day:02d}"
    if rng.random() < 0.4:
        n = rng.randint(2, 4)
        return {"origin": a, "destination": b, "date": date, "passengers": n}, f"flights from {a} to {b} on {date} for {n} passengers"
    return {"origin": a, "destination": b, "date": date}, f"flights from {a} to {b} on {date}"


def _average(rng):
    numbers = [float(x) for x in rng.sample(range(1, 100), rng.randint(3, 5))]
    return {"values": numbers}, f"the average of {[f'{x:g}' for x in numbers]}".replace("'", "")


def _preferences(rng):
    theme, lang = rng.choice(["dark", "light"]), rng.choice(["en", "fr", "de"])
    return {"settings": {"theme": theme, "language": lang}}, f"my preferences set to theme {theme} and language {lang}"


TOOLS = [
    Tool("get_weather", "Get the current weather for a city.", {
        "city": Param("str"),
        "unit": Param("str, optional"),
    }, _weather),
    Tool("convert_currency", "Convert an amount of money from one currency to another.", {
        "amount": Param("float"),
        "from_currency": Param("str"),
        "to_currency": Param("str"),
    }, _currency),
    Tool("get_stock_price", "Fetch the latest trading price of a stock.", {
        "symbol": Param("str"),
    }, _stock),
    Tool("list_primes", "List the prime numbers below a limit.", {
        "limit": Param("int"),
    }, _primes),
    Tool("sort_numbers", "Sort a list of integers.", {
        "numbers": Param("List[int]"),
        "descending": Param("bool", False, True),
    }, _sort),
    Tool("calculate_bmi", "Compute the body mass index.", {
        "weight_kg": Param("float"),
        "height_m": Param("float"),
    }, _bmi),
    Tool("translate_text", "Translate text into another language.", {
        "text": Param("str"),
        "target_language": Param("str"),
        "source_language": Param("Optional[str]"),
    }, _translate),
    Tool("search_products", "Search the product catalogue.", {
        "query": Param("str"),
        "max_results": Param("int", 10, True),
    }, _products),
    Tool("get_local_time", "Get the current local time in a city.", {
        "city": Param("str"),
    }, _timezone),
    Tool("search_flights", "Find flights between two cities on a date.", {
        "origin": Param("str"),
        "destination": Param("str"),
        "date": Param("str"),
        "passengers": Param("int", 1, True),
    }, _flight),
    Tool("average", "Compute the arithmetic mean of numbers.", {
        "values": Param("List[float]"),
    }, _average),
    Tool("set_preferences", "Update the user's app preferences.", {
        "settings": Param("Dict[str, Any]"),
    }, _preferences),
]

OPENERS = ["Can you get me", "I need", "Please find", "Show me", "Could you look up", "Tell me", "Give me"]
JOINERS = [", and also ", ". Then get ", ", plus ", "; also "]


def draw_row(rng, category):
    """One xLAM row of the given BFCL-style category; returns (tools listed, calls, query)."""
    if category == "simple":
        tool = rng.choice(TOOLS)
        listed, called = [tool], [tool]
    elif category == "multiple":
        listed = rng.sample(TOOLS, rng.randint(2, 4))
        called = [rng.choice(listed)]
    elif category == "parallel":
        tool = rng.choice(TOOLS)
        listed, called = [tool], [tool] * rng.randint(2, 3)
    elif category == "parallel_multiple":
        listed = rng.sample(TOOLS, rng.randint(2, 4))
        called = rng.sample(listed, 2)
    else:  # irrelevance: the request needs a tool that is not listed, so the right answer calls nothing
        wanted = rng.choice(TOOLS)
        args, phrase = wanted.draw(rng)
        listed = rng.sample([t for t in TOOLS if t is not wanted], rng.randint(1, 3))
        return listed, [], rng.choice(OPENERS) + " " + phrase + "?"
    calls, phrases = [], []
    for tool in called:
        args, phrase = tool.draw(rng)
        calls.append({"name": tool.name, "arguments": args})
        phrases.append(phrase)
    query = rng.choice(OPENERS) + " " + rng.choice(JOINERS).join(phrases) + "?"
    return listed, calls, query


CATEGORIES = ["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"]
CALL_CATEGORIES = CATEGORIES[:4]


def train_category(index):
    """Every 10th training row calls nothing (xlam-irrelevance's form, `answers: []`); the rest cycle the others."""
    return "irrelevance" if index % 10 == 9 else CALL_CATEGORIES[index % 4]
BFCL_TYPES = {"str": "string", "int": "integer", "float": "float", "bool": "boolean"}


def bfcl_param(p):
    base = p.type.replace(", optional", "")
    if base.startswith("Optional["):
        base = base[len("Optional["):-1]
    if base.startswith("List["):
        spec = {"type": "array", "items": {"type": BFCL_TYPES[base[5:-1]]}}
    elif base.startswith("Dict"):
        spec = {"type": "dict", "properties": {}}
    else:
        spec = {"type": BFCL_TYPES[base]}
    if p.has_default:
        spec["default"] = p.default
    return spec


def bfcl_entry(idx, category, listed, calls, query):
    """The same sample as a BFCL question + possible answer (python types, "" = may be omitted)."""
    functions = []
    for tool in listed:
        required = [n for n, p in tool.params.items() if not p.has_default and "optional" not in p.type.lower()]
        functions.append({"name": tool.name, "description": tool.description, "parameters": {
            "type": "dict", "properties": {n: bfcl_param(p) for n, p in tool.params.items()}, "required": required}})
    ground_truth = []
    by_name = {t.name: t for t in TOOLS}
    for call in calls:
        allowed = {}
        for name, p in by_name[call["name"]].params.items():
            if name in call["arguments"]:
                value = call["arguments"][name]
                allowed[name] = [{k: [v] for k, v in value.items()}] if isinstance(value, dict) else [value]
            elif p.has_default:
                allowed[name] = ["", p.default]
            else:
                allowed[name] = [""]
        ground_truth.append({call["name"]: allowed})
    entry_id = f"demo_{category}_{idx}"
    question = {"id": entry_id, "question": [[{"role": "user", "content": query}]], "function": functions}
    return question, {"id": entry_id, "ground_truth": ground_truth}


def write_data(out, seed, n_train, n_heldout_per_category, heldout_seed=0):
    """The held-out split first, from its own random stream (`heldout_seed`), so it is the same whatever the training
    size and seed; then the training rows, skipping any question that is held out."""
    heldout_rng, train_rng = random.Random(f"heldout-{heldout_seed}"), random.Random(seed)
    heldout = out / "bfcl_heldout"
    (heldout / "possible_answer").mkdir(parents=True, exist_ok=True)
    held_out_queries, heldout_calls = set(), []
    for category in CATEGORIES:
        questions, answers = [], []
        while len(questions) < n_heldout_per_category:
            listed, calls, query = draw_row(heldout_rng, category)
            if query in held_out_queries:
                continue
            held_out_queries.add(query)
            q, a = bfcl_entry(len(questions), category, listed, calls, query)
            heldout_calls.append(calls)
            questions.append(q)
            answers.append(a)
        # irrelevance has no possible answers: the official checker passes an entry when nothing decodes as a call
        for folder, items in ((heldout, questions), (heldout / "possible_answer", answers))[:1 if category == "irrelevance" else 2]:
            with open(folder / f"BFCL_v4_demo_{category}.json", "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in items)

    train_dir = out / "xlam_sample"
    train_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    while len(rows) < n_train:
        listed, calls, query = draw_row(train_rng, train_category(len(rows)))
        if query in held_out_queries:  # held out means never trained on
            continue
        rows.append({"id": len(rows), "query": query, "tools": json.dumps([t.xlam_spec() for t in listed]),
                     "answers": json.dumps(calls)})
    with open(train_dir / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows, heldout_calls


def answer_text(calls):
    """The reply the model is trained to write for `calls` (Qwen2.5's tool-call format, as the chat template renders it)."""
    return "\n".join(f'<tool_call>\n{json.dumps({"name": c["name"], "arguments": c["arguments"]})}\n</tool_call>'
                     for c in calls) + "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]


def qwen25_chat_template():
    """Qwen2.5-Instruct's real chat template, as TRL ships it (so TRL recognises it and swaps in its training twin)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()


def build_tokenizer(rows, vocab_size):
    """BPE trained on the text the model is shown: the rows as the chat template renders them (tools as JSON schema),
    the tool library as BFCL's prompts write it, and the template itself."""
    corpus = []
    for row in rows:
        tools = xlam_to_messages(row)["tools"]
        corpus.append("\n".join([*map(json.dumps, tools), row["query"], answer_text(json.loads(row["answers"]))]))
    corpus.append(json.dumps(bfcl_entry(0, "simple", TOOLS, [], "")[0]["function"]))
    corpus.append(qwen25_chat_template())
    tok = Tokenizer(models.BPE())
    # Qwen2's own normaliser and pre-tokenizer, which transformers puts back when it loads the files as a
    # Qwen2Tokenizer: the merges are learned on the same pieces that training and eval will cut the text into.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(QWEN_ADDED)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        additional_special_tokens=QWEN_SPECIAL[1:], chat_template=qwen25_chat_template(), model_max_length=4096,
    )


def build_model(tokenizer, seed, num_layers, hidden_size):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 11 // 4, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
        tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------------
# Dolly-15k-format sample and a tiny OPT model: the offline stand-ins for recipes/dolly_opt.yaml
# ---------------------------------------------------------------------------------------------------------------

FACTS = [  # city, country, river, a landmark, population in millions
    ("Paris", "France", "Seine", "the Eiffel Tower", 2.1), ("Tokyo", "Japan", "Sumida", "the Senso-ji temple", 14.0),
    ("Berlin", "Germany", "Spree", "the Brandenburg Gate", 3.7), ("Lima", "Peru", "Rimac", "the Plaza Mayor", 10.0),
    ("Cairo", "Egypt", "Nile", "the Cairo Citadel", 10.1), ("Oslo", "Norway", "Akerselva", "the Opera House", 0.7),
    ("Madrid", "Spain", "Manzanares", "the Prado Museum", 3.3), ("Seoul", "South Korea", "Han", "Gyeongbokgung", 9.4),
    ("Hanoi", "Vietnam", "Red River", "the Temple of Literature", 8.4), ("Toronto", "Canada", "Don", "the CN Tower", 2.8),
]
PACKING = ["a warm coat", "comfortable shoes", "an umbrella", "a power adapter", "a phrase book", "sunscreen", "a map"]
FRUITS, VEGETABLES = ["apple", "mango", "pear", "cherry", "banana"], ["carrot", "leek", "spinach", "potato", "onion"]


def draw_dolly_row(rng):
    """One row in Dolly-15k's schema; half of the kinds come with a context passage (closed QA, summarization,
    information extraction), as in the real data."""
    city, country, river, landmark, millions = rng.choice(FACTS)
    passage = (f"{city} is a city in {country}. The {river} flows through it, and {landmark} is one of its best-known "
               f"sights. About {millions:g} million people live in the {city} area.")
    kind = rng.choice(["open_qa", "closed_qa", "summarization", "brainstorming", "classification", "information_extraction"])
    if kind == "open_qa":
        return {"instruction": f"Which country is {city} in?", "context": "", "response": f"{city} is in {country}.", "category": kind}
    if kind == "closed_qa":
        return {"instruction": f"How many people live in {city}?", "context": passage,
                "response": f"About {millions:g} million people live in the {city} area.", "category": kind}
    if kind == "summarization":
        return {"instruction": f"Summarize this text about {city} in one sentence.", "context": passage,
                "response": f"{city} is a city of about {millions:g} million people in {country}, on the {river}.", "category": kind}
    if kind == "brainstorming":
        items = rng.sample(PACKING, 3)
        return {"instruction": f"Give me three things to pack for a trip to {city}.", "context": "",
                "response": f"1. {items[0].capitalize()}\n2. {items[1].capitalize()}\n3. {items[2].capitalize()}", "category": kind}
    if kind == "classification":
        words = rng.sample(FRUITS, 2) + rng.sample(VEGETABLES, 2)
        rng.shuffle(words)
        labels = ", ".join(f"{w}: {'fruit' if w in FRUITS else 'vegetable'}" for w in words)
        return {"instruction": f"Classify each as a fruit or a vegetable: {', '.join(words)}.", "context": "",
                "response": labels, "category": kind}
    return {"instruction": "Which river and which sight does the text mention?", "context": passage,
            "response": f"The {river} and {landmark}.", "category": kind}


def write_dolly(out, seed, n_rows):
    rng = random.Random(seed + 1)  # its own stream: the xLAM and BFCL files stay byte-identical
    rows = [draw_dolly_row(rng) for _ in range(n_rows)]
    (out / "dolly_sample").mkdir(parents=True, exist_ok=True)
    with open(out / "dolly_sample" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


OPT_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, as in facebook/opt-*


def build_opt_tokenizer(rows, vocab_size):
    """Byte-level BPE loaded through GPT2Tokenizer like facebook/opt-*: bos = eos = </s>, prepended to every text."""
    corpus = [f"### Instruction:\n{r['instruction']}\n\n### Context:\n{r['context']}\n\n### Response:\n{r['response']}" for r in rows]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    return GPT2Tokenizer(vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]], bos_token="</s>",
                         eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True,
                         model_max_length=2048, padding_side="right")


def build_opt_model(tokenizer, seed):
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=64, ffn_dim=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, do_layer_norm_before=True, activation_function="relu",
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return OPTForCausalLM(config)


def build_demo_assets(out, seed=0, n_train=2800, n_heldout=10, vocab_size=2048, num_layers=2, hidden_size=256, n_dolly=48,
                      heldout_seed=0):
    """Write every asset into `out` (make_demo_assets.py's flags name the arguments), saying what was written."""
    out = Path(out)
    rows, heldout_calls = write_data(out, seed, n_train, n_heldout, heldout_seed)
    tokenizer = build_tokenizer(rows, vocab_size)
    model = build_model(tokenizer, seed, num_layers, hidden_size)
    model.save_pretrained(out / "tiny-qwen2")
    tokenizer.save_pretrained(out / "tiny-qwen2")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(rows)} xLAM rows, {len(CATEGORIES) * n_heldout} held-out BFCL entries and a {n_params / 1e6:.2f}M-parameter "
          f"Qwen2 model (vocab {len(tokenizer)}) to {out}/")
    longest = max(len(tokenizer(answer_text(calls))["input_ids"]) for calls in heldout_calls)
    print(f"the longest held-out answer is {longest} tokens: generate at least that many (make demo: DEMO_MAX_NEW_TOKENS)")

    dolly_rows = write_dolly(out, seed, n_dolly)
    opt_tokenizer = build_opt_tokenizer(dolly_rows, vocab_size=1024)
    opt_model = build_opt_model(opt_tokenizer, seed)
    opt_model.save_pretrained(out / "tiny-opt")
    opt_tokenizer.save_pretrained(out / "tiny-opt")
    print(f"wrote {len(dolly_rows)} Dolly-format rows and a {sum(p.numel() for p in opt_model.parameters()) / 1e6:.2f}M-parameter "
          f"OPT model (vocab {len(opt_tokenizer)}) to {out}/")

