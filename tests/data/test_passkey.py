"""Passkey documents mixed into training data: deterministic, whole, in the share asked for."""

import pytest

from longrope_jax.data.loader import make_loader
from tests.data.corpus import SEQ, rows_of


def test_passkey_mixture_adds_deterministic_whole_passkey_rows(byte, val_docs):
    from longrope_jax.data import passkey

    mix = passkey.Mixture(val_docs, 0.2, max_chars=SEQ - 2, seed=3)
    extra = [mix[i] for i in range(len(val_docs), len(mix))]
    assert extra == [passkey.Mixture(val_docs, 0.2, max_chars=SEQ - 2, seed=3)[i]
                     for i in range(len(val_docs), len(mix))]
    assert [mix[i] for i in range(len(val_docs))] == list(val_docs)
    share = sum(map(len, extra)) / (sum(map(len, extra)) + sum(map(len, val_docs)))
    assert 0.15 < share < 0.25, share
    for text in extra:
        assert len(text) <= SEQ - 2
        key = passkey.first_integer(text)
        assert text.endswith(f"The pass key is {key}.") and f"The pass key is {key}. Remember it." in text
    rows = rows_of(make_loader(mix, byte, seq_len=SEQ, batch_size=8, seed=0, pack="fit"), 40)
    questions = answers = 0
    for tokens, seg in zip(rows["tokens"], rows["segment_ids"]):
        for s in range(1, seg.max() + 1):
            text = byte.decode(tokens[seg == s])
            if "What is the pass key?" in text:
                questions += 1
                answers += "Remember it." in text  # the key is in the same segment as its question
    assert questions > 10 and answers == questions
    with pytest.raises(ValueError, match="passkey fraction"):
        passkey.Mixture(val_docs, 1.0, max_chars=SEQ - 2)
    with pytest.raises(ValueError, match="max_chars"):
        passkey.Mixture(val_docs, 0.1, max_chars=50)


class _FourCharTokenizer:
    """One id per 4 characters: alone, NOISE + " " is one token longer than each repeat inside the joined
    noise (89 characters), like a BPE that merges across the joins (SmolLM2: 25 vs 24 tokens)."""

    bos_id = 0

    def encode(self, text):
        return [1] * -(-len(text) // 4)


def test_passkey_prompts_are_exact_when_repeats_tokenize_shorter_than_the_noise_alone():
    from longrope_jax.data.passkey import build_prompt

    for length in (2000, 9000):
        assert len(build_prompt(_FourCharTokenizer(), length, 0.0, 123)) == length
