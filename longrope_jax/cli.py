"""`longrope-jax` command line. Subcommands register here, in one place, and every command's errors come
out through one path (`report_error`):

- bad input (a config key, file, tensor or value that is wrong): one line naming it and what was expected,
  exit 2;
- a runtime failure (a read-only or full filesystem, a checkpoint directory with no readable step, anything
  unexpected): one line, exit 1;
- `train` stopped by K consecutive non-finite steps: exit 3 (the train command prints why).

`--debug` (anywhere on the command line) or `LONGROPE_DEBUG=1` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from longrope_jax import __version__

EXIT_FAILURE, EXIT_BAD_INPUT = 1, 2
MAX_MESSAGE_LINES = 4
MAX_MESSAGE_CHARS = 800
# OSErrors about the machine, not about what the user named: a runtime failure.
_RUNTIME_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EBUSY,
                   errno.ENOMEM, errno.EXDEV}


def _registrars():
    from longrope_jax import extend
    from longrope_jax.aot import cli as compile_cli
    from longrope_jax.data import cli as data
    from longrope_jax.demo import run as demo
    from longrope_jax.eval import evaluate
    from longrope_jax.io import convert, models
    from longrope_jax.search import cli as search
    from longrope_jax.train import trainer as train

    return {"convert": convert.register_cli, "data": data.register_cli, "train": train.register_cli,
            "search": search.register_cli, "eval": evaluate.register_cli, "extend": extend.register_cli,
            "demo": demo.register_cli, "compile": compile_cli.register_cli,
            "models": models.register_cli}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longrope-jax", description="Context-window extension for RoPE language models (JAX/Flax).",
        epilog="Errors print one line; exit 2 for bad input, 1 for a runtime failure. --debug (or "
               "LONGROPE_DEBUG=1) adds the traceback.")
    parser.add_argument("--version", action="version", version=f"longrope-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, register in _registrars().items():
        register(sub)
    return parser


def classify(e: BaseException) -> int:
    """The exit code of an exception: 2 for bad input, 1 for a runtime failure."""
    from longrope_jax.io.files import BadInput, RuntimeFailure

    if isinstance(e, RuntimeFailure):
        return EXIT_FAILURE
    if isinstance(e, (BadInput, ValueError)):
        return EXIT_BAD_INPUT
    if isinstance(e, OSError):
        if isinstance(e, PermissionError) or e.errno in _RUNTIME_ERRNOS:
            return EXIT_FAILURE
        if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
            return EXIT_BAD_INPUT
        return EXIT_FAILURE
    if isinstance(e, (KeyError, TypeError)) and type(e).__module__.startswith("longrope_jax"):
        return EXIT_BAD_INPUT  # our own (e.g. a record without the text field)
    return EXIT_FAILURE


def error_message(e: BaseException) -> str:
    """One line (a few at most) saying what was wrong, where, and what was expected."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # the OS's own: "PATH: Read-only ..."
        text = f"{e.filename}: {e.strerror}"
        if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            text += " (the destination keeps its earlier content; free space or choose a writable path)"
        return text
    if isinstance(e, KeyError) and type(e).__module__.startswith("longrope_jax"):
        text = str(e)
    elif isinstance(e, KeyError) and e.args:
        text = f"{type(e).__name__}: {e.args[0]}"
    else:
        text = str(e) or type(e).__name__
        if classify(e) == EXIT_FAILURE and not type(e).__module__.startswith("longrope_jax"):
            text = f"{type(e).__name__}: {text}"
    lines = [line for line in text.splitlines() if line.strip()] or [type(e).__name__]
    cut = len(lines) > MAX_MESSAGE_LINES or len(text) > MAX_MESSAGE_CHARS
    text = "\n".join(lines[:MAX_MESSAGE_LINES])[:MAX_MESSAGE_CHARS]
    return text + (" [... cut; run with --debug for the whole error]" if cut else "")


def report_error(command: str, e: BaseException, debug: bool, out=None) -> int:
    """Print `e` as one line (with the traceback first when `debug`) and return its exit code."""
    out = out or sys.stderr
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=out)
    code = classify(e)
    kind = "error" if code == EXIT_BAD_INPUT else "failed"
    hint = "" if debug or code == EXIT_BAD_INPUT else " (run with --debug for the traceback)"
    text = error_message(e)
    for prefix in {f"{command}: ", f"{command.split()[0]}: "}:  # a message that names its command already
        text = text.removeprefix(prefix)
    print(f"longrope-jax {command}: {kind}: {text}{hint}", file=out, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw or os.environ.get("LONGROPE_DEBUG", "") not in ("", "0")
    raw = [a for a in raw if a != "--debug"]  # accepted anywhere, also after train's own flags
    if raw[:1] == ["compile"]:  # compiles for TPU with libtpu's compiler; nothing runs on a device
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(raw)
        if getattr(args, "passthrough", False):  # own flag syntax (train: config_flags): everything after it
            args.argv = raw[raw.index(args.command) + 1:]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse has printed its usage line (or --help / --version)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    command = " ".join(filter(None, [args.command, getattr(args, "direction", None),
                                     getattr(args, "data_command", None), getattr(args, "models_command", None)]))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"longrope-jax {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (the one place every command's errors end)
        return report_error(command, e, debug)
