"""RULER's synthetic tasks, generated offline: token-fitted prompts, their answers and needle depths.

Each task follows NVIDIA/RULER's own definition (files under `scripts/` of that repository, read for
this module and re-implemented, not copied):

- `synthetic.yaml`: the eleven synthetic tasks and their arguments (haystack, key and value types,
  number of keys / values / queries; vt: 1 chain of 4 hops; cwe: 30 / 3 repeats of 10 common words;
  fwe: alpha 2). `qa_1`/`qa_2` need SQuAD / HotpotQA downloads and are left out.
- `data/synthetic/constants.py`: the task templates, answer prefixes and tokens to generate
  (niah 128, vt 30, cwe 120, fwe 50). A prompt is the template followed by its answer prefix (the
  `base` model template of `data/template.py`, which `data/prepare.py` appends the prefix to).
- `data/synthetic/niah.py`: the needle "One of the special magic {type_needle_v} for {key} is:
  {value}."; keys and values as adjective-noun words (wonderwords lists), 7-digit numbers or UUID4s;
  num_needle_k = max(k, q); needles shuffled; the "noise" haystack (the repeated grass/sky/sun
  sentence, lines joined by newlines), the "essay" haystack (Paul Graham essays as words, split into
  sentences, needles inserted between sentences) and the "needle" haystack (distractor needles);
  depths from 40 evenly spaced percentages over 0-100; the singular wording ("A special magic
  number ... is") when one value is asked for; queries joined "a, b, and c".
- `data/synthetic/variable_tracking.py`: chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE " of
  5-letter names in the noise haystack, one one-shot example (3-letter names, its own noise, about
  500 tokens) before the prompt; the answer is every name of the chain.
- `data/synthetic/common_words_extraction.py`: a numbered list of words; below 4096 tokens 10 common
  words appear 6 times and the rest once, with a few-shot example of 20 words (3 / 1); from 4096 on
  30 / 3, with an example of 40 words (10 / 3); words from wonderwords' nouns, adjectives and verbs.
- `data/synthetic/freq_words_extraction.py`: coded 6-letter words with Zipf counts
  n * k^-alpha / zeta(alpha) over a vocabulary of (L - 50) / 50 words whose top rank is the noise
  word "..."; the answer is ranks 2-4.

Length fitting (all tasks, as the `generate_samples` functions of those files): a binary search on the
haystack size so that BOS + prompt + tokens to generate <= L with the given tokenizer; here it is done
per sample (every draw of a sample comes from one seeded generator, so only the haystack grows).

Where this differs from RULER, and why:
- The essay haystack is the bundled KJV corpus (`essay_words`), not Paul Graham's essays (a
  download); sentences are split at . ! ? followed by white space instead of with nltk.
- Needles of every niah haystack (not only the essay) go at depths drawn from the 40-point grid, so
  each sample records where its needles are; RULER draws noise/needle-haystack positions uniformly.
- Randomness is numpy's, keyed by (seed, task, length, sample index): the same seed gives the same
  prompts and answers, but not RULER's files.
- The vt example's budget is min(500, L // 4) tokens (RULER: 500), so short lengths still fit.
- cwe beyond wonderwords' 8.7k words takes distinct adjective-noun words instead of RULER's
  `english_words.json`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import string
import uuid
import zlib
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from longrope_jax.data.passkey import NOISE  # RULER's noise sentence is the landmark one

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))  # percent, as niah.py

# data/synthetic/constants.py: template + answer prefix, and tokens to generate.
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


@dataclasses.dataclass(frozen=True)
class Niah:
    """One niah task of synthetic.yaml."""

    haystack: str  # noise | essay | needle
    key_type: str  # words | numbers | uuids
    value_type: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH_TASKS = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", num_q=4),
}
TASKS = (*NIAH_TASKS, "vt", "cwe", "fwe")
VT_CHAINS, VT_HOPS = 1, 4  # synthetic.yaml
CWE_COMMON = 10
FWE_ALPHA, FWE_WORD_LEN = 2.0, 6


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: `ids` = BOS + tokens of `input + answer_prefix`; len(ids) + max_new_tokens <= length.

    `depths`: for niah, the fraction of haystack units (noise lines, distractor needles, essay
    sentences) before each needle, in context order; `haystack`: the number of units fitted."""

    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: tuple[str, ...]
    ids: tuple[int, ...]
    max_new_tokens: int
    haystack: int
    depths: tuple[float, ...] = ()

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


def task_kind(task: str) -> str:
    """niah | vt | cwe | fwe; a ValueError names an unknown task."""
    if task in NIAH_TASKS:
        return "niah"
    if task in ("vt", "cwe", "fwe"):
        return task
    raise ValueError(f"--ruler task {task!r}: unknown; expected some of {', '.join(TASKS)} "
                     "(qa_1/qa_2 need SQuAD/HotpotQA and are not offered)")


def needs_essay(tasks) -> bool:
    return any(t in NIAH_TASKS and NIAH_TASKS[t].haystack == "essay" for t in tasks)


def essay_words(documents: Sequence[str]) -> list[str]:
    """The essay haystack as RULER reads it (niah.py): all text, white space collapsed, split on spaces."""
    text = re.sub(r"\s+", " ", " ".join(documents[i] for i in range(len(documents)))).strip()
    if not text:
        raise ValueError("ruler essay haystack: the corpus has no text")
    return text.split(" ")


# ---- word lists -----------------------------------------------------------------------------------


@cache
def _wonderwords(name: str) -> tuple[str, ...]:
    """A wonderwords asset list (nounlist, adjectivelist, verblist), one word a line (the same files
    RULER reads through wonderwords.random_word)."""
    text = (importlib.resources.files("wonderwords.assets") / f"{name}.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip())


@cache
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(_wonderwords("nounlist") + _wonderwords("adjectivelist") + _wonderwords("verblist"))))


def _adj_noun(i: int) -> str:
    adjs, nouns = _wonderwords("adjectivelist"), _wonderwords("nounlist")
    return f"{adjs[i // len(nouns)]}-{nouns[i % len(nouns)]}"


def _draw(rng: np.random.Generator, kind: str) -> str:
    """A key or value: an adjective-noun word, a 7-digit number or a UUID4 (niah.py generate_random)."""
    if kind == "words":
        return _adj_noun(int(rng.integers(len(_wonderwords("adjectivelist")) * len(_wonderwords("nounlist")))))
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    raise ValueError(f"ruler needle type {kind!r}: expected words, numbers or uuids")


# ---- the tasks: (rng, haystack size) -> (input, answer prefix, outputs, depths) ------------------


def _insert(units: list[str], items: Sequence[str], depths: Sequence[float]) -> list[str]:
    """`units` with items[i] placed before unit int(len(units) * depths[i]) (depths sorted)."""
    out, prev = [], 0
    for item, d in zip(items, depths):
        at = int(len(units) * d)
        out += units[prev:at] + [item]
        prev = at
    return out + units[prev:]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _niah(spec: Niah, rng, n: int, essay: Sequence[str] | None, length: int):
    num_k = max(spec.num_k, spec.num_q)
    keys = [_draw(rng, spec.key_type) for _ in range(num_k)]
    values = [[_draw(rng, spec.value_type) for _ in range(spec.num_v)] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=spec.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    depths = sorted(float(d) / 100 for d in rng.choice(DEPTHS, size=len(needles), replace=False))
    queried = [int(i) for i in rng.choice(num_k, size=spec.num_q, replace=False)]
    if spec.haystack == "essay":
        words = (list(essay) * (n // len(essay) + 1))[:n] if n > len(essay) else list(essay[:n])
        units = [s for s in _SENTENCE_END.split(" ".join(words).strip()) if s]
        context = " ".join(_insert(units, needles, depths))
    else:
        if spec.haystack == "noise":
            units = [NOISE] * n
        else:  # distractor needles, drawn last so that a longer haystack only adds to the list
            units = [NEEDLE.format(type_needle_v=spec.value_type, key=_draw(rng, spec.key_type),
                                   value=_draw(rng, spec.value_type)) for _ in range(n)]
        context = "\n".join(_insert(units, needles, depths))
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, spec.value_type
    if spec.num_q * spec.num_v == 1:  # niah.py's singular wording
        template, prefix = (_singular(t) for t in (template, prefix))
        type_v = type_v[:-1]
    outputs = [v for i in queried for v in values[i]]
    return (template.format(type_needle_v=type_v, context=context, query=query),
            prefix.format(type_needle_v=type_v, query=query), outputs, depths)


def _singular(text: str) -> str:
    for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(a, b)
    return text


def _vt_text(rng, n: int, name_len: int, hops: int):
    """(prompt with the answer prefix, chain names): one chain of `hops` hops in `n` noise lines."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(list(string.ascii_uppercase), size=name_len))
        if name not in names:
            names.append(name)
    value = int(rng.integers(10000, 99999))  # np.random.randint(10000, 99999): 99999 excluded
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    if n >= len(chain):  # distinct noise lines, as random.sample(range(n), len(chain))
        at = sorted(int(i) for i in rng.choice(n, size=len(chain), replace=False))
    else:
        at = sorted(int(i) for i in rng.integers(0, n + 1, size=len(chain)))
    lines = [NOISE] * n
    for j, (i, line) in enumerate(zip(at, chain)):
        lines.insert(i + j, line)
    context = "\n".join(lines).replace(". \n", ".\n")
    return (VT_TEMPLATE.format(context=context, query=value),
            VT_PREFIX.format(num_v=hops + 1, query=value), names)


def _cwe_example(rng, num_words: int, common: int, uncommon: int):
    words = _cwe_words()
    if num_words <= len(words):
        chosen = [words[i] for i in rng.permutation(len(words))[:num_words]]
    else:
        total = len(_wonderwords("adjectivelist")) * len(_wonderwords("nounlist"))
        chosen = [_adj_noun(int(i)) for i in rng.choice(total, size=num_words, replace=False)]
    top, rest = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
    listed = top * common + rest * uncommon
    listed = [listed[i] for i in rng.permutation(len(listed))]
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top


def _cwe(rng, n: int, length: int):
    short = length < 4096
    example, example_top = _cwe_example(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
    context, top = _cwe_example(rng, n, 6 if short else 30, 1 if short else 3)
    shot = (CWE_TEMPLATE.format(context=example) + CWE_PREFIX + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_top)))
    return shot + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, top


def _zeta(alpha: float) -> float:
    if alpha == 2.0:
        return math.pi ** 2 / 6
    k = np.arange(1, 100_001, dtype=np.float64)  # partial sum + the integral tail
    return float(np.sum(k ** -alpha) + 100_000.5 ** (1 - alpha) / (alpha - 1))


def fwe_vocab_size(length: int) -> int:
    return (length - TOKENS_TO_GENERATE["fwe"]) // 50


def _fwe(rng, n: int, length: int):
    size = fwe_vocab_size(length)
    vocab: list[str] = []
    seen = set()
    while len(vocab) < size:
        w = "".join(rng.choice(list(string.ascii_lowercase), size=FWE_WORD_LEN))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "..."  # the top rank is noise
    counts = (n * np.arange(1, size + 1, dtype=np.float64) ** -FWE_ALPHA / _zeta(FWE_ALPHA)).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    words = [words[i] for i in rng.permutation(len(words))]
    return FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, vocab[1:4]


# ---- fitting and the samples ---------------------------------------------------------------------


def _sample_key(seed: int, task: str, length: int, index: int, part: int = 0) -> list[int]:
    return [int(seed), zlib.crc32(task.encode()), int(length), int(index), part]


def _fit(task: str, length: int, budget: int, size: Callable[[int], int], lo: int, hint: int | None = None) -> int:
    """The largest n >= lo with size(n) <= budget (binary search; sizes grow with n), or a ValueError
    naming the task and the shortest length that would do."""
    first = size(lo)
    if first > budget:
        raise ValueError(f"--ruler-lengths {length}: too short for task {task}: its prompt with the smallest "
                         f"haystack takes {first} tokens (BOS included) and its answer {length - budget}; "
                         f"expected a length >= {first + length - budget}")
    hi = max(lo + 1, hint or 2 * lo + 16)
    while size(hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def make_samples(task: str, tokenizer, length: int, count: int, *, seed: int = 0,
                 essay: Sequence[str] | None = None) -> list[Sample]:
    """`count` samples of `task` fitted to `length` tokens (BOS + prompt + tokens to generate <= length);
    sample i is the same for the same (seed, task, length, i) whatever else is asked. `essay`: the
    words of the essay haystack (`essay_words`), needed by the essay niah tasks."""
    task_kind(task)
    _check_count("--ruler-samples", count)
    samples, hint = [], None
    for index in range(count):
        samples.append(build_sample(task, tokenizer, length, index, seed=seed, essay=essay, hint=hint))
        hint = samples[-1].haystack + 1  # the next sample's search starts next to this one's size
    return samples


def _check_count(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")


def build_sample(task: str, tokenizer, length: int, index: int, *, seed: int = 0, essay: Sequence[str] | None = None,
                 haystack: int | None = None, hint: int | None = None) -> Sample:
    """Sample `index` of `task` at `length`: with `haystack` None the largest haystack that fits
    (binary search, starting near `hint`), else exactly `haystack` units (which may not fit)."""
    kind = task_kind(task)
    _check_count("--ruler-lengths", length)
    gen = TOKENS_TO_GENERATE[kind]
    if kind == "niah" and NIAH_TASKS[task].haystack == "essay" and not essay:
        raise ValueError(f"ruler task {task}: needs the essay haystack's words (essay_words of a corpus)")
    if kind == "fwe" and fwe_vocab_size(length) < 4:
        raise ValueError(f"--ruler-lengths {length}: too short for task fwe: its coded vocabulary of (L - 50) / 50 "
                         f"words needs at least 4 (the noise word and the 3 answers); expected a length >= 250")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    key = _sample_key(seed, task, length, index)
    shot = ""
    if kind == "vt":  # the one-shot example: 3-letter names, value and noise of its own
        ex_key = _sample_key(seed, task, length, index, 1)

        def example(m):
            body, answer_prefix, names = _vt_text(np.random.default_rng(ex_key), m, 3, min(10, VT_HOPS))
            return body + answer_prefix + " " + " ".join(names) + "\n"

        ex_budget = min(500, length // 4)

        def ex_size(m):
            return len(tokenizer.encode(example(m)))

        shot = example(0 if ex_size(0) > ex_budget else _fit(task, length, ex_budget, ex_size, 0)) + "\n"

    def build(n):
        rng = np.random.default_rng(key)
        depths = []
        if kind == "niah":
            text, answer_prefix, outputs, depths = _niah(NIAH_TASKS[task], rng, n, essay, length)
        elif kind == "vt":
            text, answer_prefix, outputs = _vt_text(rng, n, 5, VT_HOPS)
        elif kind == "cwe":
            text, answer_prefix, outputs = _cwe(rng, n, length)
        else:
            text, answer_prefix, outputs = _fwe(rng, n, length)
        return shot + text, answer_prefix, outputs, depths

    def size(n):
        text, answer_prefix, _, _ = build(n)
        return len(bos) + len(tokenizer.encode(text + answer_prefix))

    n = haystack if haystack is not None else _fit(task, length, length - gen, size,
                                                     CWE_COMMON if kind == "cwe" else 0, hint)
    text, answer_prefix, outputs, depths = build(n)
    return Sample(task=task, length=int(length), index=int(index), input=text, answer_prefix=answer_prefix,
                  outputs=tuple(outputs), ids=tuple(bos + tokenizer.encode(text + answer_prefix)), max_new_tokens=gen,
                  haystack=int(n), depths=tuple(depths))
