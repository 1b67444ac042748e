"""Corpora from a spec string: the KJV through TFDS, local txt/jsonl files, and every bad data input."""

import json

import pytest
import tensorflow_datasets as tfds

from longrope_jax.data import kjv
from longrope_jax.data.loader import make_loader
from longrope_jax.data.sources import open_source
from longrope_jax.data.tokenizer import build_tokenizer
from tests.data.corpus import RAW, SEQ, VERSES


def test_open_source_kjv_gives_the_tfds_documents_as_str(kjv_dir):
    src = open_source("kjv", "train", data_dir=kjv_dir)
    ref = tfds.data_source("kjv", split="train", data_dir=str(kjv_dir))
    assert len(src) == 60 and src[3] == ref[3]["text"].decode() and src[3].startswith("Numbers\n\n")
    titles = open_source("tfds:kjv@1.0.0", "validation", data_dir=kjv_dir, text_key="title")
    assert list(titles) == [b for b in RAW if b in kjv.VALIDATION_BOOKS]


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
