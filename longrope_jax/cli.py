"""`longrope-jax` command line. Subcommands register here, in one place."""

from __future__ import annotations

import argparse
import os
import sys

from longrope_jax import __version__


def _registrars():
    from longrope_jax import extend
    from longrope_jax.aot import cli as compile_cli
    from longrope_jax.data import cli as data
    from longrope_jax.demo import run as demo
    from longrope_jax.eval import evaluate
    from longrope_jax.io import convert
    from longrope_jax.search import cli as search
    from longrope_jax.train import trainer as train

    return {"convert": convert.register_cli, "data": data.register_cli, "train": train.register_cli,
            "search": search.register_cli, "eval": evaluate.register_cli, "extend": extend.register_cli,
            "demo": demo.register_cli, "compile": compile_cli.register_cli}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longrope-jax", description="Context-window extension for RoPE language models (JAX/Flax).")
    parser.add_argument("--version", action="version", version=f"longrope-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, register in _registrars().items():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["compile"]:  # compiles for TPU with libtpu's compiler; nothing runs on a device
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    parser = build_parser()
    args, extra = parser.parse_known_args(raw)
    if getattr(args, "passthrough", False):  # own flag syntax (train: config_flags): everything after it
        args.argv = raw[raw.index(args.command) + 1:]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"longrope-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
