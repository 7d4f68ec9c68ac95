"""Decontamination against BFCL v4: every user turn of every category of the installed bfcl-eval data, and the
rules by which a training request counts as a copy of one.

A training request duplicates a BFCL question when, after lower-casing and dropping punctuation, (a) the texts are
equal, (b) the request contains the whole question (questions of 5-7 words), or (c) at least half of the word 8-grams
of either text occur in the other (near-copies, with words added or changed).
"""

import importlib.util
import re
from collections import Counter, defaultdict
from pathlib import Path

from fcsft.bfcl_data import package_data_dir, read_jsonl
from fcsft.errors import UserError

DECONTAMINATION_NGRAM, DECONTAMINATION_OVERLAP, SHORTEST_CONTAINED = 8, 0.5, 5


def normalise(text):
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def ngrams(words, n=DECONTAMINATION_NGRAM):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _user_texts(question):
    if isinstance(question, dict):
        return [question["content"]] if question.get("role") == "user" and isinstance(question.get("content"), str) else []
    if isinstance(question, list):
        return [text for item in question for text in _user_texts(item)]
    return []


class BfclQuestions:
    """Every user turn of every BFCL v4 file, indexed for the three rules above."""

    def __init__(self, data_dir=None):
        if not data_dir and importlib.util.find_spec("bfcl_eval") is None:
            raise UserError("decontaminate needs the BFCL v4 questions: install bfcl-eval (`make setup` does), set "
                     "decontamination_data_dir to a folder of BFCL_v4_*.json files, or set decontaminate: false")
        data_dir = Path(data_dir) if data_dir else package_data_dir()
        self.texts, self.exact, self.short, self.index, self.grams = [], {}, {}, defaultdict(set), []
        for path in sorted(data_dir.glob("BFCL_v4_*.json")):
            if "format_sensitivity" in path.name:  # a list of ids of other categories' entries, not questions
                continue
            for entry in read_jsonl(path):
                for text in _user_texts(entry.get("question")):
                    number, words = len(self.texts), normalise(text).split()
                    self.texts.append((entry.get("id", path.stem), text))
                    self.exact.setdefault(" ".join(words), number)
                    if SHORTEST_CONTAINED <= len(words) < DECONTAMINATION_NGRAM:
                        self.short.setdefault(tuple(words), number)
                    grams = ngrams(words)
                    self.grams.append(len(grams))
                    for gram in grams:
                        self.index[gram].add(number)
        if not self.texts:
            raise UserError(f"no BFCL questions found in {data_dir} to decontaminate against")

    def match(self, request):
        """(BFCL id, question) that the request duplicates, or None."""
        words = normalise(request).split()
        if " ".join(words) in self.exact:
            return self.texts[self.exact[" ".join(words)]]
        for size in range(SHORTEST_CONTAINED, DECONTAMINATION_NGRAM):
            for start in range(len(words) - size + 1):
                if tuple(words[start:start + size]) in self.short:
                    return self.texts[self.short[tuple(words[start:start + size])]]
        grams = ngrams(words)
        hits = Counter(number for gram in grams for number in self.index.get(gram, ()))
        for number, count in hits.items():
            if count / len(grams) >= DECONTAMINATION_OVERLAP or count / self.grams[number] >= DECONTAMINATION_OVERLAP:
                return self.texts[number]
        return None


def request_texts(example):
    """What is compared with BFCL's questions: every user turn of a conversation (a row is dropped if any one
    matches: a copied question may sit in a later turn), or a prompt/completion row's prompt."""
    if "messages" in example:
        return [m["content"] for m in example["messages"] if m["role"] == "user" and isinstance(m.get("content"), str)]
    return [example["prompt"]]
