"""Tokenizers against their reference libraries: bytes, the HF `transformers` tokenizer and
`sentencepiece` for their own files."""

import io
import json
import shutil

import pytest

from longrope_jax.data.tokenizer import build_tokenizer
from tests.data.corpus import RAW, VERSES


def test_byte_tokenizer_round_trips_and_reserves_ids_above_bytes(byte):
    text = "In the beginning\nGott schuf Himmel und Erde — 太初 ✓"
    ids = byte.encode(text)
    assert ids == list(text.encode("utf-8")) and byte.decode(ids) == text
    assert byte.vocab_size == 264
    assert len({byte.bos_id, byte.eos_id, byte.pad_id}) == 3
    assert all(256 <= i < byte.vocab_size for i in (byte.bos_id, byte.eos_id, byte.pad_id))
    assert byte.decode([byte.bos_id, *ids, byte.eos_id, byte.pad_id]) == text


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([v for b in ("Genesis", "Exodus") for ch in RAW[b] for v in ch], trainer)
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return d


def test_hf_tokenizer_matches_transformers_and_round_trips(hf_dir, val_docs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers

    ours = build_tokenizer(f"hf:{hf_dir}")
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == len(ref) == 400
    for text in val_docs[:3]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert build_tokenizer(f"hf:{hf_dir / 'tokenizer.json'}").encode("Jonah") == ours.encode("Jonah")


def test_hf_tokenizer_finds_special_ids_in_config_json_or_by_name(hf_dir, tmp_path):
    import tokenizers

    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    by_name = build_tokenizer(f"hf:{tmp_path}")  # no config at all: well-known names
    assert (by_name.bos_id, by_name.eos_id, by_name.pad_id) == tuple(map(ref.token_to_id, ("<s>", "</s>", "<pad>")))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 7, "eos_token_id": [9, 10]}))
    from_config = build_tokenizer(f"hf:{tmp_path}")
    assert (from_config.bos_id, from_config.eos_id, from_config.pad_id) == (7, 9, ref.token_to_id("<pad>"))


def test_sentencepiece_tokenizer_matches_sentencepiece_and_round_trips(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([v for ch in RAW["Genesis"] for v in ch]), model_writer=model, vocab_size=300,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    path = tmp_path / "tiny.model"
    path.write_bytes(model.getvalue())
    ours = build_tokenizer(f"sentencepiece:{path}")
    ref = spm.SentencePieceProcessor(model_file=str(path))
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (300, 1, 2, 3)
    for verse in VERSES[:20]:
        assert ours.encode(verse) == ref.encode(verse)
        assert ours.decode(ours.encode(verse)) == verse
