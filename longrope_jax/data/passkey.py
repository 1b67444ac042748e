"""Passkey retrieval: the landmark-attention template (Mohtashami & Jaggi), token-exact.

The prompt is, exactly as in `epfml/landmark-attention/llama/run_test.py` (and YaRN's and LongRoPE's
copies), the lines

    TASK / noise prefix / "The pass key is {k}. Remember it. {k} is the pass key." / noise suffix / QUERY

joined by newlines, where the noise is NOISE repeated with single spaces. Those scripts cut the noise
in characters and only approximately hit a token budget; here the noise is cut in *tokens* (of the
tokenized repeated noise), so a prompt has exactly the requested number of tokens, BOS included, and
the depth is the fraction of the noise tokens placed before the key. With the byte tokenizer this is
the character-level cut of the original.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUERY = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)  # inclusive, as random.randint(1, 50000)


def info_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def prompt_text(key: int, noise_prefix: str, noise_suffix: str) -> str:
    return "\n".join([TASK, noise_prefix, info_line(key), noise_suffix, QUERY])


def _noise_ids(tokenizer, count: int) -> list[int]:
    """The first `count` tokens of the repeated noise."""
    # A BPE may merge across the joins, so a repeat inside the text can be shorter than NOISE alone:
    # grow the text until it holds enough tokens.
    repeats = count // max(len(tokenizer.encode(NOISE + " ")), 1) + 2
    ids = tokenizer.encode(" ".join([NOISE] * repeats))
    while len(ids) < count:
        repeats *= 2
        ids = tokenizer.encode(" ".join([NOISE] * repeats))
    return ids[:count]


def fixed_tokens(tokenizer, key: int) -> int:
    """Tokens of a prompt with no noise at all (BOS included): the shortest possible prompt."""
    return len(prompt_ids(tokenizer, key, 0, 0))


def prompt_ids(tokenizer, key: int, n_prefix: int, n_suffix: int) -> list[int]:
    """BOS + the template with `n_prefix` and `n_suffix` noise tokens around the key line."""
    noise = _noise_ids(tokenizer, max(n_prefix, n_suffix))
    return ([tokenizer.bos_id] + tokenizer.encode(TASK + "\n") + noise[:n_prefix]
            + tokenizer.encode("\n" + info_line(key) + "\n") + noise[:n_suffix] + tokenizer.encode("\n" + QUERY))


def build_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """A prompt of exactly `length` tokens with the key line after `depth` (0..1) of the noise."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth: expected a fraction in [0, 1], got {depth!r}")
    if not KEY_RANGE[0] <= key <= KEY_RANGE[1]:
        raise ValueError(f"passkey key: expected an integer in {KEY_RANGE[0]}..{KEY_RANGE[1]}, got {key!r}")
    fixed = fixed_tokens(tokenizer, key)
    if length < fixed:
        raise ValueError(f"passkey length {length}: the template alone takes {fixed} tokens with this tokenizer; "
                         f"expected a length >= {fixed}")
    noise = length - fixed
    n_prefix = round(depth * noise)
    ids = prompt_ids(tokenizer, key, n_prefix, noise - n_prefix)
    if len(ids) != length:  # a tokenizer merging across our piece boundaries would break exactness
        raise ValueError(f"passkey prompt: built {len(ids)} tokens, expected {length}")
    return ids


def draw_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(KEY_RANGE[0], KEY_RANGE[1] + 1, size=count)


def first_integer(text: str) -> int | None:
    """The scoring rule of the original scripts: the first run of digits in the completion, or None."""
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def training_text(rng: np.random.Generator, max_chars: int) -> str:
    """A passkey-format training document of at most `max_chars` characters, answer included.

    Long budgets give the full template; short ones (the template and answer need ~270 characters)
    drop the task line, which carries no information about the key. Noise lengths and depth are random.
    """
    key = int(draw_keys(rng, 1)[0])
    answer = f" {key}."
    lines = [TASK, "", info_line(key), "", QUERY + answer]
    if len("\n".join(lines)) > max_chars:
        lines = lines[1:]
    fixed = len("\n".join(lines))
    if fixed > max_chars:
        raise ValueError(f"passkey training text: needs at least {fixed} characters, max_chars={max_chars}")
    noise = " ".join([NOISE] * (max_chars // len(NOISE) + 2))
    total = int(rng.integers(0, max_chars - fixed + 1))
    before = int(rng.integers(0, total + 1))
    at = lines.index("")
    lines[at], lines[at + 2] = noise[:before], noise[:total - before]
    return "\n".join(lines)


class Mixture(Sequence[str]):
    """A document source with passkey training documents added: `fraction` of all characters.

    The passkey documents are made from (seed, index), so the mixture is a deterministic random-access
    source like any other (shuffling, sharding and resume work unchanged). Each is at most `max_chars`
    characters, so with the byte tokenizer and `max_chars <= seq_len - 2` it fits in one row.
    """

    def __init__(self, source: Sequence[str], fraction: float, *, max_chars: int, seed: int = 0,
                 sample_docs: int = 1000):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"passkey fraction: expected a value in [0, 1), got {fraction!r}")
        self.source, self.max_chars, self.seed = source, max_chars, seed
        rng = np.random.default_rng(0)
        mean_chars = np.mean([len(training_text(rng, max_chars)) for _ in range(200)])  # fails if max_chars is too small
        n = len(source)
        step = max(1, n // sample_docs)
        sampled = range(0, n, step)
        text_chars = sum(len(source[i]) for i in sampled) * n / len(sampled)
        self.extra = round(fraction / (1 - fraction) * text_chars / mean_chars)

    def __len__(self) -> int:
        return len(self.source) + self.extra

    def __getitem__(self, i):
        i = int(i)
        n = len(self.source)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        if i < n:
            return self.source[i]
        return training_text(np.random.default_rng((self.seed, i - n)), self.max_chars)

    def __repr__(self) -> str:
        return f"passkey.Mixture({self.source!r}, +{self.extra} passkey documents)"
