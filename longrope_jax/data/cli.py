"""`longrope-jax data prepare`: build a TFDS corpus ahead of training."""

from __future__ import annotations

from longrope_jax.data.sources import open_source, prepare


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare corpora ahead of training")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = sub.add_parser("prepare", help="build a TFDS corpus (kjv, tfds:NAME) as array_record")
    prep.add_argument("spec", metavar="SPEC", help="kjv | tfds:NAME[:CONFIG][@VERSION]")
    prep.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    prep.set_defaults(func=_prepare_cli)


def _prepare_cli(args) -> int:
    path = prepare(args.spec, args.data_dir)
    splits = {split: len(open_source(args.spec, split, data_dir=args.data_dir)) for split in ("train", "validation")}
    print(f"prepared {args.spec} in {path}: " + ", ".join(f"{n} {s} documents" for s, n in splits.items()))
    return 0
