"""Atomic writes: a directory built in a temporary sibling then renamed into place; a file likewise.
And reading a JSON object with errors that name the file and what it was for."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def check_destination(dst: Path, overwrite: bool) -> None:
    """Fail early, before any work, when `dst` may not be (re)placed."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst}: already exists; pass overwrite=True (--overwrite) to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"{dst}: exists and is not a directory; refusing to replace it")


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool = False):
    """Yield an empty temporary directory next to `dst`; on success it becomes `dst`.

    On any error the temporary directory is removed and `dst` is left as it was. With `overwrite`,
    an existing `dst` is first renamed aside, and renamed back if the final rename fails, so at every
    moment either the old or the new directory is at `dst`.
    """
    dst = Path(dst)
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one filesystem (and so is atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _swap_into_place(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    check_destination(dst, overwrite)  # again: dst may have appeared while we were writing
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `path` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_json(text: str, what: str, error: type[Exception] = ValueError):
    """The JSON value in `text`; bad JSON fails naming `what` (a file, or a key and its file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e})") from None


def parse_json_object(text: str, what: str, expected: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `text`; bad JSON or a non-object fails naming `what`."""
    d = parse_json(text, what, error)
    if not isinstance(d, dict):
        raise error(f"{what} holds a JSON {type(d).__name__}; expected {expected}")
    return d


def read_json_object(path, what: str, expected: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path`: the one reader of JSON files given by users. A missing file, bad JSON,
    undecodable bytes or a non-object fail naming `what` (e.g. a config key; may be empty) and `path`."""
    path = Path(path)
    where = f"{what}: {path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where} not found; expected {expected}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid JSON ({e})") from None
    return parse_json_object(text, where, expected, error)
