"""Atomic writes: a directory built in a temporary sibling then renamed into place; a file likewise. The
rules for replacing a destination (`check_destination`), the two error kinds the CLI tells apart
(`BadInput`, `RuntimeFailure`), and reading a JSON object with errors that name the file and its use."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


_DISK_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES)


class BadInput(ValueError):
    """Something the user gave is wrong (a key, file, tensor, value); the message names it. CLI exit 2."""


class RuntimeFailure(RuntimeError):
    """The inputs were fine but the run could not go on (e.g. no readable checkpoint). CLI exit 1."""


def first_line(e: BaseException, limit: int = 240) -> str:
    """The first non-blank line of the innermost cause of an exception, cut to `limit` characters: for
    wrapping a library's many-line error into one line of ours (the innermost cause is usually the one that
    says what was wrong, e.g. tensorstore's OUT_OF_RANGE under orbax's generic message)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def require_local(path, what: str) -> None:
    """A BadInput when `path` is a URL (gs://...): this reader or writer works on local paths only."""
    if "://" in str(path):
        raise BadInput(f"{what} {path}: a remote path; expected a local directory (copy it down first, e.g. "
                       "`gsutil -m cp -r`)")


def check_remote_access(path, what: str) -> None:
    """For paths read or written through etils.epath (train workdirs): a gs:// path whose filesystem
    library is missing fails here, naming the path (a RuntimeFailure: the input is fine, the machine lacks gcsfs)."""
    if "://" not in str(path):
        return
    from etils import epath

    try:
        epath.Path(path).exists()
    except ImportError as e:
        raise RuntimeFailure(f"{what} {path}: cannot reach it ({first_line(e)}; pip install gcsfs)") from None


def _resolved(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(dst: Path, overwrite: bool, protect: dict | None = None) -> None:
    """Fail early, before any work, when `dst` may not be (re)placed.

    An empty directory is written into without `overwrite` (as `save_pretrained` does). A non-empty one
    needs `overwrite`, and even then is refused when it is, contains or lies inside a path in `protect`
    ({what: path}, e.g. {"SRC": src}), or when it is or contains the current directory."""
    dst = Path(dst)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise FileExistsError(f"{dst}: exists and is not a directory; refusing to replace it")
    if not dst.exists() or not any(dst.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{dst}: already exists and is not empty; pass overwrite=True (--overwrite) "
                              "to replace it")
    target = _resolved(dst)
    for what, path in {**(protect or {}), "the current directory": os.getcwd()}.items():
        if path is None or "://" in str(path):
            continue
        p = _resolved(path)
        if _within(p, target) or (what != "the current directory" and _within(target, p)):
            rel = "is" if p == target else ("contains" if _within(p, target) else "lies inside")
            where = what if what == "the current directory" else f"{what} {path}"
            raise FileExistsError(f"{dst}: {rel} {where}; refusing to replace it with --overwrite (that would "
                                  "delete it); expected a destination apart from it")


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool = False, protect: dict | None = None):
    """Yield an empty temporary directory next to `dst`; on success it becomes `dst`.

    On any error the temporary directory is removed and `dst` is left as it was. With `overwrite`,
    an existing `dst` is first renamed aside, and renamed back if the final rename fails, so at every
    moment either the old or the new directory is at `dst`.
    """
    dst = Path(dst)
    check_destination(dst, overwrite, protect)
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # A sibling, so the final rename stays on one filesystem (and so is atomic).
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        yield tmp
        _swap_into_place(tmp, dst, overwrite, protect)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _DISK_ERRNOS:  # name the destination, not our temporary sibling
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(dst)) from e
        raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, dst: Path, overwrite: bool, protect: dict | None) -> None:
    check_destination(dst, overwrite, protect)  # again: dst may have appeared while we were writing
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
