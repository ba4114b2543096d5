"""RULER's synthetic tasks, generated offline for any tokenizer, and their scoring.

Hsieh, Sun, Kriman, Acharya, Rekesh, Jia, Zhang, Ginsburg, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", COLM 2024 (arXiv:2404.06654). The tasks that need no download:

* ``niah_single`` / ``niah_multikey`` / ``niah_multivalue`` / ``niah_multiquery``: needles "One of the special
  magic numbers for {key} is: {value}." hidden in a haystack; one needle, one asked among distractor keys,
  several values of one key, several keys asked at once;
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... spread over the haystack; name
  every variable holding the value;
* ``cwe`` (common words extraction): a numbered list where 10 words appear often and the rest rarely;
* ``fwe`` (frequent words extraction): a "coded text" of words drawn from a Zipf distribution; the top 3.

Keys and words are pronounceable pseudo-words (no word list to download); the haystack is RULER's noise
sentence or lines of text the caller passes (e.g. the embedded corpus). A prompt holds at most ``length``
tokens: pieces are added while they fit. Scoring is RULER's ``string_match_all``: the fraction of the
reference answers found (case-insensitive) in the generated text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "One of the special magic numbers for {key} is: {value}.\n"
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
_CONS, _VOWELS = "bdfghklmnprstvz", "aeiou"


@dataclass
class Item:
    """One prompt: ``ids [<= length]`` int64 (instructions, context, question, answer prefix), the reference
    ``answers`` and the ``max_new`` tokens a complete answer needs."""

    task: str
    ids: np.ndarray
    answers: list
    max_new: int


def pseudo_words(rng: np.random.Generator, n: int, syllables: int = 3) -> list:
    """``n`` distinct pronounceable words of ``syllables`` consonant-vowel pairs."""
    words: dict = {}
    while len(words) < n:
        w = "".join(_CONS[rng.integers(len(_CONS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables))
        words[w] = None
    return list(words)


def _number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))  # RULER's 7-digit magic numbers


class _Builder:
    """Token budget bookkeeping: ``head`` + body pieces + ``tail`` within ``length`` tokens."""

    def __init__(self, tokenizer, length: int, head: str, tail: str, needles: Sequence[str] = ()):
        self.enc = lambda s: np.asarray(tokenizer.encode(s), dtype=np.int64)
        self.head, self.tail = self.enc(head), self.enc(tail)
        self.needles = [self.enc(n) for n in needles]
        self.left = length - len(self.head) - len(self.tail) - sum(len(n) for n in self.needles)
        if self.left < 0:
            raise ValueError(f"length {length} is too short for this task: it needs at least "
                             f"{length - self.left} tokens without any filler.")

    def fill(self, lines: Sequence[str]) -> list:
        """Encoded ``lines`` (cycled) while they fit."""
        out, i = [], 0
        encoded = [self.enc(line) for line in lines]
        while encoded and len(encoded[i % len(encoded)]) <= self.left:
            out.append(encoded[i % len(encoded)])
            self.left -= len(out[-1])
            i += 1
        return out

    def join(self, body: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.head, *body, self.tail]).astype(np.int64)


def _haystack_item(task, tokenizer, length, rng, needles, question, answers, haystack) -> Item:
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them. " \
           "I will quiz you about the numbers afterwards.\n"
    b = _Builder(tokenizer, length, head, question, needles)
    lines = b.fill(haystack or [NOISE])
    # Needles at random line boundaries, in their given order (a variable chain stays in order).
    slots = np.sort(rng.integers(0, len(lines) + 1, size=len(needles)))
    body = []
    for i, line in enumerate(lines + [None]):
        body += [b.needles[k] for k in range(len(needles)) if slots[k] == i]
        if line is not None:
            body.append(line)
    n_answer = len(tokenizer.encode(" " + ", ".join(answers)))
    return Item(task, b.join(body), list(answers), n_answer + 8)


def make_item(task: str, tokenizer, length: int, rng: np.random.Generator,
              haystack: Optional[Sequence[str]] = None, n_needles: int = 4, hops: int = 4) -> Item:
    """One prompt of ``task`` (one of :data:`TASKS`) with at most ``length`` tokens.

    ``haystack``: filler lines (None: RULER's noise sentence); ``n_needles``: needles of the multi-needle
    tasks; ``hops``: assignments after the first in ``vt``. Raises ValueError for an unknown task or a
    length that cannot hold the task without filler.
    """
    if task.startswith("niah"):
        keys = pseudo_words(rng, n_needles)
        values = [_number(rng) for _ in keys]
        if task == "niah_single":
            keys, values = keys[:1], values[:1]
        if task == "niah_multivalue":
            keys = [keys[0]] * len(values)
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        order = rng.permutation(len(needles))
        needles = [needles[i] for i in order]
        if task in ("niah_single", "niah_multikey"):
            j = int(rng.integers(len(keys)))
            q = (f"What is the special magic number for {keys[j]} mentioned in the provided text? "
                 f"The special magic number for {keys[j]} mentioned in the provided text is")
            answers = [values[j]]
        elif task == "niah_multivalue":
            q = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                 f"The special magic numbers for {keys[0]} mentioned in the provided text are")
            answers = values
        elif task == "niah_multiquery":
            ks = ", ".join(keys[:-1]) + f" and {keys[-1]}"
            q = (f"What are all the special magic numbers for {ks} mentioned in the provided text? "
                 f"The special magic numbers for {ks} mentioned in the provided text are")
            answers = values
        else:
            raise ValueError(f"unknown RULER task {task!r}; choose from {list(TASKS)}.")
        return _haystack_item(task, tokenizer, length, rng, needles, "\n" + q, answers, haystack)
    if task == "vt":
        names = [w.upper() for w in pseudo_words(rng, hops + 1, 2)]
        value = str(int(rng.integers(10_000, 100_000)))
        chain = [f"VAR {names[0]} = {value}.\n"] + [f"VAR {names[i]} = VAR {names[i - 1]}.\n" for i in range(1, hops + 1)]
        q = (f"\nFind all variables that are assigned the value {value} in the text above. Answer: According to "
             f"the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned the value "
             f"{value}, they are:")
        return _haystack_item(task, tokenizer, length, rng, chain, q, names, haystack)
    if task == "cwe":
        return _cwe(tokenizer, length, rng)
    if task == "fwe":
        return _fwe(tokenizer, length, rng)
    raise ValueError(f"unknown RULER task {task!r}; choose from {list(TASKS)}.")


def _cwe(tokenizer, length, rng, n_common: int = 10, freq_common: int = 30, freq_rare: int = 3) -> Item:
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    tail = (f"\nQuestion: What are the {n_common} most common words in the above list? Answer: The top {n_common} "
            "words that appear most often in the list are:")
    b = _Builder(tokenizer, length, head, tail)
    per_entry = len(b.enc("100. bababa\n"))
    words = pseudo_words(rng, n_common + max(10, b.left // (per_entry * freq_rare)))
    common, rare = words[:n_common], words[n_common:]
    # RULER: 30 occurrences per common word, 3 per rare one; fewer when the context is short.
    freq_c = int(max(freq_rare + 1, min(freq_common, b.left // (per_entry * n_common * 2))))
    n_rare = max(0, min(len(rare), (b.left // per_entry - freq_c * n_common) // freq_rare))
    while True:  # shrink the rare words, then the common frequency, until the numbered list fits
        entries = common * freq_c + rare[:n_rare] * freq_rare
        entries = [entries[i] for i in rng.permutation(len(entries))]
        body = [b.enc(f"{i + 1}. {w}\n") for i, w in enumerate(entries)]
        if sum(len(x) for x in body) <= b.left:
            break
        if n_rare > 0:
            n_rare -= max(1, n_rare // 10)
        elif freq_c > freq_rare + 1:
            freq_c -= 1
        else:
            raise ValueError(f"length {length} is too short for cwe with {n_common} common words.")
    n_answer = len(tokenizer.encode(" " + ", ".join(common)))
    return Item("cwe", b.join(body), common, n_answer + 8)


def _fwe(tokenizer, length, rng, alpha: float = 2.0, top: int = 3) -> Item:
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.\n")
    tail = "\nAnswer: According to the coded text above, the three most frequently appeared words are:"
    b = _Builder(tokenizer, length, head, tail)
    words = pseudo_words(rng, 200)
    pieces = {w: b.enc(" " + w) for w in words}
    total = b.left // max(len(p) for p in pieces.values())  # words, each within the costliest's tokens
    counts = np.floor(total * (1.0 / np.arange(1, len(words) + 1) ** alpha) / np.sum(
        1.0 / np.arange(1, len(words) + 1) ** alpha)).astype(int)
    for i in range(top, -1, -1):  # strictly decreasing top ranks, so the answer is unique
        if counts[i] <= counts[i + 1]:
            counts[i] = counts[i + 1] + 1
    while counts.sum() > total and counts[top + 1:].sum() > 0:
        counts[np.nonzero(counts[top + 1:])[0][-1] + top + 1] -= 1
    if counts.sum() > total:
        raise ValueError(f"length {length} is too short for fwe: the coded text needs more words.")
    seq = [w for w, c in zip(words, counts) for _ in range(c)]
    seq = [seq[i] for i in rng.permutation(len(seq))]
    body = [pieces[w] for w in seq]
    n_answer = len(tokenizer.encode(" " + ", ".join(words[:top])))
    return Item("fwe", b.join(body), words[:top], n_answer + 8)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of ``answers`` that occur (case-insensitive) in ``prediction``."""
    pred = prediction.lower()
    return float(np.mean([a.lower() in pred for a in answers])) if answers else 0.0


def effective_length(mean_by_length: dict, threshold: float) -> Optional[int]:
    """RULER's effective length: the longest length whose mean score, and that of every shorter length,
    reaches ``threshold`` (None when even the shortest does not)."""
    best = None
    for n in sorted(mean_by_length):
        if mean_by_length[n] < threshold:
            break
        best = n
    return best
